"""
The link: one TLS connection between a card and the hub, the virtual LAN's
"physical layer".

L{Link} is the Twisted protocol both ends share: it cuts the stream into
messages (L{sevpn.wire}), keeps the line alive with NULL packets, declares
a silent peer dead, acknowledges what arrived, and carries the frames of a
L{sevpn.session.Session}, which outlives links.  The hub's and the card's
handshakes are small subclasses (L{sevpn.hublink.HubLink},
L{sevpn.cardlink.CardLink}).

A link's life is an Automat state machine; its transition table is at the
end of L{Link}:

    handshaking --established--> ready --say_goodbye / goodbye_received--> closing
         |                         |                                          |
         +--refuse / fail--> closing <--fail---+        connection_lost ----> closed

Leaving I{ready} detaches the session (L{Link.detached}, for the subclass's
role to decide): clean after a goodbye either way, unclean after a failure
or a lost connection, when the peer may come back to resume.

Every timer runs on the injected C{clock}, so tests drive it with
L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

import socket
import struct
from typing import List, Optional, Tuple

from automat import MethodicalMachine
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from sevpn import busypoll, wire
from sevpn.sequencing import SequenceError
from sevpn.session import ILink, Session
from sevpn.timing import Keepalive

#: Acknowledge at the latest after this many frames or bytes, or after
#: L{ACK_DELAY} seconds, whichever comes first (cumulative, so cheap).  Acks
#: ride on the DATA going the other way; a separate ACK is only for one-way
#: traffic, so the delay is long: a sparse flow (a ping) costs no extra
#: message and no extra wakeup per hop.  Bulk flows reach the frame or byte
#: count long before it.
ACK_FRAMES = 128
ACK_BYTES = 512 * 1024
ACK_DELAY = 1.0
#: struct tcp_info: tcpi_total_retrans (u32 at 100) and tcpi_segs_out (u32 at 136).
_TCP_INFO = struct.Struct("100xI32xI")
#: The most bytes the kernel holds unsent for a link (TCP_NOTSENT_LOWAT).
#: The send buffer itself is left to the kernel's autotuning, which sizes it
#: to the line (bandwidth x RTT: megabytes on a long fast line); bounding
#: only what is not yet on the wire keeps the queue short without capping
#: the line (a fixed SO_SNDBUF of 128 KiB held a 40 ms line to ~50 Mbit/s).
UNSENT_LIMIT = 128 * 1024


@implementer(IPushProducer, ILink)
class Link(Protocol):
    """The message layer shared by both ends; see the module docstring."""

    _machine = MethodicalMachine()
    log = Logger()

    def __init__(self, clock: IReactorTime, keepalive: Keepalive) -> None:
        self.clock = clock
        self.keepalive = keepalive
        #: Only a hello-sized message is accepted until the handshake is over.
        self.decoder = wire.Decoder(wire.MAX_HELLO)
        #: The session carried, while ready (the data path reads it directly).
        self.session: Optional[Session] = None
        #: Whether the link still takes part (handshaking or ready).
        self.open = True
        #: Why the link ended, once it has, as a sentence.
        self.reason: Optional[str] = None
        self._acked = 0
        self._unacked_frames = 0
        self._unacked_bytes = 0
        self._sent_something = False
        self._last_received = 0.0
        self._keepalive_call = None
        self._deadline_call = None
        self._ack_call = None
        self._closed_waiters: List[Deferred] = []

    # connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        """Tune the socket, become the transport's producer, start the keepalive and the deadline."""
        self._tune_socket()
        self.transport.registerProducer(self, True)
        self._last_received = self.clock.seconds()
        self._keepalive_call = self.clock.callLater(self.keepalive.next_interval(), self._keepalive_due)
        self._deadline_call = self.clock.callLater(self.keepalive.timeout, self._deadline_due)

    def _tune_socket(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)
            sock = self.transport.socket
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_NOTSENT_LOWAT", 25), UNSENT_LIMIT)
        except (AttributeError, OSError, NotImplementedError):
            pass  # not TCP (tests, UNIX sockets): nothing to tune

    def connectionLost(self, reason) -> None:
        """The transport is gone: an input of the state machine."""
        self.connection_lost(describe_failure(reason))

    def when_closed(self) -> Deferred:
        """A Deferred that fires once the connection is gone."""
        if self.transport is None or self._closed:
            return succeed(None)
        d = Deferred()
        self._closed_waiters.append(d)
        return d

    _closed = False

    def peer_name(self) -> str:
        """The peer as C{host:port} (C{[v6]:port}), for logs and status."""
        host = self.peer_address()
        try:
            port = getattr(self.transport.getPeer(), "port", "")
        except Exception:
            port = ""
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}".rstrip(":")

    def tcp_counters(self) -> Optional[Tuple[int, int]]:
        """
        The connection's TCP totals (segments retransmitted, segments sent),
        from C{TCP_INFO}; None where there is no TCP socket (tests, UNIX).
        """
        try:
            info = self.transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
        except (AttributeError, OSError):
            return None
        if len(info) < _TCP_INFO.size:
            return None
        fields = _TCP_INFO.unpack(info)
        return fields[0], fields[1]

    def peer_address(self) -> str:
        """
        The peer's address without the port (what throttles are keyed on);
        an IPv4 card reaching a dual-stack listener is shown as IPv4.
        """
        try:
            host = str(getattr(self.transport.getPeer(), "host", "peer"))
        except Exception:
            return "peer"
        return host[7:] if host.startswith("::ffff:") and "." in host else host

    # incoming --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Cut the stream into messages and handle them; one flush per read."""
        self._last_received = self.clock.seconds()
        busypoll.activity()
        session = self.session
        try:
            messages = self.decoder.feed(data)
            while messages:
                kind = self._handle(messages, session)
                if kind is None:
                    return
                session = self.session
                # The decoder stops after a handshake message: read on, under
                # the limits the handshake may have changed.
                messages = self.decoder.feed(b"") if kind in wire.HANDSHAKE else None
        except (wire.ProtocolError, SequenceError) as e:
            self.fail(str(e))
            return
        finally:
            if session is not None:
                session.input_done()
        if self.session is not None:
            self._maybe_ack()

    def _handle(self, messages, session: Optional[Session]) -> Optional[int]:
        """Handle the messages of one feed; the last one's kind, or None if the link closed."""
        kind = None
        for kind, body in messages:
            if kind == wire.DATA:
                if session is None:
                    raise wire.ProtocolError("unexpected DATA message")
                first, ack, frames = wire.decode_data(body)
                session.data_received(first, ack, frames, len(body) - 16 - 4 * len(frames))
                self._unacked_frames += len(frames)
                self._unacked_bytes += len(body)
            elif kind == wire.ACK or kind == wire.NULL:
                ack = wire.decode_ack(body)
                if session is not None:
                    session.ack_received(ack)
            elif kind == wire.GOODBYE:
                self.goodbye_received(wire.Goodbye.decode(body).reason)
                return None
            else:
                self.handshake_message(kind, body)
                session = self.session
            if not self.open:
                return None
        return kind

    def handshake_message(self, kind: int, body: memoryview) -> None:
        """Subclass hook: a message other than data, ack, keepalive, goodbye."""
        raise wire.ProtocolError(f"unexpected {wire.NAMES[kind]} message")

    # acknowledgements ------------------------------------------------------

    def _maybe_ack(self) -> None:
        if self.session.delivered == self._acked:
            return
        if self._unacked_frames >= ACK_FRAMES or self._unacked_bytes >= ACK_BYTES:
            self.send_ack()
        elif self._ack_call is None:
            self._ack_call = self.clock.callLater(ACK_DELAY, self._ack_due)

    def _ack_due(self) -> None:
        self._ack_call = None
        if self.session is not None and self.session.delivered != self._acked:
            self.send_ack()

    def _note_acked(self) -> int:
        ack = self.session.delivered if self.session is not None else 0
        self._acked = ack
        self._unacked_frames = 0
        self._unacked_bytes = 0
        call = self._ack_call
        if call is not None:
            # The ack rode on a message: no separate one, no wakeup for it.
            self._ack_call = None
            if call.active():
                call.cancel()
        return ack

    def send_ack(self) -> None:
        """Send the cumulative ack on its own."""
        self.write(wire.encode_ack(self._note_acked()))

    # outgoing --------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write bytes, noting that something was sent (no keepalive needed)."""
        self._sent_something = True
        self.transport.write(data)

    def send_data(self, first_seq: int, payload: bytes) -> None:
        """L{ILink}: one DATA message, with the current ack piggybacked."""
        self._sent_something = True
        self.transport.writeSequence([wire.data_header(first_seq, self._note_acked(), len(payload)), payload])

    def send_message(self, message) -> None:
        """Write a handshake message (L{wire.Hello}, L{wire.Welcome}, ...)."""
        self.write(message.encode())

    # keepalive -------------------------------------------------------------

    def _keepalive_due(self) -> None:
        self._keepalive_call = self.clock.callLater(self.keepalive.next_interval(), self._keepalive_due)
        if not self._sent_something and self.session is not None:
            self.write(wire.encode_null(self._note_acked(), self.keepalive.padding()))
        self._sent_something = False

    def _deadline_due(self) -> None:
        idle = self.clock.seconds() - self._last_received
        if idle >= self.keepalive.timeout:
            self._deadline_call = None
            self.fail(f"nothing received for {idle:.0f} seconds (keepalive timeout)")
        else:
            self._deadline_call = self.clock.callLater(self.keepalive.timeout - idle, self._deadline_due)

    # flow control: IPushProducer (our transport's writes) and ILink (its reads)

    def pauseProducing(self) -> None:
        """IPushProducer: the transport is full; the session's port hears it."""
        if self.session is not None:
            self.session.link_paused(self)

    def resumeProducing(self) -> None:
        """IPushProducer: the transport takes data again."""
        if self.session is not None:
            self.session.link_resumed(self)

    def stopProducing(self) -> None:
        """IPushProducer: nothing to stop; the connection's end does it."""
        pass

    def pause_reading(self) -> None:
        """L{ILink}: stop reading the peer."""
        if self.open and self.transport is not None:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        """L{ILink}: read the peer again."""
        if self.open and self.transport is not None:
            self.transport.resumeProducing()

    # hooks for the two roles -------------------------------------------------

    def detached(self, session: Session, clean: bool, reason: str) -> None:
        """The link no longer carries C{session}; C{clean} after a goodbye."""

    def ended_in_handshake(self, reason: str) -> None:
        """The connection ended before the handshake was over."""

    # the state machine -------------------------------------------------------

    @_machine.state(initial=True)
    def handshaking(self):
        """Connected; the hello and its answer are being exchanged."""

    @_machine.state()
    def ready(self):
        """The handshake is over: the link carries a session's frames."""

    @_machine.state()
    def closing(self):
        """Leaving: a goodbye, a refusal or an error; the connection is closing."""

    @_machine.state()
    def closed(self):
        """The connection is gone."""

    @_machine.input()
    def established(self, session: Session, peer_received: int):
        """The handshake is over: carry C{session}, resending above C{peer_received}."""

    @_machine.input()
    def say_goodbye(self, reason: str):
        """Leave cleanly: the peer holds no resume for this session."""

    @_machine.input()
    def goodbye_received(self, reason: str):
        """The peer is leaving cleanly."""

    @_machine.input()
    def refuse(self, refused: wire.Refused):
        """(Hub) turn the card away with a REFUSED message."""

    @_machine.input()
    def fail(self, reason: str):
        """End this connection because of the peer; C{reason} is logged."""

    @_machine.input()
    def connection_lost(self, reason: str):
        """The transport is gone."""

    @_machine.output()
    def _attach(self, session: Session, peer_received: int) -> None:
        self.session = session
        self.decoder.max_body = wire.MAX_BODY
        session.use_link(self, peer_received)

    @_machine.output()
    def _send_goodbye(self, reason: str) -> None:
        self.write(wire.Goodbye(reason).encode())
        self.reason = f"said goodbye: {reason}"

    @_machine.output()
    def _note_goodbye(self, reason: str) -> None:
        self.reason = reason or "the peer said goodbye"

    @_machine.output()
    def _send_refusal(self, refused: wire.Refused) -> None:
        self.send_message(refused)
        self.reason = f"refused: {refused.message}"

    @_machine.output()
    def _detach_clean(self) -> None:
        self._detach(True)

    @_machine.output()
    def _detach_unclean(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self._detach(False)

    def _detach(self, clean: bool) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.stop_using_link(self)
            self.detached(session, clean, self.reason)

    @_machine.output()
    def _close(self) -> None:
        """Close after what was written is sent."""
        self.open = False
        # The link is a producer of its TLS transport, which would wait for
        # it to unregister before shutting down: unregister first.
        if self.transport is not None:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    @_machine.output()
    def _abort(self, reason: str) -> None:
        self.open = False
        self.reason = reason
        self.log.warn("{peer}: closing the connection: {reason}", peer=self.peer_name(), reason=reason)
        self.transport.abortConnection()

    @_machine.output()
    def _lost_in_handshake(self, reason: str) -> None:
        self.open = False
        if self.reason is None:
            self.reason = reason
        self.ended_in_handshake(self.reason)

    @_machine.output()
    def _finish(self, reason: str) -> None:
        self.open = False
        self._closed = True
        if self.reason is None:
            self.reason = reason
        for name in ("_keepalive_call", "_deadline_call", "_ack_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)

    @_machine.output()
    def _ignore(self) -> None:
        pass

    handshaking.upon(established, enter=ready, outputs=[_attach])
    handshaking.upon(refuse, enter=closing, outputs=[_send_refusal, _close])
    handshaking.upon(say_goodbye, enter=closing, outputs=[_close])
    handshaking.upon(goodbye_received, enter=closing, outputs=[_note_goodbye, _close])
    handshaking.upon(fail, enter=closing, outputs=[_abort])
    handshaking.upon(connection_lost, enter=closed, outputs=[_lost_in_handshake, _finish])

    ready.upon(say_goodbye, enter=closing, outputs=[_send_goodbye, _detach_clean, _close])
    ready.upon(goodbye_received, enter=closing, outputs=[_note_goodbye, _detach_clean, _close])
    ready.upon(fail, enter=closing, outputs=[_abort, _detach_unclean])
    ready.upon(connection_lost, enter=closed, outputs=[_detach_unclean, _finish])
    ready.upon(refuse, enter=ready, outputs=[_ignore])
    ready.upon(established, enter=ready, outputs=[_ignore])

    closing.upon(connection_lost, enter=closed, outputs=[_finish])
    closing.upon(say_goodbye, enter=closing, outputs=[_ignore])
    closing.upon(goodbye_received, enter=closing, outputs=[_ignore])
    closing.upon(fail, enter=closing, outputs=[_ignore])
    closing.upon(refuse, enter=closing, outputs=[_ignore])
    closing.upon(established, enter=closing, outputs=[_ignore])

    closed.upon(say_goodbye, enter=closed, outputs=[_ignore])
    closed.upon(goodbye_received, enter=closed, outputs=[_ignore])
    closed.upon(fail, enter=closed, outputs=[_ignore])
    closed.upon(refuse, enter=closed, outputs=[_ignore])
    closed.upon(established, enter=closed, outputs=[_ignore])
    closed.upon(connection_lost, enter=closed, outputs=[_ignore])


#: TLS alerts a hub sends when it does not accept a card's client certificate, and what they mean.
_CERTIFICATE_ALERTS = (
    ("unknown ca", ": it is not signed by the hub's CA"),
    ("certificate expired", ": it expired"),
    ("certificate revoked", ""),
    ("bad certificate", ""),
    ("unsupported certificate", ": it is not for client authentication"),
)


def describe_failure(reason) -> str:
    """A failure as a short sentence for the log and the status."""
    value = getattr(reason, "value", reason)
    try:
        from service_identity import VerificationError

        if isinstance(value, VerificationError):
            names = ", ".join(_mismatched_name(e) for e in value.errors)
            return f"the hub's certificate is not valid for {names} (check --server-name / the hub's --hostname)"
        from OpenSSL.SSL import Error as TLSError

        if isinstance(value, TLSError):
            text = str(value)
            if "certificate verify failed" in text:
                return "the hub's certificate is not signed by the trusted CA (certificate verify failed)"
            for alert, why in _CERTIFICATE_ALERTS:
                if alert in text:
                    return f"the hub does not accept this card's certificate{why} (TLS alert {alert})"
            return f"TLS failed: {value}"
    except ImportError:  # pragma: no cover
        pass
    text = str(value).strip()
    if "Connection was closed cleanly" in text:
        return "the connection was closed"
    return text or value.__class__.__name__


def _mismatched_name(mismatch) -> str:
    ident = getattr(mismatch, "mismatched_id", None)
    name = getattr(ident, "hostname", None) or getattr(ident, "ip", None) or mismatch
    return name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
