"""
Active queue management: when a port's queue stands, say so early.

A port whose transport is paused has a queue in front of it: what the
transport buffered, and what the kernel has not sent.  A queue that drains
within a few milliseconds absorbs a burst; a queue that I{stands} is only
delay.  L{Codel} is RFC 8289's control law on that standing queue: once
the queue has stayed above C{target} for a whole C{interval}, one frame is
signalled (ECN-marked, else dropped), then the next ones ever sooner
(C{interval / sqrt(count)}) until the queue drains.  The senders' TCP
backs off before the queue is long, instead of after it overflows.

The sojourn time is measured as the time since the port's transport
paused: while paused, nothing the port is given leaves at once.

Pure: time comes in as a number.
"""

from __future__ import annotations

from math import sqrt

#: The standing delay a port tolerates (RFC 8289's default for the internet).
TARGET = 0.005
#: How long the delay must stand before the first signal (about a worst-case RTT).
INTERVAL = 0.100


class Codel:
    """The CoDel control law, fed with sojourn times; see the module docstring."""

    __slots__ = ("target", "interval", "first_above", "dropping", "count", "drop_next")

    def __init__(self, target: float = TARGET, interval: float = INTERVAL) -> None:
        self.target = target
        self.interval = interval
        self.first_above = 0.0
        self.dropping = False
        self.count = 0
        self.drop_next = 0.0

    def signal(self, sojourn: float, now: float) -> bool:
        """Whether a frame leaving now after C{sojourn} seconds of queue must carry a signal."""
        if sojourn < self.target:
            self.first_above = 0.0
            self.dropping = False
            return False
        if not self.dropping:
            if not self.first_above:
                self.first_above = now + self.interval
                return False
            if now < self.first_above:
                return False
            self.dropping = True
            # Back into congestion soon after the last episode: resume near its rate.
            recent = self.count > 2 and now - self.drop_next < 16 * self.interval
            self.count = self.count - 2 if recent else 1
            self.drop_next = now + self.interval / sqrt(self.count)
            return True
        if now >= self.drop_next:
            self.count += 1
            self.drop_next += self.interval / sqrt(self.count)
            return True
        return False

    def drained(self) -> None:
        """The queue is empty: no standing delay."""
        self.first_above = 0.0
        self.dropping = False
