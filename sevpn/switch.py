"""
The virtual HUB's Ethernet switch: a MAC-learning table per virtual hub.

Pure policy: no reactor, no sockets.  A virtual hub forwards frames between
I{ports} (the hub's sessions); a port is anything with an
C{enqueue(frame, offset)} method and a C{mac_offset}: the bytes in front of
the Ethernet header in the frames it sends and wants (an offload header
for cards with kernel offload, none otherwise).  A port converts frames of
another offset itself.  Time
comes in as a number, so aging is tested without waiting.

What it does, as a real switch does:
 - learns each source MAC -> the port it came from;
 - a frame to a known unicast MAC goes to that port only;
 - broadcast, multicast and unknown unicast are flooded to every other port;
 - a frame never goes back out of the port it came in on;
 - entries not refreshed for C{max_age} seconds (default 300, the same as
   Linux bridges and most hardware switches) are forgotten.

A MAC that moves between two ports that are both still attached is a
I{duplicate}: two cards using one address.  The table follows the most
recent sender (as hardware switches do), which makes both cards' traffic
unreliable; the hub logs it once per pair and shows it in its status so an
operator can fix the cards.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Protocol, Sequence, Set

from sevpn.mac import format_mac

DEFAULT_MAX_AGE = 300.0
DEFAULT_MAX_ENTRIES = 4096


class Port(Protocol):
    mac_offset: int

    def enqueue(self, frame, offset: int) -> None: ...


class MacEntry:
    __slots__ = ("port", "seen", "learned")

    def __init__(self, port: Port, now: float) -> None:
        self.port = port
        self.seen = now
        self.learned = now


class Duplicate:
    """Two live ports sending from one MAC."""

    __slots__ = ("mac", "ports", "first", "last", "moves")

    def __init__(self, mac: bytes, ports: Set[Port], now: float) -> None:
        self.mac = mac
        self.ports = ports
        self.first = now
        self.last = now
        self.moves = 1


class VirtualHub:
    """
    One Ethernet segment.  Virtual hubs share nothing: a frame enters and
    leaves through ports of the same virtual hub only.
    """

    def __init__(
        self,
        name: str,
        max_age: float = DEFAULT_MAX_AGE,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        on_duplicate=None,
    ) -> None:
        self.name = name
        self.max_age = max_age
        self.max_entries = max_entries
        self.ports: List[Port] = []
        self.table: Dict[bytes, MacEntry] = {}
        self.duplicates: Dict[bytes, Duplicate] = {}
        self._on_duplicate = on_duplicate
        # counters
        self.flooded = 0
        self.unicast = 0
        self.filtered = 0
        self.not_learned = 0
        self.runts = 0

    # ports -----------------------------------------------------------------

    def add_port(self, port: Port) -> None:
        if port not in self.ports:
            self.ports.append(port)

    def remove_port(self, port: Port) -> None:
        """Detach a port for good and forget every MAC learned on it."""
        if port in self.ports:
            self.ports.remove(port)
        for mac in [m for m, e in self.table.items() if e.port is port]:
            del self.table[mac]
        for mac in [m for m, d in self.duplicates.items() if port in d.ports]:
            del self.duplicates[mac]

    # the data path ---------------------------------------------------------

    def forward(self, source: Port, frames: Sequence, now: float) -> None:
        """Switch C{frames} that arrived on C{source}."""
        table = self.table
        offset = source.mac_offset
        shortest = offset + 14
        max_age = self.max_age
        last_src = None
        for frame in frames:
            if len(frame) < shortest:
                self.runts += 1
                continue
            dst = bytes(frame[offset : offset + 6])
            src = bytes(frame[offset + 6 : offset + 12])
            if src != last_src:
                self._learn(src, source, now)
                last_src = src
            else:
                entry = table.get(src)
                if entry is not None and entry.port is source:
                    entry.seen = now
            if not dst[0] & 1:
                entry = table.get(dst)
                if entry is not None:
                    if now - entry.seen > max_age:
                        del table[dst]
                    elif entry.port is source:
                        self.filtered += 1
                        continue
                    else:
                        self.unicast += 1
                        entry.port.enqueue(frame, offset)
                        continue
            self.flooded += 1
            for port in self.ports:
                if port is not source:
                    port.enqueue(frame, offset)

    def _learn(self, mac: bytes, port: Port, now: float) -> None:
        if mac[0] & 1:
            return  # a multicast source is bogus; never learn it
        entry = self.table.get(mac)
        if entry is None:
            if len(self.table) >= self.max_entries:
                self.expire(now)
                if len(self.table) >= self.max_entries:
                    self.not_learned += 1
                    return
            self.table[mac] = MacEntry(port, now)
            return
        if entry.port is not port:
            old = entry.port
            if old in self.ports and now - entry.seen <= self.max_age:
                self._duplicate(mac, {old, port}, now)
            entry.port = port
            entry.learned = now
        entry.seen = now

    def _duplicate(self, mac: bytes, ports: Set[Port], now: float) -> None:
        dup = self.duplicates.get(mac)
        if dup is not None and ports <= dup.ports:
            dup.last = now
            dup.moves += 1
            return
        if dup is not None:
            dup.ports |= ports
            dup.last = now
            dup.moves += 1
        else:
            dup = self.duplicates[mac] = Duplicate(mac, set(ports), now)
        if self._on_duplicate is not None:
            self._on_duplicate(self, dup)

    # housekeeping ----------------------------------------------------------

    def expire(self, now: float) -> int:
        """Forget entries older than C{max_age}; return how many."""
        old = [m for m, e in self.table.items() if now - e.seen > self.max_age]
        for mac in old:
            del self.table[mac]
        for mac in [m for m, d in self.duplicates.items() if now - d.last > self.max_age]:
            del self.duplicates[mac]
        return len(old)

    def lookup(self, mac: bytes, now: float) -> Optional[Port]:
        entry = self.table.get(mac)
        if entry is None or now - entry.seen > self.max_age:
            return None
        return entry.port

    def describe_table(self, now: float, name_of=repr) -> List[dict]:
        return [
            {
                "mac": format_mac(mac),
                "session": name_of(e.port),
                "age": round(now - e.seen, 1),
            }
            for mac, e in sorted(self.table.items())
            if now - e.seen <= self.max_age
        ]

    def counters(self) -> dict:
        return {
            "flooded": self.flooded,
            "unicast": self.unicast,
            "filtered": self.filtered,
            "not_learned": self.not_learned,
            "runts": self.runts,
        }

    def describe_duplicates(self, name_of=repr) -> List[dict]:
        return [
            {
                "mac": format_mac(d.mac),
                "sessions": sorted(name_of(p) for p in d.ports),
                "moves": d.moves,
            }
            for d in self.duplicates.values()
        ]

