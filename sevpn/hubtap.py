"""
C{twistd sevpn-hub}: the virtual HUB's command line and service.
"""

from __future__ import annotations

from twisted.application.service import IService

from sevpn import defaults
from sevpn.options import CommonOptions, non_negative


class Options(CommonOptions):
    synopsis = "[options]"
    longdesc = "Run a sevpn virtual HUB: a TLS server with one Ethernet switch per virtual hub."
    optParameters = [
        ["state-dir", "d", defaults.HUB_STATE_DIR, "Where the hub keeps its CA, certificates and users."],
        ["mac-age", None, defaults.MAC_AGE, "Seconds before an unused MAC table entry is forgotten.",
         non_negative(float)],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["hostname"] = []

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, e.g. tcp:5555 or tcp6:port=5555 (repeatable; default tcp:5555)."""
        self["listen"].append(description)

    def opt_hostname(self, name: str) -> None:
        """A DNS name or IP address cards use to reach this hub (repeatable)."""
        self["hostname"].append(name)


def makeService(config: Options) -> IService:
    from sevpn.hubservice import HubService

    return HubService(
        state_dir=config["state-dir"],
        listen=config["listen"] or defaults.LISTEN,
        hostnames=config["hostname"],
        resume_window=config["resume-window"],
        keepalive=config["keepalive"],
        buffer_limit=config["resume-buffer-bytes"],
        max_age=config["mac-age"],
    )
