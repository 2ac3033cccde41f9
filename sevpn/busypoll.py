"""
Adaptive busy-polling: after traffic, stay awake for a moment.

A ping through the VPN crosses three processes and wakes each twice; a
process that slept is slow to wake (its CPU idled down, its caches went
cold): measured here, one hop costs ~0.05 ms hot and ~0.2 ms cold.  For a
short window after each piece of traffic the process keeps its reactor
turning (polling with a zero timeout) instead of sleeping, so the answer
that usually follows within a fraction of a millisecond finds it awake.
With no traffic it sleeps as before: the cost is a window of spinning per
burst, nothing when the line is idle.  Under load it does not spin at
all: traffic that comes back to back keeps the process awake by itself,
and spinning would only take the CPU from the other processes of the path
(measured on two cores: a third less throughput with it).  So only
traffic after a quiet gap (L{QUIET}) opens a window.

One per process, installed by the services (L{install}); links and TAP
ports report traffic with L{activity}, a no-op until installed (tests on
a fake clock never spin).
"""

from __future__ import annotations

import time
from typing import Optional

#: How long to stay awake after sparse traffic (seconds).
WINDOW = 0.0005
#: Traffic after this much quiet is sparse (a ping, a keystroke), and opens
#: a window; traffic closer than this is a flow, which needs none.
QUIET = 0.002


class BusyPoll:
    """Keeps C{reactor} turning for C{window} seconds after each L{activity}."""

    def __init__(self, reactor, window: float = WINDOW, monotonic=time.monotonic) -> None:
        self.reactor = reactor
        self.window = window
        self.monotonic = monotonic
        self._until = 0.0
        self._last = 0.0
        self._call = None
        #: How many reactor turns were spent awake (for measurements).
        self.turns = 0

    def activity(self) -> None:
        """Traffic happened: after a quiet gap, stay awake for a window."""
        now = self.monotonic()
        quiet, self._last = now - self._last, now
        if quiet < QUIET:
            return  # a flow: it keeps the process awake by itself
        self._until = now + self.window
        if self._call is None:
            self._call = self.reactor.callLater(0, self._turn)

    def _turn(self) -> None:
        if self.monotonic() < self._until:
            self.turns += 1
            self._call = self.reactor.callLater(0, self._turn)
        else:
            self._call = None

    def stop(self) -> None:
        """Stop spinning now."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()


_installed: Optional[BusyPoll] = None


def install(reactor, window: float = WINDOW) -> Optional[BusyPoll]:
    """Busy-poll this process's C{reactor} after traffic (a C{window} of 0 turns it off)."""
    global _installed
    uninstall()
    _installed = BusyPoll(reactor, window) if window > 0 else None
    return _installed


def uninstall() -> None:
    """Stop busy-polling (the service stops)."""
    global _installed
    if _installed is not None:
        _installed.stop()
    _installed = None


def activity() -> None:
    """Traffic happened: stay awake for a moment (if installed)."""
    if _installed is not None:
        _installed.activity()
