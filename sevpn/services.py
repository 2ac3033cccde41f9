"""
Wiring: the hub and the card as Twisted services.

Here the policies (L{sevpn.hub.Hub}, L{sevpn.card.Card}) meet the real
world: TLS endpoints, the TAP device, the control socket.  The reactor is
a parameter; the global one is only looked up when none is given.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Iterable, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import gatherResults, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.internet.endpoints import HostnameEndpoint, serverFromString
from twisted.logger import Logger

from sevpn import control, defaults
from sevpn.accounts import Account, AccountStore
from sevpn.card import Card
from sevpn.files import ensure_dir
from sevpn.hub import Hub
from sevpn.hublink import HubLinkFactory
from sevpn.mac import format_mac, load_or_create_mac
from sevpn.pki import client_tls_options, ensure_pki, server_tls_options
from sevpn.sequencing import DEFAULT_LIMIT
from sevpn.switch import DEFAULT_MAX_AGE
from sevpn.timing import Keepalive
from sevpn.tls import TLSClientEndpoint, TLSFactory
from sevpn.users import HubState, StateError


def _reactor(reactor):
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        return global_reactor
    return reactor


def release_large_blocks() -> None:
    """
    Make glibc return large freed blocks to the OS.  Each password check
    (scrypt) takes 16 MiB in a pool thread; with glibc's adaptive mmap
    threshold those blocks would stay resident in every thread's arena
    (~170 MiB after a login storm instead of ~10).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, fixed
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def fatal(what: str, message: str) -> SystemExit:
    """An error a user must fix: one sentence on stderr, exit status 1."""
    Logger().critical("{message}", message=message)
    return SystemExit(f"{what}: {message}")


class HubService(Service):
    log = Logger()

    def __init__(
        self,
        state_dir: str = defaults.HUB_STATE_DIR,
        listen: Sequence[str] = defaults.LISTEN,
        hostnames: Iterable[str] = (),
        resume_window: float = defaults.RESUME_WINDOW,
        keepalive: Optional[Keepalive] = None,
        buffer_limit: int = DEFAULT_LIMIT,
        max_age: float = DEFAULT_MAX_AGE,
        reactor=None,
    ) -> None:
        self.state_dir = state_dir
        self.listen = list(listen) or list(defaults.LISTEN)
        self.hostnames = list(hostnames)
        self.resume_window = resume_window
        self.keepalive = keepalive or Keepalive()
        self.buffer_limit = buffer_limit
        self.max_age = max_age
        self.reactor = reactor
        self.hub: Optional[Hub] = None
        self.ports = []
        self.control_port = None

    def startService(self) -> None:
        reactor = _reactor(self.reactor)
        release_large_blocks()
        try:
            ensure_dir(self.state_dir)
            state = HubState(self.state_dir)
            state.ensure_default()
            cert, key = ensure_pki(self.state_dir, self.hostnames)
            self.hub = Hub(
                state, reactor, resume_window=self.resume_window, buffer_limit=self.buffer_limit,
                max_age=self.max_age, verify=partial(deferToThreadPool, reactor, reactor.getThreadPool()),
            )
            self.hub.start()
            self.links = HubLinkFactory(self.hub, reactor, self.keepalive)
            factory = TLSFactory(server_tls_options(cert, key), False, self.links)
            for description in self.listen:
                result = []
                serverFromString(reactor, description).listen(factory).addBoth(result.append)
                if not result or not hasattr(result[0], "stopListening"):
                    why = result[0].getErrorMessage() if result else "no answer"
                    raise StateError(f"cannot listen on {description}: {why}")
                self.ports.append(result[0])
            self.control_port = control.listen(
                reactor,
                self.state_dir,
                {
                    "sessions": self.hub.describe_sessions,
                    "macs": self.hub.describe_macs,
                    "status": self.status,
                },
            )
        except (StateError, control.ControlError, OSError, ValueError) as e:
            self._close()
            raise fatal("sevpn-hub", str(e))
        Service.startService(self)
        self.log.info(
            "hub running: listening on {listen}, virtual hubs {hubs}, CA certificate {ca}",
            listen=", ".join(self.listen), hubs=", ".join(state.hubs()), ca=os.path.join(self.state_dir, "ca.pem"),
        )

    def status(self) -> dict:
        hub = self.hub
        return {
            "listen": self.listen,
            "virtual_hubs": hub.state.hubs(),
            "sessions": len(hub.sessions),
            "refusals": hub.refusals,
            "handshaking": self.links.handshaking,
            "turned_away": self.links.turned_away,
            "resume_window": hub.resume_window,
        }

    def _close(self) -> list:
        """Stop listening; return Deferreds that fire when the ports are closed."""
        ports = self.ports + ([self.control_port] if self.control_port is not None else [])
        self.ports, self.control_port = [], None
        return [maybeDeferred(port.stopListening) for port in ports]

    def stopService(self):
        """Say goodbye to every card, waiting at most two seconds for it."""
        Service.stopService(self)
        links = self.hub.shutdown() if self.hub is not None else []
        closing = self._close()
        goodbyes = gatherResults([link.when_closed() for link in links])
        goodbyes.addTimeout(2, _reactor(self.reactor))
        done = gatherResults([goodbyes.addErrback(lambda _: None)] + closing)
        done.addBoth(lambda _: self.log.info("hub stopped"))
        return done


