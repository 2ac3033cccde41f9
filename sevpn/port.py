"""
Switch ports: what a virtual hub forwards between.

A virtual hub (L{sevpn.switch.VirtualHub}) knows nothing of sessions,
sockets or TAP devices: it forwards frames between I{ports}.  A card's
session is one kind of port (L{SessionPort}); a TAP device is another
(L{sevpn.tapdevice.TapPort}, the card's own side and the hub's bridge
ports); cascades and fabric links are more.  Every kind offers the same
small interface (L{IPort}) and inherits the same queue policy from
L{Port}, so backpressure, stalls and congestion drops are decided once,
here, for all of them:

 - a destination that cannot take more (its transport paused) still gets
   what is switched to it, and the source that sent it stops being read
   until the destination drains: TCP flow control carries the pressure
   back to the sender and nothing is lost in the hub;
 - past C{queue_limit} bytes written while paused (floods from many
   sources), frames for it are dropped and counted (C{congestion_drops});
 - a destination paused for C{stall_time} is I{stalled}: the sources held
   for it are let go, and what is switched to it is dropped until it takes
   data again, so one stuck card never holds up the others;
 - a queue that stands (paused longer than a few milliseconds, L{sevpn.aqm})
   signals congestion early: a frame is ECN-marked when its packet allows
   it (L{sevpn.ecn}), else dropped, so the senders slow down before the
   queue is long.  The byte limit stays as the bound on memory.

Pure: time comes from an injected clock (C{seconds}/C{callLater}); the
I/O is the subclass's C{transmit} and C{pause_input}/C{resume_input}.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Set

from zope.interface import Attribute, Interface, implementer

from sevpn import ecn
from sevpn import offload as vnet
from sevpn.aqm import Codel
from sevpn.session import IReceiver, Session
from sevpn.timing import TokenBucket

#: Bytes a destination may still be given after its transport asked to
#: pause: the depth of a switch port's queue.  About half a millisecond at
#: the hub's pace on a fast link; on a slow line the queue's delay is what
#: is managed (L{sevpn.aqm}), this is the bound on memory.
PORT_QUEUE = 128 * 1024
#: A port paused this long is stalled (see the module docstring).
STALL_TIME = 0.5


class IPort(Interface):
    """One attachment of a virtual hub: a card's session, a TAP, a cascade."""

    name = Attribute("What the port is, for status and logs (a session id, 'bridge:eth1').")
    mac_offset = Attribute(
        "Bytes in front of the Ethernet header in the frames it sends and takes: "
        "10 (a virtio-net header) for offload ports, else 0."
    )
    max_macs = Attribute("The most source MACs the switch learns on this port.")
    macs = Attribute("The set of MACs the switch has learned on this port (kept by the switch).")

    def deliver(frames: Sequence, offset: int, source: Optional["IPort"]) -> None:
        """
        Send C{frames} (each with C{offset} bytes before its Ethernet header)
        that C{source} brought; a port converts offsets itself.
        """

    def accepting() -> bool:
        """Whether the port takes more frames now (backpressure)."""

    def hold_input() -> None:
        """A destination is full: stop bringing frames until L{release_input}."""

    def release_input() -> None:
        """The destination that held this port has room again."""

    def counters() -> dict:
        """The port's counters, for status and metrics."""


class ISink(Interface):
    """Where a port's arriving frames go: a virtual hub, or the card's cable."""

    def forward(source: IPort, frames: Sequence) -> None:
        """Switch C{frames} that arrived on C{source}."""

    def flush(source: IPort) -> None:
        """Send what the frames from C{source} were switched to."""


