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
from sevpn.channel import HubChannels
from sevpn.guard import Admission, SourceSummary
from sevpn.hub import Hub, HubSession, Refused
from sevpn.link import Link
from sevpn.pki import fingerprint
from sevpn.tls import peer_certificate
from sevpn.timing import Keepalive
from sevpn.wire import Refusal


class HubLink(Link):
    """A card's connection to the hub."""

    #: The UDP channel beside this link, if the card asked for one (L{sevpn.channel}).
    channel = None

    def __init__(self, hub: Hub, clock: IReactorTime, keepalive: Keepalive) -> None:
        super().__init__(clock, keepalive)
        self.hub = hub
        self._admitted = False
        self._hello: Optional[wire.Hello] = None
        self._handshake_call = None

    def connectionMade(self) -> None:
        """
        Admit the connection (L{sevpn.guard.Admission}: handshakes in progress,
        per address and in all, and the rate of new ones) or abort it at
        once; an admitted card has L{defaults.HANDSHAKE_TIMEOUT} seconds to
        say hello.
        """
        self._admitted = self.factory.admit(self.peer_address())
        if not self._admitted:
            self.open = False
            self.transport.abortConnection()
            return
        super().connectionMade()
        self._handshake_call = self.clock.callLater(defaults.HANDSHAKE_TIMEOUT, self._handshake_overdue)

    def connectionLost(self, reason) -> None:
        if self._admitted and self._hello is None and _certificate_refused(reason):
            self.factory.certificate_refused(self.peer_address())
        self._handshake_over()
        super().connectionLost(reason)

    def _handshake_over(self) -> None:
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None
        if self._admitted:
            self._admitted = False
            self.factory.handshake_over(self.peer_address())

    def _handshake_overdue(self) -> None:
        self._handshake_call = None
        self.fail(f"no hello within {defaults.HANDSHAKE_TIMEOUT:g} seconds")

    def handshake_message(self, kind: int, body: memoryview) -> None:
        """
        The card's hello (only one): decode it and have the hub authenticate
        it, by password or by the client certificate TLS verified; a bad hello
        is refused as such.  Later, a PROBE is the card saying over TLS that it
        hears nothing on its UDP channel.
        """
        if kind == wire.PROBE and self.channel is not None:
            # The card says over TLS what it cannot say over UDP: it hears nothing there.
            self.channel.told_over_tls(wire.Probe.decode(body))
            return
        if kind != wire.HELLO or self._hello is not None:
            raise wire.ProtocolError(f"unexpected {wire.NAMES[kind]} message")
        try:
            self._hello = hello = wire.Hello.decode(body)
        except wire.BadHello as e:
            self._hello = e
            self.log.warn("{peer}: {why}", peer=self.peer_name(), why=str(e))
            self._refuse(Refused(Refusal.BAD_HELLO))
            return
        cert = peer_certificate(self.transport)
        d = self.hub.authenticate(self.peer_name(), self.peer_address(), hello,
                                  fingerprint(cert) if cert is not None else None)
        d.addCallback(self._authenticated)
        d.addErrback(self._refused)
        d.addErrback(lambda f: self.fail(f"handshake failed: {f.getErrorMessage()}"))

    def _refused(self, failure) -> None:
        failure.trap(Refused)
        self._refuse(failure.value)

    def _refuse(self, refused: Refused) -> None:
        self._handshake_over()
        self.refuse(refused.message)

    def _authenticated(self, certificate: Optional[str]) -> None:
        if not self.open:
            return  # the card left while its password was checked
        try:
            session, resumed, card_received = self.hub.join(self.peer_name(), self._hello, certificate)
        except Refused as refused:
            self._refuse(refused)
            return
        self._handshake_over()
        channel = self._open_channel(session)
        self.send_message(self.hub.welcome(session, resumed, channel))
        self.established(session, card_received)
        self.channel = channel

    def _open_channel(self, session: HubSession):
        """A UDP channel beside this link, if the card asked for one and the hub has a UDP port."""
        channels = self.factory.udp
        if channels is None or wire.FEATURE_UDP not in self._hello.features:
            return None
        return channels.open(self, session, session.id, session.offload)

    def detached(self, session: HubSession, clean: bool, reason: str) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.close(reason)
        self.hub.link_lost(session, clean, reason)


def _certificate_refused(reason) -> bool:
    """Whether a connection ended because TLS refused the card's client certificate (not the hub's CA's)."""
    from OpenSSL.SSL import Error as TLSError

    value = getattr(reason, "value", None)
    return isinstance(value, TLSError) and "certificate verify failed" in str(value)


class HubLinkFactory(Factory):
    """
    Builds L{HubLink}s.  Connections that have not logged in are bounded
    per address and in all (L{sevpn.guard.Admission}): one address's flood
    is turned away at accept, before TLS, without touching anyone else.
    """

    noisy = False

    log = Logger()

    def __init__(self, hub: Hub, clock: IReactorTime, keepalive: Keepalive,
                 admission: Optional[Admission] = None, udp: Optional[HubChannels] = None) -> None:
        self.hub = hub
        #: The hub's UDP port (its channels), or None: no UDP.
        self.udp = udp
        self.clock = clock
        self.keepalive = keepalive
        self.admission = admission or Admission()
        self._summary = SourceSummary()
        #: Connections whose client certificate TLS refused (not signed by the hub's CA, expired, ...).
        self.certificates_refused = 0
        self._certificate_summary = SourceSummary()

    @property
    def handshaking(self) -> int:
        return self.admission.handshaking

    @property
    def turned_away(self) -> int:
        return self.admission.turned_away

    def admit(self, address: str) -> bool:
        """May one more connection from C{address} start its handshake?"""
        now = self.clock.seconds()
        why = self.admission.admit(address, now)
        if why is None:
            return True
        if self._summary.note(address, now):
            self.log.warn("turned a connection from {address} away: {why}", address=address, why=why)
        return False

    def certificate_refused(self, address: str) -> None:
        """TLS refused the client certificate of a connection from C{address}: counted, logged once a while."""
        self.certificates_refused += 1
        if self._certificate_summary.note(address, self.clock.seconds()):
            self.log.warn(
                "refused a card's certificate from {address} at TLS: it does not verify against the hub's CA "
                "(another hub's certificate, or expired)", address=address,
            )

    def handshake_over(self, address: str) -> None:
        self.admission.done(address)

    def buildProtocol(self, addr) -> HubLink:
        link = HubLink(self.hub, self.clock, self.keepalive)
        link.factory = self
        return link
