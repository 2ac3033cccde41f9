"""
The card's end of a link: say hello, wait for a welcome or a refusal.

A thin adapter: what the answer means is L{sevpn.card.Card}'s business.
Each link belongs to one connection attempt of the card; the card ignores
what an older attempt's link reports.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory

from sevpn import defaults, wire
from sevpn.link import Link


class CardLink(Link):
    """The card's connection to a hub, for one connection attempt."""

    #: The UDP channel beside this link, if the hub offered one (L{sevpn.channel}).
    channel = None

    def __init__(self, card, attempt: object) -> None:
        super().__init__(card.clock, card.keepalive)
        self.card = card
        self.attempt = attempt
        self._handshake_call = None

    def connectionMade(self) -> None:
        """Say hello, unless a newer attempt made this one stale."""
        super().connectionMade()
        if not self.card.is_current(self.attempt):
            self.say_goodbye("superseded by a newer connection")
            return
        self._handshake_call = self.clock.callLater(defaults.HANDSHAKE_TIMEOUT, self._handshake_overdue)
        self.card.link_connected(self, self.attempt)
        self.send_message(self.card.hello())

    def _handshake_overdue(self) -> None:
        self._handshake_call = None
        self.fail(f"the hub did not answer the hello within {defaults.HANDSHAKE_TIMEOUT:g} seconds")

    def _handshake_over(self) -> None:
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None

    def handshake_message(self, kind: int, body: memoryview) -> None:
        """The hub's WELCOME or REFUSED, handed to the card."""
        if self.session is not None or kind not in (wire.WELCOME, wire.REFUSED) or self._handshake_call is None:
            raise wire.ProtocolError(f"unexpected {wire.NAMES[kind]} message from the hub")
        self._handshake_over()
        answer = wire.Welcome.decode(body) if kind == wire.WELCOME else wire.Refused.decode(body)
        self.card.hub_answered(self, self.attempt, answer)

    def detached(self, session, clean: bool, reason: str) -> None:
        """The session's link is gone: the card decides what that means."""
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.close(reason)
        self.card.link_lost(self, clean, reason)

    def ended_in_handshake(self, reason: str) -> None:
        """The attempt ended before the hub answered."""
        self._handshake_over()
        self.card.attempt_ended(self.attempt, reason)

    def connectionLost(self, reason) -> None:
        """Stop the handshake timer, then the link's own ending."""
        self._handshake_over()
        super().connectionLost(reason)


class CardLinkFactory(Factory):
    """Builds the link of one connection attempt."""

    noisy = False

    def __init__(self, card, attempt: object) -> None:
        self.card = card
        self.attempt = attempt

    def buildProtocol(self, addr) -> CardLink:
        """The link of this attempt."""
        link = CardLink(self.card, self.attempt)
        link.factory = self
        return link
