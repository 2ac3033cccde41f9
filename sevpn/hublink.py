"""
The hub's end of a link: the hello/welcome handshake, then data.

A thin adapter: what a hello means is L{sevpn.hub.Hub}'s business.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from sevpn import wire
from sevpn.hub import Hub, Refused
from sevpn.link import Link
from sevpn.timing import Keepalive

#: A card must finish its hello within this many seconds.
HANDSHAKE_TIMEOUT = 15.0
#: At most this many connections may be in their handshake at once; more
#: are turned away at once (a connection flood must not exhaust the hub).
MAX_HANDSHAKES = 256


class HubLink(Link):
    def __init__(self, hub: Hub, clock: IReactorTime, keepalive: Keepalive) -> None:
        super().__init__(clock, keepalive)
        self.hub = hub
        self._admitted = False
        self._hello = None
        self._handshake_call = None

    def connectionMade(self) -> None:
        self._admitted = self.factory.admit()
        if not self._admitted:
            self.closed = True
            self.transport.abortConnection()
            return
        super().connectionMade()
        self._handshake_call = self.clock.callLater(HANDSHAKE_TIMEOUT, self._handshake_overdue)

    def _handshake_over(self) -> None:
        if self._admitted:
            self._admitted = False
            self.factory.handshake_over()

    def _handshake_overdue(self) -> None:
        self._handshake_call = None
        if not self.ready:
            self.fail(f"no hello within {HANDSHAKE_TIMEOUT:g} seconds")

    def lost(self, reason: str) -> None:
        self._handshake_over()
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None

    def handshake_message(self, kind: int, body: memoryview) -> None:
        if kind != wire.HELLO or self._hello is not None:
            raise wire.ProtocolError(f"unexpected {wire.NAMES[kind]} message")
        self._hello = hello = wire.decode_json(kind, body)
        d = self.hub.authenticate(self, hello)
        d.addCallbacks(self._authenticated, self._refused)
        d.addErrback(lambda f: self.fail(f"handshake failed: {f.getErrorMessage()}"))

    def _refused(self, failure) -> None:
        failure.trap(Refused)
        refusal = failure.value
        if self.closed:
            return
        self.send_json(wire.REFUSED, {"code": refusal.code, "message": refusal.message})
        self.failure = f"refused: {refusal.message}"
        self.close()

    def _authenticated(self, _) -> None:
        if self.closed or self.failure is not None:
            return  # the card left while its password was checked
        session, resumed, card_received = self.hub.join(self, self._hello)
        self._handshake_over()
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None
        self.session = session
        self.ready = True
        self.send_json(
            wire.WELCOME,
            {
                "session": session.id,
                "token": self.hub.token_text(session),
                "resumed": resumed,
                "received": session.received.received,
                "hub": session.vhub.name,
                "resume_window": self.hub.resume_window,
                "features": [wire.FEATURE_OFFLOAD] if session.offload else [],
            },
        )
        if resumed:
            session.resend(card_received)

    def batch_done(self) -> None:
        if self.hub.dirty:
            self.hub.flush(self)


class HubLinkFactory(Factory):
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
