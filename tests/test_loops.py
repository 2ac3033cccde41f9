"""
Loop probes and the loop guard on a real switch with recording ports; the
switch's hooks for them (control frames, blocked ports).
"""

from __future__ import annotations

from dataclasses import replace

from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from sevpn import offload
from sevpn.loops import (
    BLOCKED, BLOCKED_BY_PEER, FORWARDING, FOREIGN_RATE, HOLD, JUNIOR, LISTENING, MAX_HOPS, PROBE_INTERVAL,
    STALE_ROUNDS, BadProbe, LoopGuard, Probe,
)
from sevpn.port import Port
from sevpn.switch import CONTROL_GROUP, VirtualHub
from tests.support import BROADCAST, frame, mac


class Recorder(Port):
    def __init__(self, name, clock, **kw):
        super().__init__(name, clock, **kw)
        self.got = []

    def transmit(self, frames):
        self.got.extend(bytes(f) for f in frames)

    def probes(self):
        return [Probe.decode(f, self.mac_offset) for f in self.got if f[self.mac_offset:self.mac_offset + 6] == CONTROL_GROUP]


def send(vhub, port, frames):
    vhub.forward(port, frames)
    vhub.flush(port)


class SwitchHooks(SynchronousTestCase):
    """What the switch does for the loop guard: control frames and blocked ports."""

    def setUp(self):
        self.clock = Clock()
        self.vhub = VirtualHub("DEFAULT", self.clock.seconds)
        self.a, self.b, self.c = (Recorder(n, self.clock) for n in "abc")
        for port in (self.a, self.b, self.c):
            self.vhub.add_port(port)
        self.control = []

    def hook(self):
        self.vhub.on_control = lambda vhub, source, f: self.control.append((vhub, source, bytes(f)))

    def test_control_frames_go_to_the_hook_only(self):
        self.hook()
        probe = frame(CONTROL_GROUP, mac(1), ethertype=b"\x88\xb5")
        other = frame(BROADCAST, mac(1))
        send(self.vhub, self.a, [probe, other])
        self.assertEqual(self.control, [(self.vhub, self.a, probe)])
        self.assertEqual(self.b.got, [other])  # the probe is not forwarded
        self.assertEqual(self.vhub.counters()["control_frames"], 1)

    def test_without_a_hook_control_frames_are_ordinary_multicast(self):
        probe = frame(CONTROL_GROUP, mac(1), ethertype=b"\x88\xb5")
        send(self.vhub, self.a, [probe])
        self.assertEqual((self.b.got, self.c.got), ([probe], [probe]))

    def test_a_blocked_port_forwards_nothing_but_control_frames(self):
        self.hook()
        send(self.vhub, self.b, [frame(BROADCAST, mac(2))])
        self.assertIs(self.vhub.lookup(mac(2)), self.b)
        del self.c.got[:]
        self.vhub.block(self.b)
        self.assertIsNone(self.vhub.lookup(mac(2)))  # its MACs are forgotten
        send(self.vhub, self.a, [frame(BROADCAST, mac(1)), frame(mac(2), mac(1))])
        self.assertEqual(self.b.got, [])  # nothing switched to it
        self.assertEqual(len(self.c.got), 2)
        probe = frame(CONTROL_GROUP, mac(2), ethertype=b"\x88\xb5")
        send(self.vhub, self.b, [frame(BROADCAST, mac(2)), probe])
        self.assertEqual(self.vhub.counters()["blocked_drops"], 1)
        self.assertEqual(len(self.c.got), 2)
        self.assertIsNone(self.vhub.lookup(mac(2)))  # nothing learned from it
        self.assertEqual(self.control, [(self.vhub, self.b, probe)])  # control frames still pass
        self.vhub.unblock(self.b)
        send(self.vhub, self.a, [frame(BROADCAST, mac(1))])
        self.assertEqual(self.b.got, [frame(BROADCAST, mac(1))])

    def test_removing_a_blocked_port(self):
        self.vhub.block(self.b)
        self.vhub.remove_port(self.b)
        self.vhub.unblock(self.b)
        self.assertNotIn(self.b, self.vhub.ports)


