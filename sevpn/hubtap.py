"""
C{twistd sevpn-hub}: the virtual HUB's command line and service.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from sevpn import defaults
from sevpn.options import CommonOptions, non_negative
from sevpn.switch import DEFAULT_MAX_MACS


class Options(CommonOptions):
    synopsis = "[options]"
    longdesc = "Run a sevpn virtual HUB: a TLS server with one Ethernet switch per virtual hub."
    optParameters = [
        ["state-dir", "d", defaults.HUB_STATE_DIR, "Where the hub keeps its CA, certificates and users."],
        ["mac-age", None, defaults.MAC_AGE, "Seconds before an unused MAC table entry is forgotten.",
         non_negative(float)],
        ["max-sessions-per-user", None, defaults.MAX_SESSIONS_PER_USER,
         "Sessions a user may have at once, connected or held (0: no limit; a user's own policy wins).",
         non_negative(int)],
        ["max-macs", None, DEFAULT_MAX_MACS,
         "Source MACs one session may use (0: no limit; a user's own policy wins).", non_negative(int)],
        ["resume-memory", None, defaults.RESUME_MEMORY >> 20,
         "MiB all sessions' resume buffers may hold together; held sessions give up their oldest first.",
         non_negative(int)],
        ["metrics", None, None,
         "Serve Prometheus metrics (/metrics) and a status page (/) on this endpoint, e.g. "
         "tcp:9100:interface=127.0.0.1 (default: off; loopback only unless --metrics-public)."],
    ]
    optFlags = [
        ["allow-mac-moves", None,
         "Let a session take a MAC another live session uses (as a plain switch does) instead of dropping "
         "its frames."],
        ["metrics-public", None,
         "Let --metrics listen beyond loopback: the page shows user names and addresses to anyone who reaches it."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["hostname"] = []

    def postOptions(self) -> None:
        super().postOptions()
        if self["metrics-public"] and not self["metrics"]:
            raise usage.UsageError("--metrics-public needs --metrics ENDPOINT")

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, e.g. tcp:5555 or tcp6:5555 (repeatable; default: IPv6 and IPv4 on 5555)."""
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
        busy_poll=config["busy-poll"] / 1e6,
        buffer_limit=config["resume-buffer-bytes"],
        max_age=config["mac-age"],
        limits={
            "max_sessions_per_user": config["max-sessions-per-user"],
            "max_macs_per_session": config["max-macs"],
            "resume_memory": config["resume-memory"] << 20,
            "allow_mac_moves": bool(config["allow-mac-moves"]),
        },
        metrics=config["metrics"],
        metrics_public=config["metrics-public"],
    )
