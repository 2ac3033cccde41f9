"""
The card as a Twisted service: where the card's policy (L{sevpn.card.Card})
meets the real world: its state dir, its TAP device, TLS connections to
hubs and the control socket.
"""

from __future__ import annotations

from typing import Optional

from twisted.application.service import Service
from twisted.logger import Logger

from sevpn import busypoll, control, defaults, proxy
from sevpn.accounts import Account, AccountStore
from sevpn.card import Card, NicSide
from sevpn.files import ensure_dir
from sevpn.mac import format_mac, load_or_create_mac
from sevpn.pki import client_tls_options
from sevpn.runtime import fatal, reactor_or_global
from sevpn.sdnotify import notify
from sevpn.sequencing import DEFAULT_LIMIT
from sevpn.timing import Keepalive
from sevpn.tls import TLSClientEndpoint
from sevpn.users import StateError


def tls_endpoint_for(reactor):
    """
    How a card reaches a hub: TCP (through the account's proxy, if any),
    then TLS end to end, verified against the CA file; one endpoint per
    node the account lists, dialled in turn.
    """

    def endpoint_for(account: Account):
        endpoints = []
        for _, host, port in account.addresses:
            try:
                options = client_tls_options(account.ca_file, account.server_name or host)
            except OSError as e:
                raise StateError(f"cannot read the CA file {account.ca_file}: {e.strerror}")
            except Exception as e:
                raise StateError(f"the CA file {account.ca_file} holds no usable certificate ({e})")
            endpoints.append(TLSClientEndpoint(options, proxy.endpoint_for(reactor, account.proxy, host, port)))
        return endpoints

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
        busy_poll: float = busypoll.WINDOW,
        reactor=None,
    ) -> None:
        self.busy_poll = busy_poll
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

        reactor = reactor_or_global(self.reactor)
        busypoll.install(reactor, self.busy_poll)
        try:
            ensure_dir(self.state_dir)
            account = self.account
            if isinstance(account, str):
                account = AccountStore(self.state_dir).get(account)
            mac = self.mac or load_or_create_mac(self.state_dir)
            self.tap = TapPort(self.tap_name, mac, reactor, self.offload)
            card = Card(
                reactor,
                NicSide(self.tap),
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
        notify("READY=1", f"STATUS=TAP {self.tap.name} up, MAC {format_mac(self.card.mac)}; "
               + (f"connecting to hub {self.card.account.hub}" if self.card.account is not None else "not connected"))

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
        busypoll.uninstall()
        notify("STOPPING=1")
        Service.stopService(self)
        if self.card is None:
            return None
        d = self.card.disconnect("the card is shutting down")
        d.addBoth(lambda _: self._close())
        return d
