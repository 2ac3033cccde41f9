"""
What the hub does about strangers: bounds per actor for connecting,
logging in and being logged about.

Pure policies: time comes in as a number, nothing here touches a socket.
Anyone who can reach the hub's port is an actor (an address); anyone who
names a user is another (an address and a user).  Every table here is
bounded; an actor that goes past a bound costs only itself, and what is
refused is counted.

 - L{Admission}: connections that have not logged in yet, per address and
   in all, and how fast an address may open new ones;
 - L{LoginGuard}: password guessing, keyed on the address I{and} the user
   name, attempts in progress counted, the penalty growing with each
   failure; plus a bound on password checks per address and in all, so
   guessing many names from one address cannot eat the hub's CPU;
 - L{SourceSummary}: repeated refusals of one source logged once per
   interval with a count, so a flood floods no log.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Hashable, List, Optional, Tuple

from sevpn.timing import TokenBucket


class _Bounded(OrderedDict):
    """A table that forgets its least recently touched entries past C{limit}."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def touch(self, key: Hashable, default_factory):
        entry = self.get(key)
        if entry is None:
            entry = default_factory()
            self[key] = entry
            while len(self) > self.limit:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return entry


class Admission:
    """
    Connections in their handshake (TLS and hello not done yet).  An
    address may hold C{per_address} of them and open C{rate} new ones a
    second (bursts of C{burst}); all addresses together C{total}.  One
    address's flood is turned away at once without touching others'.
    """

    def __init__(
        self, per_address: int = 8, total: int = 1024, rate: float = 10.0, burst: int = 30,
        max_addresses: int = 65536,
    ) -> None:
        self.per_address = per_address
        self.total = total
        self.rate = rate
        self.burst = burst
        self.handshaking = 0
        self.turned_away = 0
        self._by_address: Dict[str, int] = {}
        self._buckets = _Bounded(max_addresses)

    def admit(self, address: str, now: float) -> Optional[str]:
        """None if a connection from C{address} may start its handshake; else why not."""
        why = None
        if self.handshaking >= self.total:
            why = f"{self.handshaking} connections are in their handshake (the hub's limit)"
        elif self._by_address.get(address, 0) >= self.per_address:
            why = f"{self.per_address} connections from this address are in their handshake (the limit)"
        elif not self._buckets.touch(address, lambda: TokenBucket(self.rate, self.burst, now)).take(now):
            why = f"more than {self.rate:g} new connections a second from this address"
        if why is not None:
            self.turned_away += 1
            return why
        self.handshaking += 1
        self._by_address[address] = self._by_address.get(address, 0) + 1
        return None

    def done(self, address: str) -> None:
        """A connection admitted from C{address} finished its handshake (or ended)."""
        self.handshaking -= 1
        left = self._by_address.get(address, 0) - 1
        if left > 0:
            self._by_address[address] = left
        else:
            self._by_address.pop(address, None)


class _Failures:
    __slots__ = ("count", "last", "blocked_until", "penalty", "pending")

    def __init__(self, now: float) -> None:
        self.count = 0
        self.last = now
        self.blocked_until = 0.0
        self.penalty = 0.0
        self.pending = 0

    def forget_if_quiet(self, now: float, window: float) -> None:
        """Failures long past (a window, or twice the penalty, after the last) are forgotten."""
        if self.count and now - self.last > max(window, 2 * self.penalty):
            self.count = 0
            self.penalty = 0.0


