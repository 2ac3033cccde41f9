"""
C{twistd sevpn-nic}: the virtual LAN card's command line and service.
"""

from __future__ import annotations

import os

from twisted.application.service import IService
from twisted.python import usage

from sevpn import defaults
from sevpn.accounts import Account
from sevpn.mac import InvalidMAC, parse_mac
from sevpn.options import CommonOptions
from sevpn.users import StateError, read_password_file

#: The flags that together make an account on the command line (with a
#: password file, or a certificate and key file).
_ACCOUNT_FLAGS = ("hub", "user", "ca-file")
_CREDENTIAL_FLAGS = ("password-file", "cert-file", "key-file")


class Options(CommonOptions):
    """C{twistd sevpn-nic}'s options; each option's text is its help line (C{longdesc} the command's)."""

    synopsis = "[options]"
    longdesc = (
        "Run a sevpn virtual LAN card: a TAP device whose frames cross a virtual HUB. "
        "Connect with --account NAME, with --hub/--user/--ca-file and --password-file "
        "(or --cert-file/--key-file), "
        "or later with 'sevpn nic connect NAME'."
    )
    optParameters = [
        ["state-dir", "d", None, "Where the card keeps its MAC and accounts (default /var/lib/sevpn/nic-TAP)."],
        ["tap", "i", defaults.TAP_NAME, "Name of the TAP device to create."],
        ["account", "a", None, "Connect with this saved account at start."],
        ["hub-name", None, defaults.VIRTUAL_HUB, "The virtual hub to join."],
        ["user", "u", None, "User name on the virtual hub."],
        ["password-file", None, None, "File whose first line is the password ('-' for standard input)."],
        ["ca-file", None, None, "The hub's CA certificate (the hub's STATE/ca.pem)."],
        ["cert-file", None, None, "Log in with this client certificate (PEM, signed by the hub's CA) "
         "instead of a password."],
        ["key-file", None, None, "The key of --cert-file (PEM, mode 0600)."],
        ["server-name", None, None, "The name to verify in the hub's certificate (default: the host of --hub)."],
        ["mac", None, None, "Use this MAC instead of the card's own generated one."],
        ["proxy", None, None, "Reach the hub through this proxy: http://[user:pass@]host:port or socks5://..."],
        ["mtu", None, None, "Set the TAP's MTU.", int],
    ]
    optFlags = [
        ["no-auto-reconnect", None, "Do not reconnect after the link fails."],
        ["no-offload", None, "Open the TAP without kernel offload (no 64 KiB super-frames; slower)."],
        ["dhcp", None, "Get an address by DHCP (dhclient) once connected; released when the card stops."],
        ["no-udp", None, "Never use a UDP channel: frames always go over TLS/TCP."],
        ["udp-always", None, "Send frames over the UDP channel whenever it works, not only on a lossy line."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["hub"] = None
        self["more-hubs"] = []
        self["address"] = []

    def opt_hub(self, address: str) -> None:
        """The hub's address, HOST:PORT; repeat it for the other nodes of a fabric, tried in turn."""
        if self["hub"]:
            self["more-hubs"].append(address)
        else:
            self["hub"] = address

    def opt_address(self, text: str) -> None:
        """ADDRESS/PREFIX (IPv4 or IPv6) to set on the TAP at start (repeatable)."""
        self["address"].append(text)

    def postOptions(self) -> None:
        """
        Check the options before anything touches the TAP: the interface
        settings, the MAC, and an account given on the command line, which
        becomes an L{Account} named C{command-line} (its CA pinned, its
        certificate or password read now) to connect with at start.
        """
        super().postOptions()
        self._interface()
        if not self["state-dir"]:
            self["state-dir"] = defaults.card_state_dir(self["tap"])
        if self["mac"]:
            try:
                self["mac"] = parse_mac(self["mac"])
            except InvalidMAC as e:
                raise usage.UsageError(str(e))
        self["connect"] = self["account"]
        if any(self[k] for k in _ACCOUNT_FLAGS + _CREDENTIAL_FLAGS):
            if self["account"]:
                raise usage.UsageError("give either --account or --hub/--user/--ca-file/--password-file, not both")
            if self["password-file"] and (self["cert-file"] or self["key-file"]):
                raise usage.UsageError("give either --password-file or --cert-file/--key-file, not both")
            missing = [f"--{k}" for k in ("hub", "user") if not self[k]]
            if self["cert-file"] or self["key-file"]:
                missing += [f"--{k}" for k in ("cert-file", "key-file") if not self[k]]
            elif not self["password-file"]:
                missing.append("--password-file (or --cert-file and --key-file)")
            missing += [] if self["ca-file"] else ["--ca-file"]
            if missing:
                raise usage.UsageError("to connect at start also give " + ", ".join(missing))
            try:
                from sevpn.pki import fingerprint, load_ca_file, load_client_identity

                pinned = fingerprint(load_ca_file(self["ca-file"]))
                password = cert_file = key_file = None
                if self["cert-file"]:
                    load_client_identity(self["cert-file"], self["key-file"])  # a mistake is said now
                    cert_file, key_file = os.path.abspath(self["cert-file"]), os.path.abspath(self["key-file"])
                else:
                    password = read_password_file(self["password-file"]).decode("utf-8")
                self["connect"] = Account(
                    name="command-line",
                    hub=self["hub"],
                    user=self["user"],
                    password=password,
                    cert_file=cert_file,
                    key_file=key_file,
                    ca_file=self["ca-file"],
                    hub_name=self["hub-name"],
                    server_name=self["server-name"],
                    auto_reconnect=not self["no-auto-reconnect"],
                    proxy=self["proxy"],
                    more_hubs=self["more-hubs"],
                    ca_sha256=pinned,
                )
            except StateError as e:
                raise usage.UsageError(f"{e}")
            except UnicodeDecodeError:
                raise usage.UsageError(f"--password-file {self['password-file']}: the password must be UTF-8 text")

    def _interface(self) -> None:
        """The TAP's name and settings, checked before anything touches /dev/net/tun."""
        from sevpn.fabric import FabricError, check_ifname
        from sevpn.netconfig import ConfigError, InterfaceConfig

        try:
            check_ifname(self["tap"], "--tap")
            self["interface"] = InterfaceConfig.parse(self["address"], self["mtu"], self["dhcp"])
        except (FabricError, ConfigError) as e:
            raise usage.UsageError(str(e))


def makeService(config: Options) -> IService:
    """The card's service (L{CardService}) from its options."""
    from sevpn.cardservice import CardService

    return CardService(
        state_dir=config["state-dir"],
        tap_name=config["tap"],
        account=config["connect"],
        mac=config["mac"],
        keepalive=config["keepalive"],
        busy_poll=config["busy-poll"] / 1e6,
        resume_window=config["resume-window"],
        buffer_limit=config["resume-buffer-bytes"],
        offload=not config["no-offload"],
        interface=config["interface"],
        udp=not config["no-udp"],
        udp_mode="always" if config["udp-always"] else "auto",
    )
