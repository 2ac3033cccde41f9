"""
When a UDP channel acknowledges what arrived: the TLS link's policy
(L{sevpn.link.Link}, whose numbers it takes), as a small class.

Acks are cumulative (the highest frame delivered), so acknowledging late
costs little: after L{ACK_FRAMES} frames or L{ACK_BYTES} bytes, or
L{ACK_DELAY} seconds after the first frame not yet acknowledged, whichever
comes first; every DATA going the other way carries the ack too, which
resets the count and makes the separate ACK unnecessary.

Time comes from the injected clock; sending is the caller's callable.
"""

from __future__ import annotations

from typing import Callable

from sevpn.link import ACK_BYTES, ACK_DELAY, ACK_FRAMES


class AckPolicy:
    """
    One link's acknowledgements.

    @param delivered: the session's highest delivered frame now (what an
        ack says).
    @param send_ack: write an ACK; it calls L{note} for the ack it carries.
    """

    def __init__(self, clock, delivered: Callable[[], int], send_ack: Callable[[], None],
                 frames: int = ACK_FRAMES, nbytes: int = ACK_BYTES, delay: float = ACK_DELAY) -> None:
        self.clock = clock
        self.delivered = delivered
        self.send_ack = send_ack
        self.max_frames = frames
        self.max_bytes = nbytes
        self.delay = delay
        #: The last ack sent.
        self.acked = 0
        self.frames = 0
        self.bytes = 0
        self._call = None

    def arrived(self, frames: int, nbytes: int) -> None:
        """Frames arrived (they count toward the next ack)."""
        self.frames += frames
        self.bytes += nbytes

    def settle(self) -> None:
        """A read is done: acknowledge now, later, or not at all."""
        if self.delivered() == self.acked:
            return
        if self.frames >= self.max_frames or self.bytes >= self.max_bytes:
            self.send_ack()
        elif self._call is None:
            self._call = self.clock.callLater(self.delay, self._due)

    def _due(self) -> None:
        self._call = None
        if self.delivered() != self.acked:
            self.send_ack()

    def note(self) -> int:
        """An ack goes out now (alone or on DATA): what it says."""
        ack = self.acked = self.delivered()
        self.frames = 0
        self.bytes = 0
        self.stop()  # it rode on a message: no separate one, no wakeup for it
        return ack

    def stop(self) -> None:
        """No ack is due (the link is gone, or one just went out)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
