"""
Loops of cascades: found with probes, broken by blocking one cascade per loop.

Cascades join virtual hubs of different hubs into one Ethernet segment.
Two cascades too many (A dials B and B dials A, or a ring A->B->C->A) make
a loop: without a guard every flooded frame would come round again.  The
switch's MAC ownership already drops a frame that comes back to a hub
whose local port owns its source MAC, so a loop does not multiply frames
from known stations; but each flood still crosses the loop's links twice,
frames from sources the switch cannot learn (a full table) would circle
for ever, and the MAC table would log conflicts all day.  So each hub runs
a L{LoopGuard} on every virtual hub that has cascade ports, a minimal
relative of 802.1D's spanning tree:

 - B{probes}: every second (jittered) a hub sends a small probe frame
   out of each cascade it dials: to the reserved group address
   L{sevpn.switch.CONTROL_GROUP}, ethertype 0x88B5 (IEEE 802 local
   experimental), carrying the cascade's random link id and a sequence
   number.  The switch hands such frames to the guard instead of
   forwarding them; a guard floods a foreign probe on to its own
   cascade ports (each copy once, at most L{MAX_HOPS} hops, rate-bounded),
   never to cards: a card can neither see nor forge a probe, and only
   users the operator marked as cascade users get cascade sessions.
 - B{detection}: a probe that comes back to the hub it left, on the same
   virtual hub, went round a loop through the cascade it left by.  That is
   logged loudly (an error), counted, and the cascade is I{blocked}: the
   switch forwards nothing to or from it but probes (L{VirtualHub.block}).
 - B{one block per loop}: both hubs of an A<->B loop see their own probes
   come back; were both to block, the sites would be cut apart.  A probe
   crossing a blocked cascade records the heaviest blocked link id it
   crossed (C{mark}); a cascade stays blocked only while one of its probes
   comes back without crossing a heavier blocked cascade.  Per loop the
   heaviest link stays blocked and the others forward: blocking the
   heaviest link of every cycle leaves a spanning tree (the cycle property
   of minimum spanning trees), and each link's state depends only on
   heavier ones', so it settles in a few rounds.  Link ids are random with
   the top bit set until the cascade has forwarded once, so a new cascade
   is heavier than every established one: adding a redundant cascade
   blocks the new one and never takes an established one away.
 - B{a new cascade listens first}: it starts blocked and forwards only
   after L{HOLD} seconds without a loop, so a loop never carries data.  A
   blocked cascade forwards again once no probe has shown a loop through
   it for L{HOLD} seconds (the loop is gone; this is also the failover
   when the other path of a redundant pair goes away).
 - B{both ends}: the first hop of each probe says whether its cascade is
   blocked; the hub at the other end blocks (or frees) its session of
   that cascade too, so that neither end switches frames onto a link the
   other drops, nor keeps MACs learned over it.
 - B{second signal}: a MAC conflict (the switch refusing a source MAC that
   another live port owns) between a cascade port and another port is
   what a loop looks like from a LAN's side, e.g. a loop through bridged
   LANs that probes do not cross.  The guard logs it once per MAC and
   counts it (C{conflict_signals}).

Pure policy: time from the injected clock, randomness injected; the
switch calls L{LoopGuard.control_frame} and the guard talks to the switch
through C{block}/C{unblock} and to ports through C{deliver}.
"""

from __future__ import annotations

import os
import random as _random
import struct
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Sequence

from twisted.logger import Logger

from sevpn.mac import format_mac, generate_mac
from sevpn.port import IPort
from sevpn.switch import CONTROL_GROUP, VirtualHub

#: IEEE Std 802 Local Experimental Ethertype 1: no OS stack takes it.
PROBE_ETHERTYPE = b"\x88\xb5"
PROBE_MAGIC = b"SVLP"
PROBE_VERSION = 1
#: magic, version, flags, hops, (pad), link id, sequence number, mark.
_PROBE = struct.Struct("!4sBBBxQQQ")
#: The probe's origin cascade is blocked (read by the hub at its other end).
FLAG_BLOCKED = 1
#: Ethernet minimum: the probe is padded to it.
PROBE_FRAME_SIZE = 60

#: Seconds between probes of one cascade (each drawn from 0.75-1.25 times this).
PROBE_INTERVAL = 1.0
#: A cascade forwards once no probe has shown a loop through it for this long.
HOLD = 3.0
#: A probe is dropped after crossing this many hubs.
MAX_HOPS = 32
#: Probes of older rounds than this are stale when they come back.
STALE_ROUNDS = 8
#: Foreign probe copies remembered per virtual hub (each is forwarded once).
SEEN_LIMIT = 4096
#: Foreign probes forwarded per second and virtual hub, at most (a burst of as many).
FOREIGN_RATE = 200.0

