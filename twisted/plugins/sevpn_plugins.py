"""twistd plugins: C{twistd sevpn-hub} and C{twistd sevpn-nic}."""

from twisted.application.service import ServiceMaker

hub = ServiceMaker("sevpn-hub", "sevpn.hubtap", "A sevpn virtual HUB (layer-2 VPN server).", "sevpn-hub")
nic = ServiceMaker("sevpn-nic", "sevpn.nictap", "A sevpn virtual LAN card (TAP client of a virtual HUB).", "sevpn-nic")
