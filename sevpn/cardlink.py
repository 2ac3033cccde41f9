"""
The card's end of a link: say hello, wait for a welcome or a refusal.

A thin adapter over L{sevpn.card.Card}, which counts a connection that
ends before the welcome as a failed attempt (for the backoff).
"""

from __future__ import annotations

from twisted.internet.protocol import Factory

from sevpn import wire
from sevpn.link import Link

HANDSHAKE_TIMEOUT = 15.0


class CardLink(Link):
    def __init__(self, card) -> None:
        super().__init__(card.clock, card.keepalive)
        self.card = card
        #: The connection attempt this link belongs to.
        self.service = card.service
        self.welcomed = False
        self._handshake_call = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._handshake_call = self.clock.callLater(HANDSHAKE_TIMEOUT, self._handshake_overdue)
        self.send_json(wire.HELLO, self.card.hello())

    def _handshake_overdue(self) -> None:
        self._handshake_call = None
        if not self.ready:
            self.fail(f"the hub did not answer the hello within {HANDSHAKE_TIMEOUT:g} seconds")

    def handshake_message(self, kind: int, body: memoryview) -> None:
        if self.ready or kind not in (wire.WELCOME, wire.REFUSED):
            raise wire.ProtocolError(f"unexpected {wire.NAMES[kind]} message from the hub")
        info = wire.decode_json(kind, body)
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None
        if kind == wire.REFUSED:
            self.failure = str(info.get("message") or info.get("code") or "refused")
            self.card.refused(str(info.get("code", "")), self.failure)
            self.close()
            return
        self.welcomed = True
        self.card.welcomed(self, info)

    def lost(self, reason: str) -> None:
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None
        if not self.welcomed and self.card.service is self.service:
            self.card.attempt_failed(reason)


class CardLinkFactory(Factory):
    noisy = False

    def __init__(self, card) -> None:
        self.card = card

    def buildProtocol(self, addr) -> CardLink:
        link = CardLink(self.card)
        link.factory = self
        return link
