"""
Cascades: a virtual hub of this hub joined to a virtual hub of another
hub, as SoftEther's cascade connections join two sites into one Ethernet
segment.

A cascade dials the other hub I{as a card would}: it is a
L{sevpn.card.Card} (the same handshake, keepalive, reconnecting forever,
zero-loss resumption within the resume window) whose LAN side
(L{sevpn.card.ILanSide}) is not a TAP but the local virtual hub
(L{HubSide}): the session's port is plugged into the local switch like any
other port, with room for a whole LAN's MACs.  On the other hub the
cascade is a session of a user the operator marked as a cascade user
(C{"cascade": true} in users.json, see L{sevpn.hub.Hub}); it asks for it
with the hello feature C{"cascade"}.  Loops of cascades are found and
broken by L{sevpn.loops.LoopGuard}.

Each cascade is C{STATE/cascades/NAME.json}, 0600 (it holds the password
it presents).  The C{sevpn hub cascade} commands edit these files with or
without a running hub; a running hub reads the directory at start and
again when poked over its control socket (L{CascadeManager.reload}).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from sevpn import wire
from sevpn.accounts import Account, parse_hub_address
from sevpn.card import REFUSED, Card, ILanSide
from sevpn.files import ensure_dir, read_json, write_json
from sevpn.loops import LoopGuard
from sevpn.mac import InvalidMAC, parse_mac
from sevpn.port import Port
from sevpn.switch import VirtualHub
from sevpn.timing import Keepalive
from sevpn.users import StateError, check_name

DIRECTORY = "cascades"
#: Counters every cascade row carries, 0 while it has no session.
COUNTERS = (
    "frames_in", "frames_out", "bytes_in", "bytes_out", "resumes", "frames_buffered", "frames_retransmitted",
    "frames_dropped", "congestion_drops", "bad_frames", "macs", "reconnects",
)


@dataclass
class CascadeConfig:
    """
    One cascade: which local virtual hub, which remote hub and virtual
    hub, as whom, and how the remote hub's certificate is checked.
    """

    name: str
    #: The local virtual hub.
    hub_name: str
    #: The remote hub's C{HOST:PORT}.
    to: str
    #: The virtual hub on the remote hub.
    remote_hub: str
    user: str
    password: str
    ca_file: str
    server_name: Optional[str] = None
    #: The MAC the cascade names in its hello: stable, so that after a
    #: restart of this hub the remote hub replaces the held session at once.
    mac: Optional[str] = None

    def __post_init__(self) -> None:
        check_name("cascade", self.name)
        check_name("virtual hub", self.hub_name)
        check_name("virtual hub", self.remote_hub)
        check_name("user", self.user)
        parse_hub_address(self.to)
        if not isinstance(self.password, str) or not self.password:
            raise StateError(f"cascade {self.name} has no password")
        if self.mac is not None:
            try:
                parse_mac(self.mac)
            except InvalidMAC as e:
                raise StateError(f"cascade {self.name}: {e}")

    def account(self) -> Account:
        """The cascade as the card's dial-up entry."""
        return Account(
            name=self.name, hub=self.to, user=self.user, password=self.password, ca_file=self.ca_file,
            hub_name=self.remote_hub, server_name=self.server_name,
        )

    def hello_mac(self) -> bytes:
        """
        The MAC for the hello: the configured one, else a locally administered
        unicast MAC derived from the cascade's name, so it stays the same across
        restarts without being stored.
        """
        if self.mac:
            return parse_mac(self.mac)
        digest = bytearray(hashlib.sha256(b"sevpn cascade " + self.name.encode()).digest()[:6])
        digest[0] = (digest[0] & 0xFC) | 0x02
        return bytes(digest)

    def public(self) -> dict:
        info = asdict(self)
        info.pop("password")
        return info


class CascadeStore:
    """The cascade files of a hub's state dir."""

    def __init__(self, state_dir: str) -> None:
        self.directory = os.path.join(state_dir, DIRECTORY)

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, check_name("cascade", name) + ".json")

    def save(self, config: CascadeConfig) -> None:
        ensure_dir(self.directory)
        write_json(self._path(config.name), asdict(config), mode=0o600)

    def get(self, name: str) -> CascadeConfig:
        try:
            data = read_json(self._path(name), None)
        except (OSError, ValueError) as e:
            raise StateError(f"cannot read the cascade file of {name}: {e}")
        if data is None:
            raise StateError(f"there is no cascade named {name} (see 'sevpn hub cascade list')")
        try:
            return CascadeConfig(**data)
        except TypeError:
            raise StateError(f"the cascade file of {name} is damaged; delete and add it again")

    def names(self) -> List[str]:
        try:
            files = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(f[:-5] for f in files if f.endswith(".json") and wire.valid_name(f[:-5]))

    def load(self) -> Tuple[Dict[str, CascadeConfig], Dict[str, str]]:
        """Every cascade, and a sentence for each file that cannot be used."""
        configs, errors = {}, {}
        for name in self.names():
            try:
                configs[name] = self.get(name)
            except StateError as e:
                errors[name] = str(e)
        return configs, errors

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            raise StateError(f"there is no cascade named {name}")


