"""
The virtual HUB's Ethernet switch: a MAC-learning table per virtual hub.

Pure policy: no reactor, no sockets.  A virtual hub forwards frames between
I{ports} (L{sevpn.port.IPort}: cards' sessions, TAP devices, cascades).
Time comes from an injected clock function, so aging is tested without
waiting.

What it does, as a real switch does:
 - learns each source MAC -> the port it came from;
 - a frame to a known unicast MAC goes to that port only;
 - broadcast, multicast and unknown unicast are flooded to every other port;
 - a frame never goes back out of the port it came in on;
 - entries not refreshed for C{max_age} seconds (default 300, the same as
   Linux bridges and most hardware switches) are forgotten.

And what a switch facing the internet must do besides (a card's user may
be hostile):
 - a port learns at most C{max_macs} source MACs (its own limit, else the
   virtual hub's C{max_macs_per_port}); frames from further new MACs are
   dropped and counted (C{mac_limit_drops});
 - a live port cannot take over a MAC another live port owns: the frame is
   dropped and counted (C{mac_conflicts}) and the first owner keeps the
   MAC until it goes or the entry ages out.  With C{allow_moves} the table
   follows the latest sender instead, as a plain hardware switch does;
 - the table is bounded (C{max_entries}); a new MAC in a full table is
   refused in constant time (C{not_learned}) and its frame still forwarded;
 - a port may have a flood limit (C{flood_limit}, a token bucket of
   frames: storm control); broadcast, multicast and unknown unicast beyond
   it are dropped and counted (C{storm_drops});
 - an offload port's virtio-net headers are checked as frames enter
   (L{sevpn.offload.valid}: flags, segmentation type and size, checksum
   position); a bad one is dropped and counted (C{bad_headers});
 - each destination is sent its frames on its own: one port's failure never
   keeps the others from theirs.

Two hooks for whoever guards the segment against loops
(L{sevpn.loops.LoopGuard}), as 802.1D bridges have for their own
protocol: frames to L{CONTROL_GROUP} are handed to C{on_control} instead
of being forwarded (while no hook is set they are ordinary multicast), and
a port may be I{blocked} (L{VirtualHub.block}): it takes part in nothing
but control frames, its MACs are forgotten, and data from it is dropped
and counted (C{blocked_drops}).

Two hooks for whoever mirrors the table elsewhere (the fabric's FDB
reflection, L{sevpn.fabricport}): C{on_learn(mac, port)} when a MAC is
learned on a port, C{on_forget(mac, port)} when a port loses it (aged
out, the port removed or blocked); a MAC that moves is forgotten on its
old port, then learned on the new one.  They run only when the table
changes, never for a frame that refreshes an entry.  And a port whose
C{yields_macs} is true (the fabric port: its MACs live on other nodes)
gives up a MAC to any port that sends from it, without a conflict: the
station has moved here.

Frames are switched in two steps: L{VirtualHub.forward} (per message) puts
each frame in its destinations' outboxes, L{VirtualHub.flush} (once per read
from the source) hands each destination its frames in one call.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Set

from twisted.logger import Logger

from sevpn import defaults
from sevpn import offload as vnet
from sevpn.mac import format_mac
from sevpn.port import IPort

DEFAULT_MAX_AGE = defaults.MAC_AGE
DEFAULT_MAX_ENTRIES = 4096
#: Source MACs one port may own unless it says otherwise (SoftEther's
#: MaxMac policy): a card with a few VMs or a small bridged LAN behind it.
DEFAULT_MAX_MACS = 16
#: The group address of the hubs' own frames (loop probes between
#: cascaded hubs): multicast, locally administered, "sevpn" in ASCII.
CONTROL_GROUP = b"\x03sevpn"


class MacEntry:
    """Where a MAC was learned, and when it was first and last seen."""
    __slots__ = ("port", "seen", "learned")

    def __init__(self, port: IPort, now: float) -> None:
        self.port = port
        self.seen = now
        self.learned = now


class Conflict:
    """Two live ports sending from one MAC."""

    __slots__ = ("mac", "ports", "first", "last", "count")

    def __init__(self, mac: bytes, ports: Set[IPort], now: float) -> None:
        self.mac = mac
        self.ports = ports
        self.first = now
        self.last = now
        self.count = 1


class VirtualHub:
    """
    One Ethernet segment.  Virtual hubs share nothing: a frame enters and
    leaves through ports of the same virtual hub only.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        clock: Callable[[], float],
        max_age: float = DEFAULT_MAX_AGE,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_macs_per_port: int = DEFAULT_MAX_MACS,
        allow_moves: bool = False,
        on_conflict: Optional[Callable[["VirtualHub", Conflict], None]] = None,
    ) -> None:
        self.name = name
        self.clock = clock
        self.max_age = max_age
        self.max_entries = max_entries
        self.max_macs_per_port = max_macs_per_port
        self.allow_moves = allow_moves
        self.ports: List[IPort] = []
        self.table: Dict[bytes, MacEntry] = {}
        self.conflicts: Dict[bytes, Conflict] = {}
        self._on_conflict = on_conflict
        #: Frames switched and not yet flushed, per destination.
        self._outbox: Dict[IPort, list] = {}
        # counters
        self.flooded = 0
        self.unicast = 0
        self.filtered = 0
        self.not_learned = 0
        self.mac_limit_drops = 0
        self.mac_conflicts = 0
        self.runts = 0
        self.storm_drops = 0
        self.bad_headers = 0
        self.port_failures = 0
        #: C{on_control(vhub, source, frame)}: takes the frames to L{CONTROL_GROUP}.
        self.on_control: Optional[Callable[["VirtualHub", IPort, Sequence], None]] = None
        #: Ports taken out of forwarding (see L{block}).
        self.blocked: Set[IPort] = set()
        self.control_frames = 0
        self.blocked_drops = 0
        #: C{on_learn(mac, port)} / C{on_forget(mac, port)}: the table changed.
        self.on_learn: Optional[Callable[[bytes, IPort], None]] = None
        self.on_forget: Optional[Callable[[bytes, IPort], None]] = None

    # ports -----------------------------------------------------------------

    def add_port(self, port: IPort) -> None:
        """Attach a port: its frames go to this virtual hub (its sink is the switch)."""
        if port not in self.ports:
            self.ports.append(port)
            port.sink = self

    def remove_port(self, port: IPort) -> None:
        """Detach a port for good and forget every MAC learned on it."""
        if port in self.ports:
            self.ports.remove(port)
        self.blocked.discard(port)
        self._forget_port(port)

    def _forget_port(self, port: IPort) -> None:
        self._outbox.pop(port, None)
        forgotten = []
        for mac in list(port.macs):
            entry = self.table.get(mac)
            if entry is not None and entry.port is port:
                del self.table[mac]
                forgotten.append(mac)
        port.macs.clear()
        if self.on_forget is not None:
            for mac in forgotten:
                self.on_forget(mac, port)
        for mac in [m for m, c in self.conflicts.items() if port in c.ports]:
            del self.conflicts[mac]

    def block(self, port: IPort) -> None:
        """
        Take C{port} out of forwarding: nothing is switched to it, what it
        brings is dropped (control frames excepted), its MACs are forgotten.
        """
        if port in self.ports:
            self.ports.remove(port)
            self.blocked.add(port)
            self._forget_port(port)

    def unblock(self, port: IPort) -> None:
        """Let a blocked port forward again."""
        if port in self.blocked:
            self.blocked.discard(port)
            self.ports.append(port)

    def _blocked_input(self, source: IPort, frames: Sequence) -> None:
        offset = source.mac_offset
        control = self.on_control
        for frame in frames:
            if control is not None and frame[offset : offset + 6] == CONTROL_GROUP:
                self.control_frames += 1
                control(self, source, frame)
            else:
                self.blocked_drops += 1

    # the data path ---------------------------------------------------------

    def forward(self, source: IPort, frames: Sequence) -> None:
        """Put C{frames} that arrived on C{source} in their destinations' outboxes."""
        if self.blocked and source in self.blocked:
            self._blocked_input(source, frames)
            return
        control = self.on_control
        table = self.table
        outbox = self._outbox
        offset = source.mac_offset
        shortest = offset + 14
        now = self.clock()
        max_age = self.max_age
        last_src = None
        valid = vnet.valid if offset else None
        storm = getattr(source, "flood_limit", None)
        for frame in frames:
            if len(frame) < shortest:
                self.runts += 1
                continue
            if valid is not None and not valid(frame):
                # Headers from the network are checked where they enter,
                # not only before a kernel: no port relays a bad one.
                self.bad_headers += 1
                continue
            if control is not None and frame[offset] & 1 and frame[offset : offset + 6] == CONTROL_GROUP:
                self.control_frames += 1
                control(self, source, frame)
                continue
            src = bytes(frame[offset + 6 : offset + 12])
            if src != last_src:
                if not self._learn(src, source, now):
                    continue
                last_src = src
            dst = bytes(frame[offset : offset + 6])
            if not dst[0] & 1:
                entry = table.get(dst)
                if entry is not None:
                    if now - entry.seen > max_age:
                        self._forget(dst, entry)
                    elif entry.port is source:
                        self.filtered += 1
                        continue
                    else:
                        self.unicast += 1
                        box = outbox.get(entry.port)
                        if box is None:
                            outbox[entry.port] = [frame]
                        else:
                            box.append(frame)
                        continue
            if storm is not None and not storm.take(now):
                # Storm control: the port's broadcast, multicast and unknown
                # unicast beyond its rate go nowhere.
                self.storm_drops += 1
                continue
            self.flooded += 1
            for port in self.ports:
                if port is not source:
                    box = outbox.get(port)
                    if box is None:
                        outbox[port] = [frame]
                    else:
                        box.append(frame)

    def flush(self, source: IPort) -> None:
        """Hand every destination what C{source}'s frames were switched to."""
        outbox, self._outbox = self._outbox, {}
        offset = source.mac_offset
        for port, frames in outbox.items():
            try:
                port.deliver(frames, offset, source)
            except Exception:
                # A bug, not a peer's doing (input is validated where it
                # enters); still, it must cost that one port only.
                self.port_failures += 1
                self.log.failure("virtual hub {hub}: sending to {port} failed", hub=self.name, port=port.name)

    def claim(self, mac: bytes, port: IPort) -> bool:
        """
        Learn C{mac} on C{port} before any frame: a card's own MAC, said in
        its hello, is its own from the start.  False if another live port
        owns it (the same rule as for a frame).
        """
        return self._learn(mac, port, self.clock())

    def _learn(self, mac: bytes, port: IPort, now: float) -> bool:
        """Learn C{mac} on C{port}; False if the frame must be dropped."""
        if mac[0] & 1:
            return True  # a multicast source is bogus; never learn it
        entry = self.table.get(mac)
        if entry is not None and entry.port is port:
            entry.seen = now
            return True
        limit = port.max_macs or self.max_macs_per_port
        if entry is None:
            if limit and len(port.macs) >= limit:
                self.mac_limit_drops += 1
                return False
            if len(self.table) >= self.max_entries:
                self.not_learned += 1
                return True
            self.table[mac] = MacEntry(port, now)
            port.macs.add(mac)
            if self.on_learn is not None:
                self.on_learn(mac, port)
            return True
        old = entry.port
        if now - entry.seen <= self.max_age and old in self.ports and not getattr(old, "yields_macs", False):
            self._conflict(mac, {old, port}, now)
            if not self.allow_moves:
                self.mac_conflicts += 1
                return False
        if limit and len(port.macs) >= limit:
            self.mac_limit_drops += 1
            return False
        old.macs.discard(mac)
        port.macs.add(mac)
        entry.port = port
        entry.learned = entry.seen = now
        if self.on_forget is not None:
            self.on_forget(mac, old)
        if self.on_learn is not None:
            self.on_learn(mac, port)
        return True

    def _forget(self, mac: bytes, entry: MacEntry) -> None:
        del self.table[mac]
        entry.port.macs.discard(mac)
        if self.on_forget is not None:
            self.on_forget(mac, entry.port)

    def _conflict(self, mac: bytes, ports: Set[IPort], now: float) -> None:
        conflict = self.conflicts.get(mac)
        if conflict is not None and ports <= conflict.ports:
            conflict.last = now
            conflict.count += 1
            return
        if conflict is not None:
            conflict.ports |= ports
            conflict.last = now
            conflict.count += 1
        else:
            conflict = self.conflicts[mac] = Conflict(mac, set(ports), now)
        if self._on_conflict is not None:
            self._on_conflict(self, conflict)

    # housekeeping ----------------------------------------------------------

    def expire(self) -> int:
        """Forget entries older than C{max_age}; return how many.  Run from a timer."""
        now = self.clock()
        old = [(m, e) for m, e in self.table.items() if now - e.seen > self.max_age]
        for mac, entry in old:
            self._forget(mac, entry)
        for mac in [m for m, c in self.conflicts.items() if now - c.last > self.max_age]:
            del self.conflicts[mac]
        return len(old)

    def release(self, mac: bytes, port: IPort) -> bool:
        """Forget C{mac} if C{port} owns it (it is known to be elsewhere now); whether it did."""
        entry = self.table.get(mac)
        if entry is None or entry.port is not port:
            return False
        self._forget(mac, entry)
        return True

    def lookup(self, mac: bytes) -> Optional[IPort]:
        """The port a unicast MAC lives behind now, or None."""
        entry = self.table.get(mac)
        if entry is None or self.clock() - entry.seen > self.max_age:
            return None
        return entry.port

    def describe_table(self) -> List[dict]:
        """The live MAC table, for status: MAC, port, age."""
        now = self.clock()
        return [
            {"mac": format_mac(mac), "port": e.port.name, "age": round(now - e.seen, 1)}
            for mac, e in sorted(self.table.items())
            if now - e.seen <= self.max_age
        ]

    def describe_conflicts(self) -> List[dict]:
        """MACs more than one live port sent from, for status."""
        return [
            {"mac": format_mac(c.mac), "ports": sorted(p.name for p in c.ports), "count": c.count}
            for c in self.conflicts.values()
        ]

    def counters(self) -> dict:
        """What the switch did with frames, by way and by cause."""
        return {
            "flooded": self.flooded,
            "unicast": self.unicast,
            "filtered": self.filtered,
            "not_learned": self.not_learned,
            "mac_limit_drops": self.mac_limit_drops,
            "mac_conflicts": self.mac_conflicts,
            "runts": self.runts,
            "bad_headers": self.bad_headers,
            "storm_drops": self.storm_drops,
            "port_failures": self.port_failures,
            "control_frames": self.control_frames,
            "blocked_drops": self.blocked_drops,
            "macs": len(self.table),
        }
