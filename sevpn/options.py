"""
Command-line options of C{twistd sevpn-hub} and C{twistd sevpn-nic}, and
the services they make.  The twistd plugins only point here.
"""

from __future__ import annotations

from twisted.python import usage

from sevpn.accounts import Account
from sevpn.mac import InvalidMAC, parse_mac
from sevpn.timing import KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, Keepalive
from sevpn.users import DEFAULT_HUB, StateError, read_password_file


def _positive(kind):
    def convert(text):
        value = kind(text)
        if value < 0:
            raise ValueError(f"{text} must not be negative")
        return value

    return convert


class _Common(usage.Options):
    def _keepalive(self) -> Keepalive:
        try:
            return Keepalive(
                (self["keepalive-min"], self["keepalive-max"]), timeout=self["keepalive-timeout"]
            )
        except ValueError as e:
            raise usage.UsageError(str(e))


_COMMON_PARAMS = [
    ["resume-window", None, 60.0, "Seconds a broken session is held for resumption (0: never).", _positive(float)],
    ["resume-buffer", None, 64, "MiB of frames held per session and direction for resumption.", _positive(int)],
    ["keepalive-min", None, KEEPALIVE_INTERVAL[0], "Least seconds of silence before a NULL packet.", _positive(float)],
    ["keepalive-max", None, KEEPALIVE_INTERVAL[1], "Most seconds of silence before a NULL packet.", _positive(float)],
    ["keepalive-timeout", None, KEEPALIVE_TIMEOUT, "Seconds without a word from the peer before it is gone.", _positive(float)],
]


class HubOptions(_Common):
    synopsis = "[options]"
    longdesc = "Run a sevpn virtual HUB: a TLS server with one Ethernet switch per virtual hub."
    optParameters = [
        ["state-dir", "d", "/var/lib/sevpn/hub", "Where the hub keeps its CA, certificates and users."],
        ["mac-age", None, 300.0, "Seconds before an unused MAC table entry is forgotten.", _positive(float)],
    ] + _COMMON_PARAMS

    def __init__(self):
        super().__init__()
        self["listen"] = []
        self["hostname"] = []

    def opt_listen(self, description):
        """Endpoint to listen on, e.g. tcp:5555 or tcp6:port=5555 (repeatable; default tcp:5555)."""
        self["listen"].append(description)

    def opt_hostname(self, name):
        """A DNS name or IP address cards use to reach this hub (repeatable)."""
        self["hostname"].append(name)

    def postOptions(self):
        self["keepalive"] = self._keepalive()


class CardOptions(_Common):
    synopsis = "[options]"
    longdesc = (
        "Run a sevpn virtual LAN card: a TAP device whose frames cross a virtual HUB. "
        "Connect with --account NAME, with --hub/--user/--password-file/--ca-file, "
        "or later with 'sevpn nic connect NAME'."
    )
    optParameters = [
        ["state-dir", "d", "/var/lib/sevpn/nic", "Where the card keeps its MAC and accounts."],
        ["tap", "i", "sevpn0", "Name of the TAP device to create."],
        ["account", "a", None, "Connect with this saved account at start."],
        ["hub", None, None, "The hub's address, HOST:PORT."],
        ["hub-name", None, DEFAULT_HUB, "The virtual hub to join."],
        ["user", "u", None, "User name on the virtual hub."],
        ["password-file", None, None, "File whose first line is the password ('-' for standard input)."],
        ["ca-file", None, None, "The hub's CA certificate (the hub's STATE/ca.pem)."],
        ["server-name", None, None, "The name to verify in the hub's certificate (default: the host of --hub)."],
        ["mac", None, None, "Use this MAC instead of the card's own generated one."],
    ] + _COMMON_PARAMS
    optFlags = [
        ["no-auto-reconnect", None, "Do not reconnect after the link fails."],
        ["no-offload", None, "Open the TAP without kernel offload (no 64 KiB super-frames; slower)."],
    ]

    def postOptions(self):
        self["keepalive"] = self._keepalive()
        if self["mac"]:
            try:
                self["mac"] = parse_mac(self["mac"])
            except InvalidMAC as e:
                raise usage.UsageError(str(e))
        self["connect"] = self["account"]
        flags = [self[k] for k in ("hub", "user", "password-file", "ca-file")]
        if any(flags):
            if self["account"]:
                raise usage.UsageError("give either --account or --hub/--user/--password-file/--ca-file, not both")
            missing = [f"--{k}" for k in ("hub", "user", "password-file", "ca-file") if not self[k]]
            if missing:
                raise usage.UsageError("to connect at start also give " + ", ".join(missing))
            try:
                password = read_password_file(self["password-file"]).decode("utf-8")
                self["connect"] = Account(
                    name="command-line",
                    hub=self["hub"],
                    user=self["user"],
                    password=password,
                    ca_file=self["ca-file"],
                    hub_name=self["hub-name"],
                    server_name=self["server-name"],
                    auto_reconnect=not self["no-auto-reconnect"],
                )
            except (StateError, UnicodeDecodeError) as e:
                raise usage.UsageError(str(e))


def make_hub_service(options: HubOptions):
    from sevpn.services import HubService

    return HubService(
        state_dir=options["state-dir"],
        listen=options["listen"] or ["tcp:5555"],
        hostnames=options["hostname"],
        resume_window=options["resume-window"],
        keepalive=options["keepalive"],
        buffer_limit=options["resume-buffer"] * 1024 * 1024,
        max_age=options["mac-age"],
    )


def make_card_service(options: CardOptions):
    from sevpn.services import CardService

    return CardService(
        state_dir=options["state-dir"],
        tap_name=options["tap"],
        account=options["connect"],
        mac=options["mac"],
        keepalive=options["keepalive"],
        resume_window=options["resume-window"],
        buffer_limit=options["resume-buffer"] * 1024 * 1024,
        offload=not options["no-offload"],
    )