@implementer(IPort)
class Port:
    """
    The queue policy every port kind shares (see the module docstring).
    Subclasses provide L{transmit} and, if they can stop their input,
    L{pause_input}/L{resume_input}.
    """

    #: Whether a MAC learned here moves to any other port that sends from
    #: it, without a conflict (the fabric port: its stations live elsewhere).
    yields_macs = False

    def __init__(
        self,
        name: str,
        clock,
        mac_offset: int = 0,
        max_macs: int = 0,
        queue_limit: int = PORT_QUEUE,
        stall_time: float = STALL_TIME,
    ) -> None:
        self.name = name
        self.clock = clock
        self.mac_offset = mac_offset
        self.max_macs = max_macs
        self.macs: Set[bytes] = set()
        self.queue_limit = queue_limit
        self.stall_time = stall_time
        #: Where this port's arriving frames go (set by whoever attaches it).
        self.sink: Optional[ISink] = None
        self.congestion_drops = 0
        self.rate_drops = 0
        self.ecn_marks = 0
        #: Bytes a second this port may be given (a L{TokenBucket}), or None.
        self.out_limit: Optional[TokenBucket] = None
        #: Flooded frames a second this port may send (storm control), or None.
        self.flood_limit: Optional[TokenBucket] = None
        self.bad_frames = 0
        self.closed = False
        self._codel = Codel()
        self._paused_since = 0.0
        self._paused = False
        self._stalled = False
        #: Bytes given to the transport since it asked to pause.
        self._backlog = 0
        #: Sources held back until this port has room again.
        self._held: Set[IPort] = set()
        #: How many destinations hold this port's input.
        self._holds = 0
        self._stall_call = None

    def __repr__(self) -> str:
        return f"<{self.__class__.__name__} {self.name}>"

    # the switch's side ---------------------------------------------------------

    def accepting(self) -> bool:
        """L{IPort.accepting}: not stalled, and not past the byte bound while paused."""
        return not (self._stalled or (self._paused and self._backlog >= self.queue_limit))

    def deliver(self, frames: Sequence, offset: int, source: Optional[IPort] = None) -> None:
        """L{IPort.deliver}: convert, police, signal a standing queue, transmit; hold the source while paused."""
        if self.closed:
            return
        if self._stalled or (self._paused and self._backlog >= self.queue_limit):
            self.congestion_drops += len(frames)
            return
        if offset != self.mac_offset:
            frames = self._convert(frames)
            if not frames:
                return
        if self.out_limit is not None:
            frames = self._police(self.out_limit, frames)
            if not frames:
                return
        if self._paused:
            now = self.clock.seconds()
            if self._codel.signal(now - self._paused_since, now):
                frames = self._signal(frames)
                if not frames:
                    return
        self.transmit(frames)
        if self._paused:
            self._backlog += sum(map(len, frames))
            if source is not None and source is not self:
                self._hold(source)

    def set_limits(self, out_bits: int = 0, flood_frames: int = 0) -> None:
        """
        A rate for what this port is given (bits a second; 0: none) and a
        flood limit for what it sends (frames a second; 0: none).  Bursts of
        a tenth of a second are let through (at least two super-frames).
        """
        now = self.clock.seconds()
        self.out_limit = TokenBucket(out_bits / 8, max(out_bits / 80, 2 * 65600), now) if out_bits else None
        self.flood_limit = TokenBucket(flood_frames, max(flood_frames / 10, 10), now) if flood_frames else None

    def _police(self, bucket: TokenBucket, frames: Sequence) -> List:
        """The frames the rate allows; the others are dropped and counted."""
        now = self.clock.seconds()
        kept = [f for f in frames if bucket.take(now, len(f))]
        self.rate_drops += len(frames) - len(kept)
        return kept

    def _signal(self, frames: Sequence) -> List:
        """Tell the senders of a standing queue: mark the first frame that allows it, else drop one."""
        frames = list(frames)
        for i, frame in enumerate(frames):
            marked = ecn.mark(frame, self.mac_offset)
            if marked is not None:
                frames[i] = marked
                self.ecn_marks += 1
                return frames
        self.congestion_drops += 1
        return frames[1:]

    def _convert(self, frames: Sequence) -> List:
        """Frames of the other offset: add an empty offload header, or segment."""
        if self.mac_offset:
            return [vnet.from_plain(f) for f in frames]
        plain: List = []
        for frame in frames:
            try:
                plain.extend(vnet.to_plain(frame))
            except vnet.BadFrame:
                self.bad_frames += 1
        return plain

    def transmit(self, frames: Sequence) -> None:
        """Hand C{frames} (already in this port's offset) to the I/O."""
        raise NotImplementedError

    # the I/O's side: flow control ----------------------------------------------

    def output_paused(self) -> None:
        """The transport below cannot take more for now."""
        if not self._paused:
            self._paused = True
            self._paused_since = self.clock.seconds()

    def output_resumed(self) -> None:
        """The transport below takes data again: release the held sources."""
        self._paused = False
        self._stalled = False
        self._backlog = 0
        self._codel.drained()
        self._cancel_stall()
        self._release()

    def _hold(self, source: IPort) -> None:
        if source in self._held:
            return
        self._held.add(source)
        source.hold_input()
        if self._stall_call is None:
            self._stall_call = self.clock.callLater(self.stall_time, self._stall)

    def _stall(self) -> None:
        self._stall_call = None
        if self._paused:
            self._stalled = True
            self._release()

    def _release(self) -> None:
        held, self._held = self._held, set()
        for source in held:
            source.release_input()

    def _cancel_stall(self) -> None:
        if self._stall_call is not None and self._stall_call.active():
            self._stall_call.cancel()
        self._stall_call = None

    # as a source ---------------------------------------------------------------

    def hold_input(self) -> None:
        """L{IPort.hold_input}: one more destination holds this port; the first pauses its input."""
        self._holds += 1
        if self._holds == 1 and not self.closed:
            self.pause_input()

    def release_input(self) -> None:
        """L{IPort.release_input}: one destination less; the last one resumes the input."""
        self._holds -= 1
        if self._holds == 0 and not self.closed:
            self.resume_input()

    def pause_input(self) -> None:
        """Stop reading (subclasses that can); the default keeps reading."""

    def resume_input(self) -> None:
        """Read again."""

    # life ----------------------------------------------------------------------

    def close(self) -> None:
        """The port is gone for good: let go of everything it held."""
        self.closed = True
        self._cancel_stall()
        self._release()

    def counters(self) -> dict:
        """L{IPort.counters}: drops by cause, ECN marks, bad frames."""
        return {"congestion_drops": self.congestion_drops, "ecn_marks": self.ecn_marks, "rate_drops": self.rate_drops,
                "bad_frames": self.bad_frames}