class LoginGuard:
    """
    Password guessing, per address and user name.  After C{allowed}
    failures within C{window} seconds (checks still in progress count as
    failures until they are done) that pair is refused without a check for
    C{penalty} seconds; after it, one check at a time, each further failure
    doubling the penalty up to C{max_penalty}.  Failures are forgotten after
    a quiet C{window} (or twice the penalty).  A success clears that pair only: a guesser's own
    account does not clear its guessing at others, and one guesser behind
    an address locks out no other user behind it.

    Password checks cost CPU (scrypt), so an address may have
    C{checks_per_address} in progress and start C{check_rate} a second
    (bursts of C{check_burst}), and the hub C{max_checks} in all; past
    that a login is refused as throttled before any work is done.
    """

    def __init__(
        self,
        allowed: int = 5,
        window: float = 60.0,
        penalty: float = 10.0,
        max_penalty: float = 3600.0,
        checks_per_address: int = 4,
        check_rate: float = 2.0,
        check_burst: int = 20,
        max_checks: int = 64,
        max_entries: int = 65536,
    ) -> None:
        self.allowed = allowed
        self.window = window
        self.penalty = penalty
        self.max_penalty = max_penalty
        self.checks_per_address = checks_per_address
        self.check_rate = check_rate
        self.check_burst = check_burst
        self.max_checks = max_checks
        self.checking = 0
        self._pairs = _Bounded(max_entries)
        self._buckets = _Bounded(max_entries)
        self._checks: Dict[str, int] = {}

    def begin(self, address: str, user: str, now: float) -> Optional[float]:
        """
        Whether a password check may run for C{user} from C{address}: None
        if it may (it is then in progress until L{end}); else the seconds
        to wait (0 when the bound is on checks in progress, not a penalty).
        """
        pair = self._pairs.get((address, user))
        if pair is not None:
            if pair.blocked_until > now:
                return pair.blocked_until - now
            pair.forget_if_quiet(now, self.window)
            if pair.count >= self.allowed:
                if pair.pending:  # past the allowance: one check at a time
                    return max(1.0, pair.penalty)
            elif pair.count + pair.pending >= self.allowed:
                return max(1.0, pair.penalty or self.penalty)
        if self.checking >= self.max_checks or self._checks.get(address, 0) >= self.checks_per_address:
            return 0.0
        if not self._buckets.touch(address, lambda: TokenBucket(self.check_rate, self.check_burst, now)).take(now):
            return 0.0
        pair = self._pairs.touch((address, user), lambda: _Failures(now))
        pair.pending += 1
        self.checking += 1
        self._checks[address] = self._checks.get(address, 0) + 1
        return None

    def end(self, address: str, user: str, ok: bool, now: float) -> None:
        """The check L{begin} allowed is done; C{ok} if the login succeeded."""
        self.checking -= 1
        left = self._checks.get(address, 0) - 1
        if left > 0:
            self._checks[address] = left
        else:
            self._checks.pop(address, None)
        pair = self._pairs.get((address, user))
        if pair is None:
            return
        pair.pending -= 1
        if ok:
            if not pair.pending:
                del self._pairs[(address, user)]
            return
        pair.forget_if_quiet(now, self.window)
        pair.count += 1
        pair.last = now
        if pair.count >= self.allowed:
            pair.penalty = min(self.max_penalty, pair.penalty * 2 if pair.penalty else self.penalty)
            pair.blocked_until = now + pair.penalty


class SourceSummary:
    """
    One log line per source per C{interval} for repeated events: the first
    is logged as it happens, the rest are counted and summed up later.
    """

    def __init__(self, interval: float = 60.0, max_sources: int = 4096) -> None:
        self.interval = interval
        self._sources = _Bounded(max_sources)

    def note(self, source: str, now: float) -> bool:
        """Record one event of C{source}; True if it should be logged now."""
        entry = self._sources.get(source)
        if entry is None or now - entry[0] >= self.interval:
            self._sources.touch(source, lambda: [now, 0])[:] = [now, 0]
            return True
        entry[1] += 1
        return False

    def due(self, now: float) -> List[Tuple[str, int]]:
        """Sources whose interval ended with events not logged: (source, count); forgets them."""
        out = []
        for source, entry in list(self._sources.items()):
            if now - entry[0] >= self.interval:
                if entry[1]:
                    out.append((source, entry[1]))
                del self._sources[source]
        return out
