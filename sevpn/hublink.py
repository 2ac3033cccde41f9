"""
The hub's end of a link: the hello/welcome handshake, then data.

A thin adapter: what a hello means is L{sevpn.hub.Hub}'s business.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory

from sevpn import wire
from sevpn.hub import Hub, Refused
from sevpn.link import Link
from sevpn.timing import Keepalive

#: A card must finish its hello within this many seconds.
HANDSHAKE_TIMEOUT = 15.0


class HubLink(Link):
    def __init__(self, hub: Hub, clock: IReactorTime, keepalive: Keepalive) -> None:
        super().__init__(clock, keepalive)
        self.hub = hub
        self._hello = None
        self._handshake_call = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._handshake_call = self.clock.callLater(HANDSHAKE_TIMEOUT, self._handshake_overdue)

    def _handshake_overdue(self) -> None:
        self._handshake_call = None
        if not self.ready:
            self.fail(f"no hello within {HANDSHAKE_TIMEOUT:g} seconds")

    def lost(self, reason: str) -> None:
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
        refusal = failure.trap(Refused) and failure.value
        if self.closed:
            return
        self.send_json(wire.REFUSED, {"code": refusal.code, "message": refusal.message})
        self.failure = f"refused: {refusal.message}"
        self.close()

    def _authenticated(self, _) -> None:
        if self.closed or self.failure is not None:
            return  # the card left while its password was checked
        session, resumed, card_received = self.hub.join(self, self._hello)
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

    def __init__(self, hub: Hub, clock: IReactorTime, keepalive: Keepalive) -> None:
        self.hub = hub
        self.clock = clock
        self.keepalive = keepalive

    def buildProtocol(self, addr) -> HubLink:
        link = HubLink(self.hub, self.clock, self.keepalive)
        link.factory = self
        return link
