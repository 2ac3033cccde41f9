"""
The card's accounts: the connection manager's dial-up entries, like
SoftEther's: where to connect and as whom, picked by name.

Each account is C{STATE/accounts/NAME.json}, 0600, because it holds the
password the card must present to the hub, or instead the paths of a
client certificate and its key (L{Account.cert_file}, L{Account.key_file}:
the key stays in its own 0600 file, not copied into the account).  It pins the hub's CA: the
SHA-256 fingerprint of the CA file's certificate when the account was
saved, so that a CA file replaced later is refused, not trusted.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

from sevpn import defaults
from sevpn import wire
from sevpn.files import StateDir, ensure_dir, os_error, read_json, write_json
from sevpn.users import DEFAULT_HUB, StateError, check_name

DEFAULT_PORT = defaults.PORT


def parse_hub_address(text: str) -> Tuple[str, int]:
    """C{HOST:PORT}, C{[V6]:PORT} or C{HOST} (port 5555)."""
    text = (text or "").strip()
    host, port = text, str(DEFAULT_PORT)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise StateError(f"{text!r} is not a hub address (expected HOST:PORT)")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise StateError(f"{text!r} is not a hub address (expected [ADDRESS]:PORT)")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StateError(f"{text!r} is not a hub address (expected HOST:PORT, e.g. vpn.example.org:5555)")
    return host, int(port)


@dataclass
class Account:
    """
    One connection entry of the card: which hub and virtual hub to dial, as
    which user, and how to trust the hub (its CA, pinned by fingerprint).
    Checked as it is built, so a bad entry is refused with a sentence.
    """

    name: str
    hub: str
    user: str
    #: None when the card logs in with a client certificate instead.
    password: Optional[str]
    ca_file: str
    hub_name: str = DEFAULT_HUB
    server_name: Optional[str] = None
    auto_reconnect: bool = True
    #: C{http://[user:pass@]host:port} or C{socks5://...}: reach the hub through this proxy.
    proxy: Optional[str] = None
    #: More nodes of the same hub (a fabric), tried in order after C{hub}.
    more_hubs: List[str] = field(default_factory=list)
    #: The card's interface while this account is connected (see
    #: L{sevpn.netconfig}): addresses (ADDRESS/PREFIX), MTU, DHCP.  Account
    #: files from before these fields load with none of them.
    address: List[str] = field(default_factory=list)
    mtu: Optional[int] = None
    dhcp: bool = False
    #: The pinned CA certificate's SHA-256 fingerprint (L{sevpn.pki.fingerprint}); None: not pinned.
    ca_sha256: Optional[str] = None
    #: A client certificate (PEM) signed by the hub's CA, and its key (a
    #: 0600 PEM file), presented over TLS to log in without a password.
    cert_file: Optional[str] = None
    key_file: Optional[str] = None

    def __post_init__(self) -> None:
        check_name("account", self.name)
        check_name("virtual hub", self.hub_name)
        check_name("user", self.user)
        if (self.cert_file is None) != (self.key_file is None):
            raise StateError(f"account {self.name}: give both a certificate file and its key file")
        if (self.password is None) == (self.cert_file is None):
            raise StateError(f"account {self.name}: give either a password or a certificate and key, "
                             f"{'not both' if self.password is not None else 'none is given'}")
        if self.password is not None and not isinstance(self.password, str):
            raise StateError(f"account {self.name}: the password must be text")
        self.host, self.port = parse_hub_address(self.hub)
        #: Every node to dial, in order: (address as given, host, port).
        self.nodes = [(self.hub, self.host, self.port)] + [(a, *parse_hub_address(a)) for a in self.more_hubs]
        if self.proxy:
            from sevpn.proxy import parse_proxy_url

            try:
                parse_proxy_url(self.proxy)
            except ValueError as e:
                raise StateError(str(e))
        self.address = [str(a) for a in self.interface().addresses]

    def interface(self):
        """The account's interface settings as an L{sevpn.netconfig.InterfaceConfig}; StateError if unusable."""
        from sevpn.netconfig import ConfigError, InterfaceConfig

        try:
            return InterfaceConfig.parse(self.address or (), self.mtu, self.dhcp, where="address", mtu_where="mtu")
        except ConfigError as e:
            raise StateError(f"account {self.name}: {e}")

    @property
    def verify_name(self) -> str:
        return self.server_name or self.host

    @property
    def hubs_text(self) -> str:
        """The nodes, for a log line: C{a:5555} or C{a:5555 (then b:5555)}."""
        more = ", ".join(self.more_hubs)
        return f"{self.hub} (then {more})" if more else self.hub

    @property
    def credential(self) -> str:
        """How the card logs in, for a person: C{password} or C{certificate FILE}."""
        return f"certificate {self.cert_file}" if self.cert_file else "password"

    def public(self) -> dict:
        """The account without its secrets (the password, the proxy's password)."""
        info = asdict(self)
        info.pop("password")
        if self.proxy:
            from sevpn.proxy import parse_proxy_url

            info["proxy"] = parse_proxy_url(self.proxy).describe()
        return info


class AccountStore:
    """The card's accounts in C{STATE/accounts/}, one 0600 JSON file each."""

    def __init__(self, state_dir: str) -> None:
        self.state = StateDir(state_dir)
        self.directory = os.path.join(state_dir, "accounts")

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, check_name("account", name) + ".json")

    def save(self, account: Account) -> None:
        """Write the account's file (0600: it may hold the password), replacing one of the same name."""
        self.state.create()
        ensure_dir(self.directory)
        data = asdict(account)
        write_json(self._path(account.name), data, mode=0o600)

    def get(self, name: str) -> Account:
        """The account called C{name}; L{StateError} naming the fix if it is missing or damaged."""
        path = self._path(name)
        data = read_json(path, None, "account")
        if data is None:
            raise StateError(f"there is no account named {name} (see 'sevpn account list')")
        try:
            if not isinstance(data, dict) or data.get("name") != name:
                raise ValueError("it is not this account's entry")
            return Account(**data)
        except (TypeError, ValueError, AttributeError, StateError) as e:
            raise StateError(
                f"the account file {path} is damaged ({e}): run 'sevpn account delete {name}' and add it again"
            )

    def names(self) -> List[str]:
        try:
            files = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise os_error(e, "read the accounts in")
        return sorted(f[:-5] for f in files if f.endswith(".json") and wire.valid_name(f[:-5]))

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            raise StateError(f"there is no account named {name}")
        except OSError as e:
            raise os_error(e, "delete")
