"""
When to retry, when to send a keepalive, when to give up on a peer.

Pure policies: each takes its randomness as a parameter, so the tests
draw from a seeded source and the reactor only ever sees numbers.
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
        low, high = self.interval
        return low + (high - low) * self.random()

    def padding(self) -> bytes:
        low, high = NULL_PADDING
        return self.randbytes(low + int((high - low + 1) * self.random()))


class LoginThrottle:
    """
    Failed logins per source address.  After C{allowed} failures within
    C{window} seconds an address is refused without a password check for
    C{penalty} seconds, doubling with each further failure up to
    C{max_penalty}: guessing gets slow, and costs the hub no scrypt work.
    A success clears the address.  The table is bounded (oldest forgotten).
    """

    def __init__(
        self,
        allowed: int = 5,
        window: float = 60.0,
        penalty: float = 10.0,
        max_penalty: float = 300.0,
        max_entries: int = 10000,
    ) -> None:
        self.allowed = allowed
        self.window = window
        self.penalty = penalty
        self.max_penalty = max_penalty
        self.max_entries = max_entries
        # address -> [failures, first failure, blocked until, current penalty]
        self._entries: dict = {}

    def blocked_for(self, address: str, now: float) -> float:
        """Seconds this address is still refused (0: it may try)."""
        entry = self._entries.get(address)
        if entry is None or entry[2] <= now:
            return 0.0
        return entry[2] - now

    def failed(self, address: str, now: float) -> None:
        entry = self._entries.get(address)
        if entry is None or now - entry[1] > max(self.window, entry[3]):
            if entry is None and len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]
            entry = self._entries[address] = [0, now, 0.0, 0.0]
        entry[0] += 1
        if entry[0] >= self.allowed:
            entry[3] = min(self.max_penalty, entry[3] * 2 if entry[3] else self.penalty)
            entry[2] = now + entry[3]

    def succeeded(self, address: str) -> None:
        self._entries.pop(address, None)
