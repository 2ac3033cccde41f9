"""
The card as a Twisted service: where the card's policy (L{sevpn.card.Card})
meets the real world: its state dir, its TAP device, TLS connections to
hubs and the control socket.
"""

from __future__ import annotations

import os
from typing import Optional

from twisted.application.service import Service
from twisted.internet.defer import TimeoutError
from twisted.logger import Logger

from sevpn import __version__, busypoll, control, defaults, proxy
from sevpn.accounts import Account, AccountStore
from sevpn.card import Card, NicSide
from sevpn.files import StateDir, os_error
from sevpn.mac import format_mac, load_or_create_mac
from sevpn.netconfig import CardInterface, ConfigError, DhcpClient, InterfaceConfig, ProcessRunner
from sevpn.pki import client_tls_options, fingerprint, load_ca_file, load_client_identity
from sevpn.runtime import fatal, reactor_or_global
from sevpn.sdnotify import notify
from sevpn.sequencing import DEFAULT_LIMIT
from sevpn.timing import Keepalive
from sevpn.tls import TLSClientEndpoint
from sevpn.users import StateError


def tls_endpoint_for(reactor):
    """
    How a card reaches a hub: TCP (through the account's proxy, if any),
    then TLS end to end, verified against the CA file, presenting the
    account's client certificate if it has one; one endpoint per node the
    account lists, dialled in turn.
    """

    def endpoint_for(account: Account):
        if account.ca_sha256 is not None:
            pinned = fingerprint(load_ca_file(account.ca_file))
            if pinned != account.ca_sha256:
                raise StateError(
                    f"the CA file {account.ca_file} changed since account {account.name} was saved "
                    f"(it pinned SHA-256 {account.ca_sha256}, the file now holds {pinned}): if the hub's CA "
                    f"really changed, save the account again with 'sevpn account add'"
                )
        identity = load_client_identity(account.cert_file, account.key_file) if account.cert_file else None
        endpoints = []
        for _, host, port in account.nodes:
            try:
                options = client_tls_options(account.ca_file, account.server_name or host, identity)
            except OSError as e:
                raise StateError(f"cannot read the CA file {account.ca_file}: {e.strerror}")
            except Exception as e:
                raise StateError(f"the CA file {account.ca_file} holds no usable certificate ({e})")
            endpoints.append(TLSClientEndpoint(options, proxy.endpoint_for(reactor, account.proxy, host, port)))
        return endpoints

    return endpoint_for


class ConfiguredNic(NicSide):
    """The card's TAP side, telling its interface settings when the carrier changes (DHCP waits for it)."""

    def __init__(self, tap, interface: CardInterface) -> None:
        super().__init__(tap)
        self.interface = interface

    def set_carrier(self, on: bool) -> None:
        super().set_carrier(on)
        self.interface.carrier_changed(on)