def tls_endpoint_for(reactor):
    """How a card reaches a hub: TCP, then TLS verified against the CA file."""

    def endpoint_for(account: Account):
        try:
            options = client_tls_options(account.ca_file, account.verify_name)
        except OSError as e:
            raise StateError(f"cannot read the CA file {account.ca_file}: {e.strerror}")
        except Exception as e:
            raise StateError(f"the CA file {account.ca_file} holds no usable certificate ({e})")
        return TLSClientEndpoint(options, HostnameEndpoint(reactor, account.host, account.port, timeout=10))

    return endpoint_for


class CardService(Service):
    log = Logger()

    def __init__(
        self,
        state_dir: str = defaults.CARD_STATE_DIR,
        tap_name: str = defaults.TAP_NAME,
        account=None,
        mac: Optional[bytes] = None,
        keepalive: Optional[Keepalive] = None,
        resume_window: float = defaults.RESUME_WINDOW,
        buffer_limit: int = DEFAULT_LIMIT,
        offload: bool = True,
        reactor=None,
    ) -> None:
        self.state_dir = state_dir
        self.tap_name = tap_name
        self.offload = offload
        self.account = account  # an Account, an account name, or None
        self.mac = mac
        self.keepalive = keepalive or Keepalive()
        self.resume_window = resume_window
        self.buffer_limit = buffer_limit
        self.reactor = reactor
        self.card: Optional[Card] = None
        self.tap = None
        self.control_port = None

    def startService(self) -> None:
        from sevpn.tapdevice import TapError, TapPort

        reactor = _reactor(self.reactor)
        try:
            ensure_dir(self.state_dir)
            account = self.account
            if isinstance(account, str):
                account = AccountStore(self.state_dir).get(account)
            mac = self.mac or load_or_create_mac(self.state_dir)
            self.tap = TapPort(self.tap_name, mac, reactor, self.offload)
            card = Card(
                reactor,
                self.tap,
                mac,
                tls_endpoint_for(reactor),
                keepalive=self.keepalive,
                resume_window=self.resume_window,
                buffer_limit=self.buffer_limit,
            )
            self.tap.start_reading()
            self.card = card
            self.control_port = control.listen(
                reactor,
                self.state_dir,
                {"status": card.status, "connect": self._connect, "disconnect": self._disconnect},
            )
            self.log.info(
                "card {tap} ready with MAC {mac}: cable unplugged until connected",
                tap=self.tap.name, mac=format_mac(mac),
            )
            if account is not None:
                card.connect(account)
        except (StateError, TapError, control.ControlError, OSError, ValueError) as e:
            self._close()
            raise fatal("sevpn-nic", str(e))
        Service.startService(self)

    def _connect(self, account: str) -> dict:
        try:
            self.card.connect(AccountStore(self.state_dir).get(account))
        except StateError as e:
            raise control.ControlError(str(e))
        return self.card.status()

    def _disconnect(self):
        return self.card.disconnect().addCallback(lambda _: self.card.status())

    def _close(self):
        if self.control_port is not None:
            self.control_port.stopListening()
            self.control_port = None
        if self.tap is not None:
            self.tap.close()
            self.tap = None

    def stopService(self):
        Service.stopService(self)
        if self.card is None:
            return None
        d = self.card.disconnect("the card is shutting down")
        d.addBoth(lambda _: self._close())
        return d

