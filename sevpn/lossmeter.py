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

Pure: samples come in as numbers.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Optional, Tuple

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
        if s1 - s0 < self.min_segments:
            return None
        return (r1 - r0) / (s1 - s0)

    def lossy(self) -> bool:
        """Whether the window shows a lossy line."""
        loss = self.loss()
        return loss is not None and loss >= self.threshold

    def reset(self) -> None:
        self._samples.clear()
