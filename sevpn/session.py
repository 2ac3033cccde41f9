"""
A session: what survives a link.

A card's session with a virtual hub outlives any one TLS connection
(I{link}): when a link breaks without a goodbye, both ends keep the
session for the resume window, and a new link picks it up where the old
one stopped, losing nothing.  L{Session} is that state: the numbered
frames sent and not yet acknowledged (L{sevpn.sequencing.SendLog}), the
last frame delivered (L{sevpn.sequencing.ReceiveLog}), the counters, and
the links that carry it.

Links are attached and detached with one pair of calls, after
magic-wormhole's Dilation outbound: L{Session.use_link} (which resends
what the peer lacks) and L{Session.stop_using_link}.  A session may hold
several links at once; frames go out over the first one (the others are
there for the transports that join it later: more TCP connections, a UDP
channel), and a link that leaves hands its place to the next.

A UDP channel (L{sevpn.channel}) joins beside its TLS link while it
works and leaves when it does not: it is used without a resend (the link
beside it carries what is in flight), the output follows the pause state
of whichever link is first, and while it is there a I{shaper} may adjust
frames on their way (segment super-frames before they are numbered, clamp
the MSS of TCP SYNs).

Pure: no reactor, no sockets.  A session talks to two small interfaces:
the links below it (L{ILink}) and, above it, whoever takes its arriving
frames (L{IReceiver}: a switch port on the hub, the card's TAP port on a
card).  Frames flow link -> session -> receiver and receiver -> session
-> link, never around.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Set

from zope.interface import Attribute, Interface

from sevpn.sequencing import DEFAULT_LIMIT, Budget, ReceiveLog, SendLog


class ILink(Interface):
    """What a session needs of a link (L{sevpn.link.Link} provides it)."""

    def send_data(first_seq: int, payload: bytes) -> None:
        """Write one DATA message: frames numbered from C{first_seq}."""

    def pause_reading() -> None:
        """Stop reading the peer (backpressure toward the sender)."""

    def resume_reading() -> None:
        """Read the peer again."""

    def say_goodbye(reason: str) -> None:
        """End the session cleanly on this link (the peer holds no resume)."""

    def fail(reason: str) -> None:
        """Drop this link (the peer may resume on another)."""


class IShaper(Interface):
    """Adjusts frames on their way through a session (L{Session.shaper})."""

    def outgoing(frames: Sequence) -> Sequence:
        """The frames to number and send in place of C{frames}."""

    def incoming(frames: Sequence) -> Sequence:
        """The frames to deliver in place of C{frames} (as many, in order)."""


class IReceiver(Interface):
    """What a session delivers to (a port)."""

    def frames_received(frames: Sequence) -> None:
        """Frames from the peer, in order, each once."""

    def input_done() -> None:
        """Everything of one read from the peer was handed over: flush."""

    def output_paused() -> None:
        """The session's link cannot take more for now."""

    def output_resumed() -> None:
        """The session's link takes data again."""


