"""
C{twistd sevpn-hub}: the virtual HUB's command line and service.
"""

from __future__ import annotations

import re
import sys

from twisted.application.service import IService
from twisted.python import usage

from sevpn import defaults
from sevpn.options import CommonOptions, non_negative
from sevpn.switch import DEFAULT_MAX_MACS

#: Endpoint types that are TLS already: the hub wraps connections in TLS itself.
_TLS_TYPES = ("ssl", "tls", "txtls")


def check_udp_listen(spec: str) -> str:
    """C{spec} if it is a UDP address (L{sevpn.udp.parse_spec}), else a sentence naming C{--udp-listen}."""
    from sevpn.udp import SpecError, parse_spec

    try:
        parse_spec(spec)
    except SpecError as e:
        raise usage.UsageError(f"--udp-listen: {e}")
    return spec


check_udp_listen.coerceDoc = "Checked when parsed."


def check_listen(description: str) -> str:
    """
    C{description} if it is a server endpoint string the hub can listen
    on, else a L{usage.UsageError} sentence naming C{--listen}.  Only
    parsed: nothing listens yet.
    """
    from twisted.internet.endpoints import serverFromString

    parts = re.split(r"(?<!\\):", description)
    kind = parts[0].strip().lower()
    example = "give e.g. tcp:5555, tcp:5555:interface=192.0.2.1 or tcp6:5555"
    if kind in _TLS_TYPES:
        raise usage.UsageError(
            f"--listen {description!r}: the hub wraps connections in TLS itself; {example}"
        )
    try:
        serverFromString(object(), description)  # builds the endpoint; the reactor is not used yet
    except Exception as e:
        detail = str(e)
        if "invalid literal" in detail:
            detail = "a port or number in it is not a number"
        raise usage.UsageError(f"--listen {description!r} is not an endpoint the hub can listen on ({detail}): {example}")
    if kind in ("tcp", "tcp6"):
        args = parts[1:]
        ports = [a for a in args if "=" not in a][:1] + [a[5:] for a in args if a.startswith("port=")]
        for port in ports:
            if not port.isdigit() or not 0 <= int(port) <= 65535:
                raise usage.UsageError(f"--listen {description!r}: the port must be a number from 0 to 65535")
    return description



def _workers(text: str) -> int:
    """The --workers coercer: a sentence naming the option for anything but 1 to MAX_WORKERS."""
    from sevpn.reuseport import MAX_WORKERS

    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"--workers must be a whole number from 1 to {MAX_WORKERS}, not {text!r}")
    return value


_workers.coerceDoc = "1 (one process) to 1024."