class ProbeCodec(SynchronousTestCase):
    def test_round_trip(self):
        probe = Probe(link=JUNIOR | 7, seq=3, mark=5, hops=2, blocked=True)
        encoded = probe.encode(mac(9))
        self.assertEqual(len(encoded), 60)
        self.assertEqual(encoded[:12], CONTROL_GROUP + mac(9))
        self.assertEqual(Probe.decode(encoded), probe)
        self.assertEqual(Probe.decode(offload.from_plain(encoded), 10), probe)
        self.assertEqual(Probe.decode(memoryview(encoded)), probe)

    def test_what_is_not_a_probe(self):
        good = Probe(link=7, seq=1).encode(mac(9))
        for bad in (
            good[:30],
            good[:12] + b"\x08\x00" + good[14:],  # another ethertype
            good[:14] + b"XXXX" + good[18:],  # another magic
            good[:18] + b"\x02" + good[19:],  # a later version
            Probe(link=0, seq=1).encode(mac(9)),
        ):
            self.assertRaises(BadProbe, Probe.decode, bad)

    def test_crossing_keeps_the_heaviest_mark(self):
        probe = Probe(link=1, seq=1)
        self.assertEqual(probe.crossing(9).crossing(4).mark, 9)


class Guard(SynchronousTestCase):
    """One virtual hub with a card, an own cascade and the remote end of another hub's cascade."""

    def setUp(self):
        self.clock = Clock()
        self.vhub = VirtualHub("DEFAULT", self.clock.seconds)
        self.card = Recorder("card", self.clock)
        self.own = Recorder("cascade:own", self.clock, mac_offset=10)
        self.far = Recorder("far", self.clock)
        for port in (self.card, self.own, self.far):
            self.vhub.add_port(port)
        ids = iter([b"\x01" * 8, (JUNIOR | 1000).to_bytes(8, "big")])
        self.guard = LoopGuard(self.clock, random=lambda: 0.5, randbytes=lambda n: next(ids)[:n] if n == 8 else b"\x02" * n)
        self.guard.add_remote_end(self.vhub, self.far)
        self.link = self.guard.add_cascade(self.vhub, self.own, "own")
        self.log = []
        globalLogPublisher.addObserver(self.log.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.log.append)

    def logged(self, fragment):
        return sum(1 for e in self.log if fragment in formatEvent(e))

    def settle(self):
        self.clock.pump([PROBE_INTERVAL] * int(HOLD / PROBE_INTERVAL + 2))

    def arrive(self, port, probe):
        encoded = probe.encode(mac(77))
        send(self.vhub, port, [offload.from_plain(encoded) if port.mac_offset else encoded])

    def own_probe(self, **kw):
        return Probe(self.link.id, self.link.seq, **kw)

    def test_a_cascade_listens_then_forwards(self):
        self.assertEqual(self.link.state, LISTENING)
        self.assertIn(self.own, self.vhub.blocked)
        [first] = self.own.probes()
        self.assertEqual((first.link, first.seq, first.blocked), (self.link.id, 1, True))
        self.assertTrue(first.link & JUNIOR)
        self.settle()
        self.assertEqual(self.link.state, FORWARDING)
        self.assertIn(self.own, self.vhub.ports)
        last = self.own.probes()[-1]
        self.assertFalse(last.blocked)
        self.assertFalse(last.link & JUNIOR)  # established: lighter than any new cascade
        self.assertEqual(self.card.got, [])  # probes never go to cards

    def test_a_probe_coming_back_is_a_loop(self):
        self.settle()
        self.arrive(self.far, replace(self.own_probe(), hops=3))
        self.assertEqual(self.link.state, BLOCKED)
        self.assertIn(self.own, self.vhub.blocked)
        self.assertEqual(self.guard.counters()["loops_detected"], 1)
        self.assertEqual(self.logged("LOOP on virtual hub DEFAULT: cascade own's probes come back through far"), 1)
        self.clock.advance(PROBE_INTERVAL)
        self.assertTrue(self.own.probes()[-1].blocked)  # tells the other end
        # nothing comes back any more: the loop is gone
        self.settle()
        self.assertEqual(self.link.state, FORWARDING)
        self.assertEqual(self.logged("the loop through cascade own on virtual hub DEFAULT is gone"), 1)

    def test_a_loop_already_broken_by_a_heavier_cascade(self):
        self.settle()
        self.arrive(self.far, self.own_probe(mark=self.link.id + 1))
        self.assertEqual(self.link.state, FORWARDING)
        self.arrive(self.far, self.own_probe(mark=self.link.id - 1))
        self.assertEqual(self.link.state, BLOCKED)

    def test_coming_back_through_this_hubs_own_blocked_cascade(self):
        """A probe entering through a blocked cascade crossed it: the mark is that cascade's."""
        other = Recorder("cascade:other", self.clock)
        self.vhub.add_port(other)
        heavier = self.guard.add_cascade(self.vhub, other, "other")  # JUNIOR | 1000: heavier, listening
        self.link.state = FORWARDING
        self.link.id &= ~JUNIOR
        self.guard.segments[self.vhub].links[self.link.id] = self.link
        self.arrive(other, self.own_probe())
        self.assertEqual(self.link.state, FORWARDING)
        self.assertEqual(heavier.state, LISTENING)

    def test_stale_probes_do_not_count(self):
        self.settle()
        self.clock.pump([PROBE_INTERVAL] * STALE_ROUNDS)
        old = Probe(self.link.id, self.link.seq - STALE_ROUNDS - 1)
        self.arrive(self.far, old)
        self.assertEqual(self.link.state, FORWARDING)

    def test_foreign_probes_go_on_to_cascades_only(self):
        foreign = Probe(link=555, seq=1, hops=0)
        self.arrive(self.far, foreign)
        [copy] = [p for p in self.own.probes() if p.link == 555]
        self.assertEqual(copy.hops, 1)
        self.assertEqual(copy.mark, self.link.id)  # it crossed our blocked (listening) cascade
        self.assertEqual(self.card.got, [])
        # the same copy again, or one too far travelled, goes nowhere
        self.arrive(self.far, foreign)
        self.arrive(self.far, Probe(link=556, seq=1, hops=MAX_HOPS))
        self.assertEqual(len([p for p in self.own.probes() if p.link in (555, 556)]), 1)
        self.assertEqual(self.guard.counters()["probes_dropped"], 2)

    def test_foreign_probes_are_rate_bounded(self):
        self.settle()
        forwarded = lambda: sum(1 for p in self.own.probes() if p.link == 555)  # noqa: E731
        for seq in range(1, int(FOREIGN_RATE) * 3):
            self.arrive(self.far, Probe(link=555, seq=seq, hops=1))
        self.assertEqual(forwarded(), FOREIGN_RATE)
        self.clock.advance(1)
        self.arrive(self.far, Probe(link=555, seq=10**6, hops=1))
        self.assertEqual(forwarded(), FOREIGN_RATE + 1)

    def test_a_card_cannot_speak_for_a_hub(self):
        self.settle()
        self.arrive(self.card, self.own_probe())  # a card replaying our probe
        self.arrive(self.card, Probe(link=555, seq=1, hops=0, blocked=True))
        self.assertEqual(self.link.state, FORWARDING)
        self.assertEqual([p.link for p in self.own.probes()].count(555), 0)
        self.assertEqual(self.far.got, [])
        self.assertEqual(self.guard.counters()["probes_dropped"], 2)

    def test_the_other_end_of_a_blocked_cascade_blocks_too(self):
        self.arrive(self.far, Probe(link=555, seq=1, hops=0, blocked=True))
        self.assertIn(self.far, self.vhub.blocked)
        self.assertEqual(self.guard.describe(self.vhub, self.far), {"loop_state": BLOCKED_BY_PEER})
        self.arrive(self.far, Probe(link=555, seq=2, hops=1, blocked=False))  # not from the other end itself
        self.assertIn(self.far, self.vhub.blocked)
        self.arrive(self.far, Probe(link=555, seq=3, hops=0, blocked=False))
        self.assertIn(self.far, self.vhub.ports)
        self.assertEqual(self.guard.describe(self.vhub, self.far), {"loop_state": FORWARDING})

    def test_mac_conflicts_on_a_cascade_are_the_second_signal(self):
        self.settle()
        send(self.vhub, self.card, [frame(BROADCAST, mac(5))])
        send(self.vhub, self.own, [offload.from_plain(frame(BROADCAST, mac(5)))])  # came round
        self.assertEqual(self.vhub.counters()["mac_conflicts"], 1)
        self.clock.pump([PROBE_INTERVAL] * 3)
        self.assertEqual(self.guard.counters()["conflict_signals"], 1)
        self.assertEqual(self.logged("MAC 02:00:00:00:00:05 arrives on virtual hub DEFAULT through"), 1)

    def test_a_removed_cascade_stops_probing(self):
        self.guard.remove(self.vhub, self.own)
        sent = len(self.own.got)
        self.settle()
        self.assertEqual(len(self.own.got), sent)
        self.assertEqual(self.guard.describe(self.vhub, self.own), {})