#: Link ids with this bit set belong to cascades that never forwarded.
JUNIOR = 1 << 63

LISTENING = "listening"
FORWARDING = "forwarding"
BLOCKED = "blocked"
#: The remote end of another hub's cascade that its owner blocked.
BLOCKED_BY_PEER = "blocked by its other end"


class BadProbe(ValueError):
    """A frame to the control group that is not a probe this hub understands."""


@dataclass(frozen=True)
class Probe:
    """One loop probe; see the module docstring."""

    link: int
    seq: int
    #: The heaviest blocked link id crossed (0: none).
    mark: int = 0
    hops: int = 0
    blocked: bool = False

    def encode(self, source: bytes) -> bytes:
        body = _PROBE.pack(
            PROBE_MAGIC, PROBE_VERSION, FLAG_BLOCKED if self.blocked else 0, self.hops, self.link, self.seq, self.mark
        )
        frame = CONTROL_GROUP + source + PROBE_ETHERTYPE + body
        return frame + b"\0" * (PROBE_FRAME_SIZE - len(frame))

    @classmethod
    def decode(cls, frame: Sequence, offset: int = 0) -> "Probe":
        """
        The probe in a control frame whose Ethernet header starts at C{offset}
        (after a virtio-net header, if any); L{BadProbe} if it is not one of ours.
        """
        start = offset + 14
        if len(frame) < start + _PROBE.size:
            raise BadProbe("a control frame too short for a probe")
        if bytes(frame[offset + 12 : start]) != PROBE_ETHERTYPE:
            raise BadProbe("a control frame of an unknown ethertype")
        magic, version, flags, hops, link, seq, mark = _PROBE.unpack_from(frame, start)
        if magic != PROBE_MAGIC or version != PROBE_VERSION:
            raise BadProbe("a probe of an unknown kind or version")
        if link == 0:
            raise BadProbe("a probe without a link id")
        return cls(link, seq, mark, hops, bool(flags & FLAG_BLOCKED))

    def crossing(self, link_id: int) -> "Probe":
        """This probe after crossing the blocked link C{link_id}."""
        return replace(self, mark=max(self.mark, link_id))


class OwnLink:
    """One cascade this hub dials, as the guard sees it."""

    def __init__(self, name: str, port: IPort, link_id: int, now: float) -> None:
        self.name = name
        self.port = port
        self.id = link_id
        #: Every id this link had (a probe sent before it lost its junior bit may still come back).
        self.ids = {link_id}
        self.state = LISTENING
        self.seq = 0
        self.last_loop = now
        self.loops = 0
        self.probes_sent = 0
        self.probes_returned = 0
        self.timer = None

    def describe(self) -> dict:
        return {
            "loop_state": self.state,
            "loops_detected": self.loops,
            "probes_sent": self.probes_sent,
            "probes_returned": self.probes_returned,
        }


class Segment:
    """The cascade ports of one virtual hub: its own cascades and other hubs'."""

    def __init__(self, vhub: VirtualHub, now: float) -> None:
        self.vhub = vhub
        #: Cascade port -> its L{OwnLink}, or None for the remote end of another hub's cascade.
        self.ports: Dict[IPort, Optional[OwnLink]] = {}
        #: Link id -> own link, for recognising probes that come back.
        self.links: Dict[int, OwnLink] = {}
        #: Remote ends blocked because the hub at the other end blocked its cascade.
        self.blocked_by_peer = set()
        self.seen: "OrderedDict[tuple, None]" = OrderedDict()
        self.tokens = FOREIGN_RATE
        self.tokens_at = now
        #: MAC -> conflict count already reported.
        self.conflicts_reported: Dict[bytes, int] = {}

    def take_token(self, now: float) -> bool:
        """
        Whether one more foreign probe may be flooded on now: at most
        L{FOREIGN_RATE} a second, in bursts of as many.
        """
        self.tokens = min(FOREIGN_RATE, self.tokens + (now - self.tokens_at) * FOREIGN_RATE)
        self.tokens_at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def first_time(self, key: tuple) -> bool:
        """
        Whether a probe (its link, sequence number and mark) is seen here for
        the first time, so each copy is flooded once; the last L{SEEN_LIMIT}
        are remembered.
        """
        if key in self.seen:
            return False
        self.seen[key] = None
        if len(self.seen) > SEEN_LIMIT:
            self.seen.popitem(last=False)
        return True