class Session:
    """
    The sequence state of both directions of one session, its counters,
    and the links that carry it.  See the module docstring.

    @ivar sent: frames toward the peer, kept until acknowledged.
    @ivar received: what was delivered from the peer.
    """

    receiver = Attribute("The L{IReceiver} that takes arriving frames.")

    def __init__(self, buffer_limit: int = DEFAULT_LIMIT, budget: Optional[Budget] = None) -> None:
        self.sent = SendLog(buffer_limit, budget)
        self.received = ReceiveLog()
        self.receiver: Optional[IReceiver] = None
        self._links: List[ILink] = []
        self._reading_paused = False
        #: Links whose transport asked us to stop writing.
        self._paused_links: Set[ILink] = set()
        #: Whether the receiver was last told the output is paused.
        self._output_paused = False
        #: An L{IShaper} while a UDP channel needs one, else None.
        self.shaper: Optional[IShaper] = None
        #: The UDP channel's state and counters, for status (L{sevpn.channel.ChannelStatus}).
        self.udp = None
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.resumes = 0

    # links -------------------------------------------------------------------

    @property
    def link(self) -> Optional[ILink]:
        """The link frames go out on now, or None while the session is held."""
        return self._links[0] if self._links else None

    def can_resume_from(self, peer_received: int) -> bool:
        """Whether the peer's claim to have received up to C{peer_received} is possible."""
        return 0 <= peer_received < self.sent.next_seq

    def use_link(self, link: ILink, peer_received: Optional[int] = 0) -> None:
        """
        Carry this session over C{link} from now on, and resend, in order,
        every held frame above C{peer_received} (the last frame the peer
        says it got; check it first with L{can_resume_from}).  With
        C{peer_received=None} nothing is resent: C{link} joins beside a
        live one that carries what is in flight (a UDP channel).
        """
        if link in self._links:
            return
        self._links.insert(0, link)
        self.sent.linked = True
        if self._reading_paused:
            link.pause_reading()
        self._first_link_changed()
        if peer_received is None:
            return
        for first, payload in self.sent.resend_after(peer_received):
            link.send_data(first, payload)

    def stop_using_link(self, link: ILink) -> None:
        """C{link} is gone: frames are held until another link is used."""
        if link in self._links:
            self._links.remove(link)
        self._paused_links.discard(link)
        self.sent.linked = bool(self._links)
        self._first_link_changed()

    def _first_link_changed(self) -> None:
        """The output follows the pause state of the link that now carries it."""
        link = self.link
        if link is None or self.receiver is None:
            return
        paused = link in self._paused_links
        if paused != self._output_paused:
            self._output_paused = paused
            if paused:
                self.receiver.output_paused()
            else:
                self.receiver.output_resumed()

    def close(self) -> None:
        """The session ended: let go of what it held."""
        self._links = []
        self.sent.close()

    # toward the peer ---------------------------------------------------------

    def send_frames(self, frames: Sequence) -> None:
        """Number C{frames} and send them, or hold them while no link is up."""
        if self.shaper is not None:
            frames = self.shaper.outgoing(frames)
        if not frames:
            return
        first, payload = self.sent.append(frames)
        self.frames_out += len(frames)
        self.bytes_out += len(payload) - 4 * len(frames)
        if self._links:
            self._links[0].send_data(first, payload)

    # from the peer -----------------------------------------------------------

    def data_received(self, first_seq: int, ack: int, frames: Sequence, size: int) -> None:
        """
        DATA arrived on a link: C{frames} numbered from C{first_seq}, with
        C{size} frame bytes; C{ack} acknowledges what we sent.  Raises
        L{sevpn.sequencing.SequenceError} for an impossible ack.
        """
        self.sent.ack(ack)
        skip = self.received.accept(first_seq, len(frames))
        if skip:
            frames = frames[skip:]
        if frames:
            self.frames_in += len(frames)
            self.bytes_in += size
            if self.shaper is not None:
                frames = self.shaper.incoming(frames)
            self.receiver.frames_received(frames)

    def ack_received(self, ack: int) -> None:
        """The peer has every frame up to C{ack}."""
        self.sent.ack(ack)

    def input_done(self) -> None:
        """All messages of one read were handled."""
        if self.receiver is not None:
            self.receiver.input_done()

    @property
    def delivered(self) -> int:
        """The last frame number delivered from the peer: what we acknowledge."""
        return self.received.received

    # flow control ------------------------------------------------------------

    def link_paused(self, link: ILink) -> None:
        """C{link}'s transport asked us to stop writing for now."""
        self._paused_links.add(link)
        if link is self.link and self.receiver is not None:
            self._output_paused = True
            self.receiver.output_paused()

    def link_resumed(self, link: ILink) -> None:
        """C{link}'s transport takes data again."""
        self._paused_links.discard(link)
        if link is self.link and self.receiver is not None:
            self._output_paused = False
            self.receiver.output_resumed()

    def pause_reading(self) -> None:
        """Stop reading the peer until L{resume_reading} (a destination is full)."""
        self._reading_paused = True
        for link in self._links:
            link.pause_reading()

    def resume_reading(self) -> None:
        """Read the peer again on every link."""
        self._reading_paused = False
        for link in self._links:
            link.resume_reading()

    # status ------------------------------------------------------------------

    def counters(self) -> dict:
        """Traffic, resumes, what is held, resent and lost."""
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
            "frames_lost_inbound": self.received.lost,
            **(self.udp.counters() if self.udp is not None else {"udp": "off"}),
        }
