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
        ["bridge-force", None, "Bridge an interface even if it carries an address the hub listens on."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["hostname"] = []
        self["bridge"] = []
        self["bridge-tap"] = []

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

    # local bridges ------------------------------------------------------------

    def opt_bridge(self, text: str) -> None:
        """HUB=INTERFACE: bridge virtual hub HUB to a real network interface (repeatable; needs CAP_NET_RAW)."""
        self["bridge"].append(self._bridge("--bridge", text))

    def opt_bridge_tap(self, text: str) -> None:
        """HUB=NAME: give virtual hub HUB a TAP port NAME to put into a Linux bridge (repeatable)."""
        self["bridge-tap"].append(self._bridge("--bridge-tap", text))

    def _bridge(self, option: str, text: str):
        from sevpn.bridge import BridgeError, parse_bridge_option

        try:
            pair = parse_bridge_option(text, option)
        except BridgeError as e:
            raise usage.UsageError(str(e))
        taken = {name for _, name in self["bridge"] + self["bridge-tap"]}
        if pair[1] in taken:
            raise usage.UsageError(f"{option} {text}: {pair[1]} is bridged twice")
        return pair


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
        bridges=config["bridge"],
        bridge_taps=config["bridge-tap"],
        bridge_force=config["bridge-force"],
    )
