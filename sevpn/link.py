"""
The link: one TLS connection between a card and the hub, the virtual LAN's
"physical layer" (seed fact 7).

L{Link} is the Twisted protocol both sides share: it cuts the stream into
messages (L{sevpn.wire}), keeps the line alive with NULL packets, declares
a silent peer dead, acknowledges what arrived, and hands data frames to a
L{Session}, which outlives links.  The hub's and the card's handshakes are
small subclasses (L{sevpn.hublink.HubLink}, L{sevpn.cardlink.CardLink}).

Every timer runs on the injected C{clock}, so tests drive it with
L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

import socket
from typing import Optional, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from sevpn import wire
from sevpn.sequencing import ReceiveLog, SendLog, SequenceError
from sevpn.timing import Keepalive

#: Acknowledge at the latest after this many frames or bytes, or after
#: L{ACK_DELAY} seconds, whichever comes first (cumulative, so cheap).
ACK_FRAMES = 128
ACK_BYTES = 512 * 1024
ACK_DELAY = 0.05
#: Socket send buffer (the kernel doubles it): roomy enough to keep the
#: data path smooth, not so roomy that it becomes a standing queue.  Side by
#: side on the bench machine, 128 KiB moved as much as 256 KiB or more with
#: half the queueing delay under load.
SEND_BUFFER = 128 * 1024
#: Bytes a sender may still queue on a link after its transport asked to
#: pause: the depth of a switch port's queue, at the hub and at a card's
#: edge alike.  Past it, frames are dropped and counted.  About half a
#: millisecond at the hub's pace; side by side with 256 KiB it moved as
#: much and cut the ping under load from ~3-5 ms to ~2.5 ms.
PORT_QUEUE = 128 * 1024
#: A link paused this long is stalled: the links held back for it are let
#: go (a stalled card must not stall the cards that send to it), and what
#: is switched to it is dropped until it takes data again.
STALL_TIME = 0.5


class Session:
    """
    What survives a link: the sequence state of both directions, the
    counters, and where arriving frames go.  Subclasses decide delivery
    (L{deliver}) and what a lost link means (L{link_lost}).
    """

    def __init__(self, buffer_limit: int) -> None:
        self.sent = SendLog(buffer_limit)
        self.received = ReceiveLog()
        self.link: Optional[Link] = None
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.resumes = 0
        self.congestion_drops = 0

    # toward the peer -------------------------------------------------------

    def send_frames(self, frames: Sequence) -> None:
        """Number C{frames} and send them, or hold them while no link is up."""
        if not frames:
            return
        first, payload = self.sent.append(frames)
        self.frames_out += len(frames)
        self.bytes_out += len(payload) - 4 * len(frames)
        link = self.link
        if link is not None and link.ready:
            link.send_data(first, payload)

    def resend(self, peer_received: int) -> None:
        """After a resume: send what the peer lacks, in order."""
        for first, payload in self.sent.resend_after(peer_received):
            self.link.send_data(first, payload)

    # from the peer ---------------------------------------------------------

    def data_arrived(self, first_seq: int, ack: int, frames: Sequence, size: int) -> None:
        """DATA arrived: C{size} frame bytes in C{frames}."""
        self.sent.ack(ack)
        skip = self.received.accept(first_seq, len(frames))
        if skip:
            frames = frames[skip:]
        if frames:
            self.frames_in += len(frames)
            self.bytes_in += size
            self.deliver(frames)

    def deliver(self, frames: Sequence) -> None:
        raise NotImplementedError

    def link_lost(self, link: "Link", clean: bool, reason: str) -> None:
        """C{link} is gone; C{clean} if the peer said goodbye."""

    def counters(self) -> dict:
        return {
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "resumes": self.resumes,
            "frames_buffered": self.sent.held,
            "bytes_buffered": self.sent.bytes,
            "frames_retransmitted": self.sent.retransmitted,
            # lost from the resume buffer (it overflowed during an outage)
            "frames_dropped": self.sent.dropped,
            # dropped by queue management, as a congested switch port does
            "congestion_drops": self.congestion_drops,
            "frames_lost_inbound": self.received.lost,
        }


@implementer(IPushProducer)
class Link(Protocol):
    """The message layer shared by both ends; see the module docstring."""

    log = Logger()

    def __init__(self, clock: IReactorTime, keepalive: Keepalive) -> None:
        self.clock = clock
        self.keepalive = keepalive
        self.decoder = wire.Decoder()
        self.session: Optional[Session] = None
        #: True once the handshake is done and data may flow.
        self.ready = False
        self.paused = False
        #: Bytes written since the transport asked to pause.
        self.backlog = 0
        self.closed = False
        self.goodbye_received = False
        self.goodbye_sent = False
        self.failure: Optional[str] = None
        self._acked = 0
        self._unacked_frames = 0
        self._unacked_bytes = 0
        self._sent_something = False
        self._last_received = 0.0
        self._keepalive_call = None
        self._deadline_call = None
        self._ack_call = None
        self._closed_waiters = []
        #: Links not read until this one's transport has room again.
        self._held_back = set()
        #: How many links this one is held back for.
        self._holds = 0
        self.stalled = False
        self._stall_call = None

    # connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        self._tune_socket()
        self.transport.registerProducer(self, True)
        self._last_received = self.clock.seconds()
        self._keepalive_call = self.clock.callLater(self.keepalive.next_interval(), self._keepalive_due)
        self._deadline_call = self.clock.callLater(self.keepalive.timeout, self._deadline_due)

    def _tune_socket(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)
            sock = self.transport.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except (AttributeError, OSError, NotImplementedError):
            pass  # not TCP (tests, UNIX sockets): nothing to tune

    def connectionLost(self, reason) -> None:
        self.closed = True
        self.ready = False
        self._release()
        for name in ("_keepalive_call", "_deadline_call", "_ack_call", "_stall_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        session, self.session = self.session, None
        if session is not None and session.link is self:
            session.link = None
            why = self.failure or describe_failure(reason)
            session.link_lost(self, self.goodbye_received or self.goodbye_sent, why)
        self.lost(self.failure or describe_failure(reason))
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)

    def when_closed(self) -> Deferred:
        """A Deferred that fires once the connection is gone."""
        if self.closed:
            return succeed(None)
        d = Deferred()
        self._closed_waiters.append(d)
        return d

    def close(self) -> None:
        """
        Close after what was written is sent.  The link is a producer of
        its TLS transport, which would wait for it to unregister before
        shutting down: unregister first.
        """
        if self.transport is not None:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def lost(self, reason: str) -> None:
        """Subclass hook: the connection is gone."""

    def fail(self, reason: str) -> None:
        """End this connection because of the peer; C{reason} is logged."""
        if self.closed or self.failure is not None:
            return
        self.failure = reason
        self.log.warn("{peer}: closing the connection: {reason}", peer=self.peer_name(), reason=reason)
        self.transport.abortConnection()

    def peer_name(self) -> str:
        try:
            peer = self.transport.getPeer()
            return f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}".rstrip(":")
        except Exception:
            return "peer"

    # incoming --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._last_received = self.clock.seconds()
        try:
            for kind, body in self.decoder.feed(data):
                if self.failure is not None or self.closed:
                    return
                if kind == wire.DATA and self.ready and self.session is not None:
                    first, ack, frames = wire.decode_data(body)
                    self.session.data_arrived(first, ack, frames, len(body) - 16 - 4 * len(frames))
                    self._unacked_frames += len(frames)
                    self._unacked_bytes += len(body)
                elif kind == wire.ACK or kind == wire.NULL:
                    ack = wire.decode_ack(body)
                    if self.ready and self.session is not None:
                        self.session.sent.ack(ack)
                elif kind == wire.GOODBYE:
                    self.goodbye_received = True
                    info = wire.decode_json(kind, body)
                    self.goodbye(str(info.get("reason", "")))
                    self.close()
                    return
                else:
                    self.handshake_message(kind, body)
        except (wire.ProtocolError, SequenceError) as e:
            self.fail(str(e))
            return
        finally:
            self.batch_done()
        if self.ready and self.session is not None:
            self._maybe_ack()

    def handshake_message(self, kind: int, body: memoryview) -> None:
        """Subclass hook: a message other than data, ack, keepalive, goodbye."""
        raise wire.ProtocolError(f"unexpected {wire.NAMES[kind]} message")

    def batch_done(self) -> None:
        """Subclass hook: all messages of one read were handled."""

    def goodbye(self, reason: str) -> None:
        """Subclass hook: the peer is leaving cleanly."""

    # acknowledgements ------------------------------------------------------

    def _maybe_ack(self) -> None:
        if self.session.received.received == self._acked:
            return
        if self._unacked_frames >= ACK_FRAMES or self._unacked_bytes >= ACK_BYTES:
            self.send_ack()
        elif self._ack_call is None:
            self._ack_call = self.clock.callLater(ACK_DELAY, self._ack_due)

    def _ack_due(self) -> None:
        self._ack_call = None
        if self.ready and self.session.received.received != self._acked:
            self.send_ack()

    def _note_acked(self) -> int:
        ack = self.session.received.received if self.session is not None else 0
        self._acked = ack
        self._unacked_frames = 0
        self._unacked_bytes = 0
        return ack

    def send_ack(self) -> None:
        self.write(wire.encode_ack(self._note_acked()))

    # outgoing --------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self._sent_something = True
        self.transport.write(data)

    def send_data(self, first_seq: int, payload: bytes) -> None:
        self._sent_something = True
        if self.paused:
            self.backlog += len(payload)
        self.transport.writeSequence([wire.data_header(first_seq, self._note_acked(), len(payload)), payload])

    def send_json(self, kind: int, obj: dict) -> None:
        self.write(wire.encode_json(kind, obj))

    def say_goodbye(self, reason: str) -> None:
        """Leave cleanly: the peer holds no resume for this session."""
        if self.closed or self.goodbye_sent:
            return
        self.goodbye_sent = True
        self.send_json(wire.GOODBYE, {"reason": reason})
        self.close()

    # keepalive -------------------------------------------------------------

    def _keepalive_due(self) -> None:
        self._keepalive_call = self.clock.callLater(self.keepalive.next_interval(), self._keepalive_due)
        if not self._sent_something and self.ready:
            self.write(wire.encode_null(self._note_acked(), self.keepalive.padding()))
        self._sent_something = False

    def _deadline_due(self) -> None:
        idle = self.clock.seconds() - self._last_received
        if idle >= self.keepalive.timeout:
            self._deadline_call = None
            self.fail(f"nothing received for {idle:.0f} seconds (keepalive timeout)")
        else:
            self._deadline_call = self.clock.callLater(self.keepalive.timeout - idle, self._deadline_due)

    # IPushProducer -----------------------------------------------------------

    def hold_back(self, source: "Link") -> None:
        """Stop reading C{source} until this link's transport resumes."""
        if source is self or source in self._held_back or source.closed:
            return
        self._held_back.add(source)
        source._holds += 1
        if source._holds == 1:
            source.transport.pauseProducing()
        if self._stall_call is None:
            self._stall_call = self.clock.callLater(STALL_TIME, self._stalled)

    def _stalled(self) -> None:
        self._stall_call = None
        if self.paused:
            self.stalled = True
            self._release()

    def _release(self) -> None:
        held, self._held_back = self._held_back, set()
        for source in held:
            source._holds -= 1
            if source._holds == 0 and not source.closed:
                source.transport.resumeProducing()

    @property
    def full(self) -> bool:
        """The port's queue is full, or its card stalled: a switch drops what comes now."""
        return self.paused and (self.stalled or self.backlog >= PORT_QUEUE)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.stalled = False
        self.backlog = 0
        if self._stall_call is not None and self._stall_call.active():
            self._stall_call.cancel()
        self._stall_call = None
        self._release()

    def stopProducing(self) -> None:
        pass


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
            if "certificate verify failed" in str(value):
                return "the hub's certificate is not signed by the trusted CA (certificate verify failed)"
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