@implementer(ILanSide)
class HubSide:
    """
    A cascade's LAN side: the local virtual hub.  The session's port is
    plugged into its switch with room for a whole LAN's MACs, and the loop
    guard keeps it blocked until it knows the port closes no loop.
    """

    offload = True  # super-frames cross the cascade whole; each port converts for itself

    def __init__(self, name: str, vhub: VirtualHub, guard: LoopGuard) -> None:
        self.name = f"cascade:{name}"
        self.cascade = name
        self.vhub = vhub
        self.guard = guard
        self.carrier = False
        self.port: Optional[Port] = None

    def set_carrier(self, on: bool) -> None:
        self.carrier = on

    def plug(self, port: Port) -> None:
        """
        Plug the session's port into the local virtual hub, named after the
        cascade and allowed the switch's whole table of MACs, and register it
        with the loop guard (which keeps it blocked until it closes no loop).
        """
        port.name = self.name
        port.max_macs = self.vhub.max_entries
        self.port = port
        self.vhub.add_port(port)
        self.guard.add_cascade(self.vhub, port, self.cascade)

    def unplug(self) -> None:
        port, self.port = self.port, None
        if port is not None:
            self.guard.remove(self.vhub, port)
            self.vhub.remove_port(port)
            port.close()

    def counters(self) -> dict:
        info = {"macs": len(self.port.macs) if self.port is not None else 0}
        info.update(self.guard.describe(self.vhub, self.port) if self.port is not None else {"loop_state": None})
        return info


class Cascade:
    """A configured cascade and the card that carries it."""

    def __init__(self, config: CascadeConfig, card: Optional[Card], error: Optional[str] = None) -> None:
        self.config = config
        self.card = card
        #: Why the cascade cannot dial (a missing virtual hub, an unreadable CA file).
        self.error = error

    def describe(self) -> dict:
        """
        The cascade as a row of the hub's session list (C{"kind": "cascade"}):
        its configuration plus the card's status, every counter present.
        """
        config = self.config
        info = {
            "kind": "cascade",
            "cascade": config.name,
            "hub": config.hub_name,
            "remote": f"{config.remote_hub} at {config.to}",
            "peer": config.to,
            "remote_hub": config.remote_hub,
            "user": config.user,
        }
        if self.card is None:
            info.update({"state": "disconnected", "last_error": self.error, "id": None, "loop_state": None})
        else:
            status = self.card.status()
            for key in ("account", "hub", "hub_name", "tap", "carrier", "mac", "offload"):
                status.pop(key, None)
            status["id"] = status.pop("session")
            info.update(status)
        for key in COUNTERS:
            info.setdefault(key, 0)
        return info


class CascadeManager:
    """
    The cascades of one hub, kept in step with the files in its state dir.

    @param hub: the L{sevpn.hub.Hub} whose virtual hubs the cascades join.
    @param endpoint_for: C{account -> IStreamClientEndpoint}, the hook for
        how a cascade reaches its remote hub: TLS verified against the
        cascade's CA file (L{sevpn.cardservice.tls_endpoint_for}); a
        proxy-aware factory plugs in here.  Raises L{StateError} with a
        sentence if the cascade cannot be dialled.
    """

    log = Logger()

    def __init__(
        self,
        hub,
        state_dir: str,
        endpoint_for: Callable[[Account], object],
        keepalive: Optional[Keepalive] = None,
    ) -> None:
        self.hub = hub
        self.store = CascadeStore(state_dir)
        self.endpoint_for = endpoint_for
        self.keepalive = keepalive or Keepalive()
        self.cascades: Dict[str, Cascade] = {}

    def reload(self) -> dict:
        """
        Read the cascade files again: connect new cascades, reconnect
        changed ones and refused ones, say goodbye to deleted ones.
        Returns the cascades' status and the files that cannot be used.
        """
        configs, errors = self.store.load()
        for name, error in errors.items():
            self.log.error("cascade {name} cannot be used: {why}", name=name, why=error)
        for name in [n for n in self.cascades if n not in configs and n not in errors]:
            self._stop(self.cascades.pop(name), f"cascade {name} was deleted")
            self.log.info("cascade {name} deleted", name=name)
        for name, config in configs.items():
            old = self.cascades.get(name)
            if old is not None and old.config == config and old.error is None and old.card.state != REFUSED:
                continue
            if old is not None:
                self._stop(old, f"cascade {name} was changed")
            self.cascades[name] = self._start(config)
        return {"cascades": self.describe(), "errors": errors}

    def _start(self, config: CascadeConfig) -> Cascade:
        hub = self.hub
        if not hub.state.exists(config.hub_name):
            error = f"there is no virtual hub named {config.hub_name} on this hub"
            self.log.error("cascade {name} cannot be used: {why}", name=config.name, why=error)
            return Cascade(config, None, error)
        side = HubSide(config.name, hub.vhub(config.hub_name), hub.loops)
        card = Card(
            hub.clock, side, config.hello_mac(), self.endpoint_for, keepalive=self.keepalive,
            resume_window=hub.resume_window, buffer_limit=hub.buffer_limit,
            features=frozenset([wire.FEATURE_CASCADE]),
        )
        card.log = Logger(namespace=f"sevpn.cascade.{config.name}", source=card)
        try:
            card.connect(config.account())
        except StateError as e:
            self.log.error("cascade {name} cannot be used: {why}", name=config.name, why=str(e))
            return Cascade(config, None, str(e))
        self.log.info(
            "cascade {name}: virtual hub {local} to virtual hub {remote} at {to} as user {user}",
            name=config.name, local=config.hub_name, remote=config.remote_hub, to=config.to, user=config.user,
        )
        return Cascade(config, card)

    def _stop(self, cascade: Cascade, reason: str) -> Deferred:
        if cascade.card is None:
            return succeed(None)
        return cascade.card.disconnect(reason)

    def stop(self) -> List[Deferred]:
        """Say goodbye on every cascade (the hub shuts down)."""
        cascades, self.cascades = self.cascades, {}
        return [self._stop(c, "the hub is shutting down") for c in cascades.values()]

    def describe(self) -> List[dict]:
        return [self.cascades[name].describe() for name in sorted(self.cascades)]