class LoopGuard:
    """
    Finds and breaks loops of cascades on a hub's virtual hubs (see the
    module docstring).  The hub registers the remote ends of other hubs'
    cascades (L{add_remote_end}); its own cascades register themselves
    (L{add_cascade}).

    @param clock: C{seconds()} and C{callLater()}.
    @param random: a float in [0, 1) for jitter.
    @param randbytes: random bytes for link ids and the probes' source MAC.
    """

    log = Logger()

    def __init__(
        self,
        clock,
        interval: float = PROBE_INTERVAL,
        hold: float = HOLD,
        random: Callable[[], float] = _random.random,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.clock = clock
        self.interval = interval
        self.hold = hold
        self.random = random
        self.randbytes = randbytes
        #: The source MAC of this hub's probes.
        self.mac = generate_mac(randbytes)
        self.segments: Dict[VirtualHub, Segment] = {}
        self.loops_detected = 0
        self.conflict_signals = 0
        self.probes_forwarded = 0
        self.probes_dropped = 0

    # registration ------------------------------------------------------------

    def _segment(self, vhub: VirtualHub) -> Segment:
        segment = self.segments.get(vhub)
        if segment is None:
            segment = self.segments[vhub] = Segment(vhub, self.clock.seconds())
            vhub.on_control = self.control_frame
        return segment

    def add_cascade(self, vhub: VirtualHub, port: IPort, name: str) -> OwnLink:
        """
        C{port} (attached to C{vhub}) is a cascade this hub dials: it
        listens (blocked) for L{HOLD} seconds before it forwards.
        """
        segment = self._segment(vhub)
        link_id = int.from_bytes(self.randbytes(8), "big") | JUNIOR
        link = OwnLink(name, port, link_id, self.clock.seconds())
        segment.ports[port] = link
        segment.links[link_id] = link
        vhub.block(port)
        self.log.info(
            "cascade {name} on virtual hub {hub}: listening for loops for {hold:g} s before it forwards",
            name=name, hub=vhub.name, hold=self.hold,
        )
        self._probe(segment, link)
        return link

    def add_remote_end(self, vhub: VirtualHub, port: IPort) -> None:
        """C{port} is a session of another hub's cascade."""
        self._segment(vhub).ports.setdefault(port, None)

    def remove(self, vhub: VirtualHub, port: IPort) -> None:
        """C{port} left C{vhub} (its session ended)."""
        segment = self.segments.get(vhub)
        if segment is None:
            return
        link = segment.ports.pop(port, None)
        segment.blocked_by_peer.discard(port)
        if link is not None:
            for link_id in link.ids:
                segment.links.pop(link_id, None)
            if link.timer is not None and link.timer.active():
                link.timer.cancel()
            link.timer = None

    # probing -------------------------------------------------------------------

    def _probe(self, segment: Segment, link: OwnLink) -> None:
        """One round for C{link}: settle its state, send a probe, schedule the next."""
        link.timer = None
        now = self.clock.seconds()
        if link.state != FORWARDING and now - link.last_loop >= self.hold:
            self._forward(segment, link)
        self._check_conflicts(segment)
        link.seq += 1
        probe = Probe(link.id, link.seq, blocked=link.state != FORWARDING)
        link.probes_sent += 1
        link.port.deliver([probe.encode(self.mac)], 0, None)
        delay = self.interval * (0.75 + 0.5 * self.random())
        link.timer = self.clock.callLater(delay, self._probe, segment, link)

    def _forward(self, segment: Segment, link: OwnLink) -> None:
        was = link.state
        link.state = FORWARDING
        if link.id & JUNIOR:
            link.id &= ~JUNIOR
            link.ids.add(link.id)
            segment.links[link.id] = link
        segment.vhub.unblock(link.port)
        if was == BLOCKED:
            self.log.warn(
                "the loop through cascade {name} on virtual hub {hub} is gone: it forwards again",
                name=link.name, hub=segment.vhub.name,
            )
        else:
            self.log.info("cascade {name} on virtual hub {hub}: no loop, forwarding", name=link.name,
                          hub=segment.vhub.name)

    def _loop(self, segment: Segment, link: OwnLink, via: IPort) -> None:
        link.last_loop = self.clock.seconds()
        if link.state == BLOCKED:
            return
        link.state = BLOCKED
        link.loops += 1
        self.loops_detected += 1
        segment.vhub.block(link.port)
        self.log.error(
            "LOOP on virtual hub {hub}: cascade {name}'s probes come back through {via}; cascade {name} is "
            "blocked (it carries no frames) until the loop is gone. Delete one of the cascades that close it.",
            hub=segment.vhub.name, name=link.name, via=via.name,
        )

    def _check_conflicts(self, segment: Segment) -> None:
        """The second signal: MAC conflicts involving a cascade port."""
        conflicts = segment.vhub.conflicts
        reported = segment.conflicts_reported
        for mac in [m for m in reported if m not in conflicts]:
            del reported[mac]
        for mac, conflict in conflicts.items():
            if mac in reported or not any(p in segment.ports for p in conflict.ports):
                continue
            reported[mac] = conflict.count
            self.conflict_signals += 1
            self.log.warn(
                "MAC {mac} arrives on virtual hub {hub} through {ports}: frames are looping (a loop of cascades or "
                "of bridged LANs), or a station moved between sites; see 'sevpn hub macs'",
                mac=format_mac(mac), hub=segment.vhub.name, ports=" and ".join(sorted(p.name for p in conflict.ports)),
            )

    # the switch's hook -----------------------------------------------------------

    def control_frame(self, vhub: VirtualHub, source: IPort, frame: Sequence) -> None:
        """A frame to the control group arrived on C{source} of C{vhub}."""
        segment = self.segments.get(vhub)
        if segment is None or source not in segment.ports:
            self.probes_dropped += 1  # not from a cascade: a card may not speak for a hub
            return
        try:
            probe = Probe.decode(frame, source.mac_offset)
        except BadProbe:
            self.probes_dropped += 1
            return
        arrived_on = segment.ports[source]
        if arrived_on is not None and arrived_on.state != FORWARDING:
            probe = probe.crossing(arrived_on.id)
        if arrived_on is None and probe.hops == 0:
            self._peer_says(segment, source, probe.blocked)
        link = segment.links.get(probe.link)
        if link is not None:
            self._returned(segment, link, probe, source)
        else:
            self._flood(segment, source, probe)

    def _returned(self, segment: Segment, link: OwnLink, probe: Probe, via: IPort) -> None:
        if probe.seq + STALE_ROUNDS < link.seq or probe.seq > link.seq:
            self.probes_dropped += 1
            return
        link.probes_returned += 1
        if probe.mark > link.id:
            return  # a loop, already broken by a heavier blocked cascade
        self._loop(segment, link, via)

    def _flood(self, segment: Segment, source: IPort, probe: Probe) -> None:
        if probe.hops >= MAX_HOPS or not segment.first_time((probe.link, probe.seq, probe.mark)):
            self.probes_dropped += 1
            return
        if not segment.take_token(self.clock.seconds()):
            self.probes_dropped += 1
            return
        probe = replace(probe, hops=probe.hops + 1, blocked=False)
        for port, link in segment.ports.items():
            if port is source:
                continue
            copy = probe.crossing(link.id) if link is not None and link.state != FORWARDING else probe
            port.deliver([copy.encode(self.mac)], 0, None)
            self.probes_forwarded += 1

    def _peer_says(self, segment: Segment, port: IPort, blocked: bool) -> None:
        """The hub at the other end of C{port}'s cascade says whether it blocked it."""
        if blocked and port not in segment.blocked_by_peer:
            segment.blocked_by_peer.add(port)
            segment.vhub.block(port)
            self.log.info(
                "virtual hub {hub}: the other end of cascade session {port} blocks it; so does this end",
                hub=segment.vhub.name, port=port.name,
            )
        elif not blocked and port in segment.blocked_by_peer:
            segment.blocked_by_peer.discard(port)
            segment.vhub.unblock(port)
            self.log.info(
                "virtual hub {hub}: the other end of cascade session {port} forwards; so does this end",
                hub=segment.vhub.name, port=port.name,
            )

    # status ------------------------------------------------------------------------

    def describe(self, vhub: VirtualHub, port: IPort) -> dict:
        """The loop state of a cascade port (either end)."""
        segment = self.segments.get(vhub)
        if segment is None or port not in segment.ports:
            return {}
        link = segment.ports[port]
        if link is not None:
            return link.describe()
        return {"loop_state": BLOCKED_BY_PEER if port in segment.blocked_by_peer else FORWARDING}

    def counters(self) -> dict:
        return {
            "loops_detected": self.loops_detected,
            "conflict_signals": self.conflict_signals,
            "probes_forwarded": self.probes_forwarded,
            "probes_dropped": self.probes_dropped,
        }
