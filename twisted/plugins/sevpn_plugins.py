"""twistd plugins: C{twistd sevpn-hub} and C{twistd sevpn-nic}."""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class _Maker:
    def __init__(self, tapname, description, options, make):
        self.tapname = tapname
        self.description = description
        self._options = options
        self._make = make

    @property
    def options(self):
        from sevpn import options

        return getattr(options, self._options)

    def makeService(self, options):
        from sevpn import options as module

        return getattr(module, self._make)(options)


hub = _Maker("sevpn-hub", "A sevpn virtual HUB (layer-2 VPN server).", "HubOptions", "make_hub_service")
nic = _Maker("sevpn-nic", "A sevpn virtual LAN card (TAP client of a virtual HUB).", "CardOptions", "make_card_service")