class Options(CommonOptions):
    """C{twistd sevpn-hub}'s options; each option's text is its help line (C{longdesc} the command's)."""

    synopsis = "[options]"
    longdesc = "Run a sevpn virtual HUB: a TLS server with one Ethernet switch per virtual hub."
    optParameters = [
        ["state-dir", "d", defaults.HUB_STATE_DIR, "Where the hub keeps its CA, certificates and users."],
        ["mac-age", None, defaults.MAC_AGE, "Seconds before an unused MAC table entry is forgotten.",
         non_negative(float, "mac-age")],
        ["max-sessions", None, defaults.MAX_SESSIONS,
         "Sessions the hub holds at once, connected or held (with --workers, shared out among them).",
         non_negative(int, "max-sessions")],
        ["max-sessions-per-user", None, defaults.MAX_SESSIONS_PER_USER,
         "Sessions a user may have at once, connected or held (0: no limit; a user's own policy wins).",
         non_negative(int, "max-sessions-per-user")],
        ["max-macs", None, DEFAULT_MAX_MACS,
         "Source MACs one session may use (0: no limit; a user's own policy wins).",
         non_negative(int, "max-macs")],
        ["udp-listen", None, None,
         "UDP address of the cards' UDP channels, udp:PORT[:interface=ADDRESS] "
         "(default: the port and interface of the first --listen).", check_udp_listen],
        ["resume-memory", None, defaults.RESUME_MEMORY >> 20,
         "MiB all sessions' resume buffers may hold together; held sessions give up their oldest first.",
         non_negative(int, "resume-memory")],
        ["workers", None, 1,
         "Hub processes sharing the listening port, one per core (each card's address always reaches the same "
         "one; they meet in a Linux bridge per virtual hub: needs CAP_NET_ADMIN).", _workers],
        ["metrics", None, None,
         "Serve Prometheus metrics (/metrics) and a status page (/) on this endpoint, e.g. "
         "tcp:9100:interface=127.0.0.1 (default: off; loopback only unless --metrics-public)."],
        ["users", None, None,
         "Keep the virtual hubs and users in the PostgreSQL database the hub nodes of a fabric share: "
         "postgresql://USER@HOST/DATABASE (no password here: use --users-file or ~/.pgpass; default: the state dir)."],
        ["users-file", None, None,
         "A file (mode 0600 if it holds a password) whose first line is the --users URL."],
        ["users-grace", None, defaults.USERS_GRACE,
         "Seconds the node's copy of the shared users still admits known users while the database does not "
         "answer (0: nobody logs in then).", non_negative(float, "users-grace")],
    ]
    optFlags = [
        ["allow-mac-moves", None,
         "Let a session take a MAC another live session uses (as a plain switch does) instead of dropping "
         "its frames."],
        ["metrics-public", None,
         "Let --metrics listen beyond loopback: the page shows user names and addresses to anyone who reaches it."],
        ["bridge-force", None, "Bridge an interface even if it carries an address the hub listens on."],
        ["no-udp", None, "Offer cards no UDP channel: frames always go over TLS/TCP."],
        ["udp-always", None, "Send frames over a card's UDP channel whenever it works, not only on a lossy line."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["hostname"] = []
        self["bridge"] = []
        self["bridge-tap"] = []
        self["fabric"] = []

    def parseOptions(self, options=None) -> None:
        #: The options as given: the workers of --workers parse them alike.
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def postOptions(self) -> None:
        """
        Check what options say together: C{--metrics-public} needs C{--metrics};
        with C{--workers} every C{--listen} must be an endpoint the workers can
        share; C{--users}/C{--users-file} become C{users-url}.
        """
        super().postOptions()
        if self["metrics-public"] and not self["metrics"]:
            raise usage.UsageError("--metrics-public needs --metrics ENDPOINT")
        if self["workers"] > 1:
            from sevpn.reuseport import ListenError, parse_endpoint

            for description in self["listen"]:
                try:
                    parse_endpoint(description)
                except ListenError as e:
                    raise usage.UsageError(str(e))
        from sevpn.users import StateError, users_location

        try:
            self["users-url"] = users_location(self["users"], self["users-file"])
        except StateError as e:
            raise usage.UsageError(str(e))

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, e.g. tcp:5555 or tcp6:5555 (repeatable; default: IPv6 and IPv4 on 5555)."""
        self["listen"].append(check_listen(description))

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

    # the node's fabric -------------------------------------------------------

    def opt_fabric(self, text: str) -> None:
        """HUB=VNI: put virtual hub HUB into the node's fabric as VXLAN VNI (repeatable; 'sevpn fabric up' first)."""
        from sevpn.fabric import FabricError, parse_fabric_option

        try:
            hub, vni = parse_fabric_option(text)
        except FabricError as e:
            raise usage.UsageError(str(e))
        if any(hub == h or vni == v for h, v in self["fabric"]):
            raise usage.UsageError(f"--fabric {text}: virtual hub {hub} or VNI {vni} is in the fabric twice")
        self["fabric"].append((hub, vni))


def makeService(config: Options) -> IService:
    """
    The hub's service from its options: one L{HubService}, which with
    C{--workers N} is the main process that starts and watches the others.
    """
    from sevpn.hubservice import HubService

    workers = config["workers"]
    role = None
    if workers > 1:
        from sevpn.fabric import Segment
        from sevpn.workers import MainRole

        # a virtual hub in the fabric has its fabric port as its backplane (sevpn.backplane)
        role = MainRole(workers, config.argv, segments=[Segment(hub, vni) for hub, vni in config["fabric"]])
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
            "max_sessions": max(1, config["max-sessions"] // workers),
            "max_sessions_per_user": config["max-sessions-per-user"],
            "max_macs_per_session": config["max-macs"],
            # the node's bound, shared by its workers
            "resume_memory": (config["resume-memory"] << 20) // workers,
            "allow_mac_moves": bool(config["allow-mac-moves"]),
        },
        metrics=config["metrics"],
        metrics_public=config["metrics-public"],
        bridges=config["bridge"],
        bridge_taps=config["bridge-tap"],
        bridge_force=config["bridge-force"],
        fabric=config["fabric"],
        role=role,
        udp=not config["no-udp"],
        udp_mode="always" if config["udp-always"] else "auto",
        udp_listen=config["udp-listen"],
        users=config["users-url"],
        users_settings={"grace": config["users-grace"]} if config["users-url"] else None,
    )
