"""
When to retry, when to send a keepalive, when to give up on a peer.

Pure policies: each takes its randomness (and time) as a parameter, so the
tests draw from a seeded source and the reactor only ever sees numbers.
"""

from __future__ import annotations

import os
import random as _random
from typing import Callable, Tuple

#: Reconnect backoff (a card retries forever): the first retry after a loss is
#: immediate (so a session resumes at once), then 0.5 s doubling, capped at
#: 5 s, each delay drawn from its upper half ("equal jitter").  Never ends.
BACKOFF_INITIAL = 0.5
BACKOFF_FACTOR = 2.0
BACKOFF_CAP = 5.0

#: Keepalive (lines that drop idle connections): a NULL packet of ~50 bytes every 5-10 s of
#: silence; a peer silent for 30 s (three missed keepalives) is gone.
KEEPALIVE_INTERVAL = (5.0, 10.0)
KEEPALIVE_TIMEOUT = 30.0
NULL_PADDING = (24, 48)  # + 13 bytes of header and ack: 37-61 bytes


class Backoff:
    """A C{ClientService} retry policy: attempt number -> seconds."""

    def __init__(
        self,
        initial: float = BACKOFF_INITIAL,
        factor: float = BACKOFF_FACTOR,
        cap: float = BACKOFF_CAP,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.initial = initial
        self.factor = factor
        self.cap = cap
        self.random = random

    def __call__(self, attempt: int) -> float:
        if attempt <= 1:
            return 0.05 * self.random()
        base = min(self.cap, self.initial * self.factor ** min(attempt - 2, 64))
        return base * (0.5 + 0.5 * self.random())


class Keepalive:
    """The NULL-packet schedule and the dead-peer timeout of one side."""

    def __init__(
        self,
        interval: Tuple[float, float] = KEEPALIVE_INTERVAL,
        timeout: float = KEEPALIVE_TIMEOUT,
        random: Callable[[], float] = _random.random,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        low, high = interval
        if not 0 < low <= high:
            raise ValueError("the keepalive interval must be positive, its minimum first")
        if timeout <= high:
            raise ValueError("the keepalive timeout must be longer than the keepalive interval")
        self.interval = (low, high)
        self.timeout = timeout
        self.random = random
        self.randbytes = randbytes

    def next_interval(self) -> float:
        """Seconds of silence before the next NULL packet."""
        low, high = self.interval
        return low + (high - low) * self.random()

    def padding(self) -> bytes:
        """Random padding for a NULL packet."""
        low, high = NULL_PADDING
        return self.randbytes(low + int((high - low + 1) * self.random()))


class TokenBucket:
    """
    A rate with bursts: C{rate} tokens a second, at most C{burst} saved up.
    L{take} spends tokens if there are enough; time comes in as a number.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float, n: float = 1.0) -> bool:
        """Spend C{n} tokens if there are as many; False (nothing spent) if not."""
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.stamp = now
        if tokens >= n:
            self.tokens = tokens - n
            return True
        self.tokens = tokens
        return False
