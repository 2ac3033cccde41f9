"""
Is the line lossy?  The question that decides whether a UDP channel
carries a session's frames.

A TCP-carried VPN is fast on a clean line (64 KiB super-frames cross whole,
one system call each) and collapses on a lossy one (TCP over TCP); a UDP
channel is the other way round (every 1.4 KB frame is its own datagram,
sealed, sent and opened in Python, but a lost one costs the inner TCP a
single segment).  So the channel stands by while the line is clean and
carries while it is lossy.  L{LossMeter} answers from the TLS link's own
TCP counters (C{TCP_INFO}: segments sent, segments retransmitted), over a
sliding window, so one burst at start-up does not decide.

Loss alone does not tell a lossy line from a full one: a TCP that fills a
rate-limited line's queue retransmits too, and there TCP is the faster
carrier.  So L{CarryPolicy} makes UDP carry on trial: after L{TRIAL}
seconds it compares the most the session sent per second over UDP with
the most it sent over TCP just before (the peak between two samples, so
that a flow starting or ending within a window does not count as a slow
carrier), and gives the frames back to TCP when UDP moved clearly less,
not trying again for a while (L{HOLD}, doubling).

Pure: samples come in as numbers.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, List, Optional, Sequence, Tuple

#: Samples kept: with one every L{SAMPLE_INTERVAL} s, a window of 10 s.
WINDOW = 5
#: How often the link's counters are read.
SAMPLE_INTERVAL = 2.0
#: Retransmitted segments per segment sent that make a line lossy.  A clean
#: line (a LAN, a good fibre) stays well below; random loss on a radio or
#: a congested path is well above.
LOSSY = 0.003
#: Segments a window must have sent before it says anything.
MIN_SEGMENTS = 500
#: How long UDP carries on trial before its rate is compared with TCP's.
TRIAL = 10.0
#: UDP that moved less than this share of TCP's rate lost its trial.
KEEP = 0.9
#: After a lost trial, TCP carries at least this long; doubles with every
#: lost trial in a row, up to L{HOLD_MAX}.
HOLD = 60.0
HOLD_MAX = 960.0


class LossMeter:
    """Samples of (retransmitted, sent) segment totals; see the module docstring."""

    def __init__(self, window: int = WINDOW, lossy: float = LOSSY, min_segments: int = MIN_SEGMENTS) -> None:
        self.window = window
        self.threshold = lossy
        self.min_segments = min_segments
        self._samples: Deque[Tuple[int, int]] = deque(maxlen=window + 1)

    def sample(self, retransmitted: int, sent: int) -> None:
        """The link's totals now (they only grow; a smaller total starts over)."""
        if self._samples and (retransmitted < self._samples[-1][0] or sent < self._samples[-1][1]):
            self._samples.clear()
        self._samples.append((retransmitted, sent))

    def loss(self) -> Optional[float]:
        """Retransmissions per segment over the window, or None while too little was sent."""
        if len(self._samples) < 2:
            return None
        (r0, s0), (r1, s1) = self._samples[0], self._samples[-1]
        if s1 - s0 < max(self.min_segments, 1):
            return None
        return (r1 - r0) / (s1 - s0)

    def lossy(self) -> bool:
        """Whether the window shows a lossy line."""
        loss = self.loss()
        return loss is not None and loss >= self.threshold

    def reset(self) -> None:
        self._samples.clear()


class CarryPolicy:
    """
    Whether an C{auto} UDP channel should carry: the line is lossy, and
    on trial UDP moves at least L{KEEP} of what TCP moved (see the module
    docstring).  Samples come from the channel every couple of seconds:
    L{tcp_sample} while TCP carries, L{udp_sample} while UDP does.
    """

    def __init__(self, meter: Optional[LossMeter] = None) -> None:
        self.meter = meter if meter is not None else LossMeter()
        #: Samples (time, bytes the session sent) while TCP carries.
        self._sent: Deque[Tuple[float, int]] = deque(maxlen=self.meter.window + 1)
        #: When the trial running started, or None; its samples (time, bytes sent).
        self._trial: Optional[float] = None
        self._trial_sent: List[Tuple[float, int]] = []
        self._hold_until = 0.0
        self._hold = HOLD
        #: The rates (bytes a second) of the last comparison.
        self.tcp_rate: Optional[float] = None
        self.udp_rate: Optional[float] = None

    def tcp_sample(self, now: float, retransmitted: int, sent_segments: int, sent_bytes: int) -> bool:
        """
        A reading while TCP carries: the link's TCP totals and the session's
        bytes sent so far.  True: the line is lossy, try UDP now.
        """
        self.meter.sample(retransmitted, sent_segments)
        self._sent.append((now, sent_bytes))
        if now < self._hold_until or not self.meter.lossy():
            return False
        self.tcp_rate = _peak_rate(self._sent)
        return True

    def carrying(self, now: float, sent_bytes: int) -> None:
        """UDP starts to carry (on trial when L{tcp_sample} asked for it)."""
        self._trial = now if self.tcp_rate is not None else None
        self._trial_sent = [(now, sent_bytes)]

    def udp_sample(self, now: float, sent_bytes: int) -> Optional[bool]:
        """
        A reading while UDP carries: None while there is nothing to decide;
        at the end of a trial, True (UDP stays) or False (back to TCP).
        """
        if self._trial is None:
            return None
        self._trial_sent.append((now, sent_bytes))
        if now - self._trial < TRIAL:
            return None
        self._trial = None
        self.udp_rate = _peak_rate(self._trial_sent)
        if self.udp_rate >= KEEP * (self.tcp_rate or 0.0):
            self._hold = HOLD
            return True
        self._hold_until = now + self._hold
        self._hold = min(self._hold * 2, HOLD_MAX)
        return False

    def restart(self) -> None:
        """Measure the line afresh (TCP carries again); a hold stays."""
        self.meter.reset()
        self._sent.clear()
        self._trial = None
        self.tcp_rate = None


def _peak_rate(samples: Sequence[Tuple[float, int]]) -> float:
    """The highest bytes a second between two consecutive (time, bytes) samples; 0 without two."""
    samples = list(samples)
    rates = [(b1 - b0) / (t1 - t0) for (t0, b0), (t1, b1) in zip(samples, samples[1:]) if t1 > t0]
    return max(rates, default=0.0)
