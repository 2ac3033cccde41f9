"""
The hub's end of a link: the hello/welcome handshake, then data.

A thin adapter: what a hello means is L{sevpn.hub.Hub}'s business.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from sevpn import defaults, wire
from sevpn.hub import Hub, HubSession, Refused
from sevpn.link import Link
from sevpn.timing import Keepalive
from sevpn.wire import Refusal

#: At most this many connections may be in their handshake at once; more
#: are turned away at once (a connection flood must not exhaust the hub).
MAX_HANDSHAKES = 256


class HubLink(Link):
    """A card's connection to the hub."""

    def __init__(self, hub: Hub, clock: IReactorTime, keepalive: Keepalive) -> None:
        super().__init__(clock, keepalive)
        self.hub = hub
        self._admitted = False
        self._hello: Optional[wire.Hello] = None
        self._handshake_call = None

    def connectionMade(self) -> None:
        self._admitted = self.factory.admit()
        if not self._admitted:
            self.open = False
            self.transport.abortConnection()
            return
        super().connectionMade()
        self._handshake_call = self.clock.callLater(defaults.HANDSHAKE_TIMEOUT, self._handshake_overdue)

    def connectionLost(self, reason) -> None:
        self._handshake_over()
        super().connectionLost(reason)

    def _handshake_over(self) -> None:
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None
        if self._admitted:
            self._admitted = False
            self.factory.handshake_over()

    def _handshake_overdue(self) -> None:
        self._handshake_call = None
        self.fail(f"no hello within {defaults.HANDSHAKE_TIMEOUT:g} seconds")

    def handshake_message(self, kind: int, body: memoryview) -> None:
        if kind != wire.HELLO or self._hello is not None:
            raise wire.ProtocolError(f"unexpected {wire.NAMES[kind]} message")
        try:
            self._hello = hello = wire.Hello.decode(body)
        except wire.BadHello as e:
            self._hello = e
            self.log.warn("{peer}: {why}", peer=self.peer_name(), why=str(e))
            self._refuse(Refused(Refusal.BAD_HELLO))
            return
        d = self.hub.authenticate(self.peer_name(), self.peer_address(), hello)
        d.addCallback(self._authenticated)
        d.addErrback(self._refused)
        d.addErrback(lambda f: self.fail(f"handshake failed: {f.getErrorMessage()}"))

    def _refused(self, failure) -> None:
        failure.trap(Refused)
        self._refuse(failure.value)

    def _refuse(self, refused: Refused) -> None:
        self._handshake_over()
        self.refuse(refused.message)

    def _authenticated(self, _) -> None:
        if not self.open:
            return  # the card left while its password was checked
        try:
            session, resumed, card_received = self.hub.join(self.peer_name(), self._hello)
        except Refused as refused:
            self._refuse(refused)
            return
        self._handshake_over()
        self.send_message(self.hub.welcome(session, resumed))
        self.established(session, card_received)

    def detached(self, session: HubSession, clean: bool, reason: str) -> None:
        self.hub.link_lost(session, clean, reason)


class HubLinkFactory(Factory):
    """Builds L{HubLink}s and bounds how many are in their handshake."""

    noisy = False

    log = Logger()

    def __init__(self, hub: Hub, clock: IReactorTime, keepalive: Keepalive) -> None:
        self.hub = hub
        self.clock = clock
        self.keepalive = keepalive
        self.handshaking = 0
        self.turned_away = 0

    def admit(self) -> bool:
        """May one more connection start its handshake?"""
        if self.handshaking >= MAX_HANDSHAKES:
            self.turned_away += 1
            if self.turned_away & (self.turned_away - 1) == 0:  # 1, 2, 4, 8, ...: a flood floods no log
                self.log.warn(
                    "turned a connection away: {n} are still in their handshake (the limit); {total} so far",
                    n=self.handshaking, total=self.turned_away,
                )
            return False
        self.handshaking += 1
        return True

    def handshake_over(self) -> None:
        self.handshaking -= 1

    def buildProtocol(self, addr) -> HubLink:
        link = HubLink(self.hub, self.clock, self.keepalive)
        link.factory = self
        return link