@implementer(IReceiver)
class SessionPort(Port):
    """
    A session as a port: what is switched to it is numbered and sent to
    the peer (or held while no link is up); what the peer sends is
    handed to the sink.  The hub gives one to every card's session; a
    card has one toward its hub.
    """

    def __init__(self, name: str, session: Session, clock, mac_offset: int = 0, **kw) -> None:
        super().__init__(name, clock, mac_offset, **kw)
        self.session = session
        session.receiver = self
        #: Bytes a second the peer may send (a L{TokenBucket}), or None.
        self.in_limit: Optional[TokenBucket] = None

    def set_limits(self, out_bits: int = 0, flood_frames: int = 0, in_bits: int = 0) -> None:
        """L{Port.set_limits}, and a rate for what the peer sends (bits a second; 0: none)."""
        Port.set_limits(self, out_bits, flood_frames)
        self.in_limit = TokenBucket(in_bits / 8, max(in_bits / 80, 2 * 65600), self.clock.seconds()) if in_bits else None

    def transmit(self, frames: Sequence) -> None:
        """Number and send the frames to the peer (held while no link is up)."""
        self.session.send_frames(frames)

    def pause_input(self) -> None:
        """Stop reading the peer (a destination is full)."""
        self.session.pause_reading()

    def resume_input(self) -> None:
        """Read the peer again."""
        self.session.resume_reading()

    # IReceiver: the session's side
    def frames_received(self, frames: Sequence) -> None:
        """L{IReceiver}: the peer's frames, within its rate, to the sink."""
        if self.in_limit is not None:
            frames = self._police(self.in_limit, frames)
        self.sink.forward(self, frames)

    def input_done(self) -> None:
        """L{IReceiver}: one read is over: the sink flushes."""
        self.sink.flush(self)

    def counters(self) -> dict:
        """The session's counters and the port's."""
        info = self.session.counters()
        info.update(Port.counters(self))
        return info


@implementer(ISink)
class Cable:
    """
    A card's patch cable: its TAP port on one end and, while it has a
    session, the session's port toward the hub on the other.  No learning
    and no batching: what one end brings goes to the other end at once.
    While no session is plugged in, what the OS sends is dropped and
    counted (the cable is unplugged).
    """

    def __init__(self, local: Port) -> None:
        self.local = local
        local.sink = self
        self.uplink: Optional[Port] = None
        self.unplugged_drops = 0

    def plug(self, uplink: Port) -> None:
        """A session's port joins the other end of the cable."""
        uplink.sink = self
        self.uplink = uplink

    def unplug(self) -> None:
        """The session is gone: its port is closed, the cable hangs loose."""
        if self.uplink is not None:
            self.uplink.close()
        self.uplink = None

    def forward(self, source: IPort, frames: Sequence) -> None:
        """L{ISink.forward}: what one end brings goes to the other, at once."""
        if source is self.local:
            uplink = self.uplink
            if uplink is None:
                self.unplugged_drops += len(frames)
                return
            uplink.deliver(frames, source.mac_offset, source)
        elif source is self.uplink:
            self.local.deliver(frames, source.mac_offset, source)

    def flush(self, source: IPort) -> None:
        """Nothing waits: L{forward} delivered already."""