class CardService(Service):
    """
    The virtual LAN card process (C{twistd sevpn-nic}): opens the TAP device
    and the control socket, runs the L{Card} that connects it to a hub, and
    configures the TAP's addresses as the command line and the account say.
    """

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
        interface: Optional[InterfaceConfig] = None,
        udp: bool = True,
        udp_mode: str = "auto",
    ) -> None:
        self.busy_poll = busy_poll
        self.udp = udp
        self.udp_mode = udp_mode
        self.state_dir = state_dir
        #: The TAP's addresses, MTU and DHCP from the command line (accounts may add theirs).
        self.interface_config = interface or InterfaceConfig()
        self.interface: Optional[CardInterface] = None
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
        """
        Bring the card up, cable unplugged: the TAP device, the control socket,
        and a connection if an account was given.  A failure stops the process
        with one sentence (L{fatal}), after closing what was opened.
        """
        from sevpn.tapdevice import TapError, TapPort

        reactor = reactor_or_global(self.reactor)
        busypoll.install(reactor, self.busy_poll)
        try:
            StateDir(self.state_dir).create().check(os.geteuid())
            account = self.account
            if isinstance(account, str):
                account = AccountStore(self.state_dir).get(account)
            # A persistent TAP keeps its own MAC ('sevpn nic create' gives it
            # the card's) unless --mac says otherwise; a TAP made now gets the card's.
            mac = self.mac or load_or_create_mac(self.state_dir)
            self.tap = TapPort(self.tap_name, mac, reactor, self.offload, keep_mac=self.mac is None)
            mac = self.tap.mac
            runner = ProcessRunner(reactor)
            name = self.tap.device_name
            self.interface = CardInterface(
                name, runner, lambda: DhcpClient(name, self.state_dir, runner, reactor),
            )
            card = Card(
                reactor,
                ConfiguredNic(self.tap, self.interface),
                mac,
                tls_endpoint_for(reactor),
                keepalive=self.keepalive,
                resume_window=self.resume_window,
                buffer_limit=self.buffer_limit,
                udp=self._udp(reactor),
                udp_mode=self.udp_mode,
            )
            self.tap.start_reading()
            self.card = card
            self.control_port = control.listen(
                reactor,
                self.state_dir,
                {"status": self._status, "connect": self._connect, "disconnect": self._disconnect},
            )
            self.log.info(
                "card {tap} ready with MAC {mac}{persistent}: cable unplugged until connected",
                tap=self.tap.name, mac=format_mac(mac),
                persistent=" (a persistent TAP: its addresses and bridge membership stay when the card stops)"
                if self.tap.persistent else "",
            )
            if account is not None:
                self._use(account)
            else:
                self.interface.configure(self.interface_config)
        except (StateError, TapError, control.ControlError, OSError, ValueError) as e:
            self._close()
            raise fatal("sevpn-nic", str(os_error(e, "use") if isinstance(e, OSError) else e))
        Service.startService(self)
        notify("READY=1", f"STATUS=TAP {self.tap.name} up, MAC {format_mac(self.card.mac)}; "
               + (f"connecting to hub {self.card.account.hub}" if self.card.account is not None else "not connected"))

    def _use(self, account: Account) -> None:
        """Connect with C{account}, the interface set as the card's and the account's settings say."""
        config = self.interface_config.merged(account.interface())
        self.card.connect(account)
        self.interface.configure(config)

    def _udp(self, reactor):
        """How the card opens its UDP channel's socket, or None: no UDP channel."""
        from functools import partial

        from sevpn import tls, udp

        if not self.udp:
            return None
        if tls.EXPORTER_MISSING is not None:
            self.log.warn("UDP channel off: {why}", why=tls.EXPORTER_MISSING)
            return None
        return partial(udp.connect, reactor)

    def _status(self) -> dict:
        info = self.card.status()
        info["interface"] = self.interface.status()
        info["persistent"] = self.tap.persistent
        info["version"] = __version__
        info["state_dir"] = os.path.abspath(self.state_dir)
        return info

    def _connect(self, account: str, wait: bool = False, within: float = 30.0):
        """
        The C{connect} control command: dial C{account}; with C{wait},
        answer once the card is connected, refused or disconnected, or
        after C{within} seconds (then C{timed_out} is true and
        C{last_error} says what went wrong so far).
        """
        try:
            self._use(AccountStore(self.state_dir).get(str(account)))
        except (StateError, ConfigError) as e:
            raise control.ControlError(str(e))
        if not wait:
            return self._status()
        try:
            within = min(max(float(within), 0.0), 3600.0)
        except (TypeError, ValueError):
            raise control.ControlError("the time to wait must be a number of seconds")
        d = self.card.when_settled()
        d.addTimeout(within, reactor_or_global(self.reactor))

        def answer(result):
            info = self._status()
            info["timed_out"] = False
            return info

        def timed_out(failure):
            failure.trap(TimeoutError)
            info = self._status()
            info["timed_out"] = True
            return info

        return d.addCallbacks(answer, timed_out)

    def _disconnect(self):
        return self.card.disconnect().addCallback(lambda _: self._status())

    def _close(self):
        if self.control_port is not None:
            self.control_port.stopListening()
            self.control_port = None
        if self.tap is not None:
            self.tap.close()
            self.tap = None

    def stopService(self):
        """
        Shut the card down: release the DHCP lease (if any) while the hub still
        carries it, then disconnect from the hub, then close the control socket
        and the TAP.
        """
        busypoll.uninstall()
        notify("STOPPING=1")
        Service.stopService(self)
        if self.card is None:
            return None
        # The DHCP lease is released first, while the hub still carries the DHCPRELEASE.
        d = self.interface.stop()
        d.addBoth(lambda _: self.card.disconnect("the card is shutting down"))
        d.addBoth(lambda _: self._close())
        return d
