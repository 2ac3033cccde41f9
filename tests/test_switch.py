"""The virtual hub's MAC-learning switch, and what a hostile port cannot do to it."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sevpn.port import Port
from sevpn.switch import VirtualHub
from tests.support import BROADCAST, frame, mac


class Recorder(Port):
    def __init__(self, name, clock, **kw):
        super().__init__(name, clock, **kw)
        self.got = []

    def transmit(self, frames):
        self.got.extend(bytes(f) for f in frames)


class SwitchCase(SynchronousTestCase):
    ports = ("a", "b", "c")

    def setUp(self):
        self.clock = Clock()
        self.hub = self.make("DEFAULT")
        for name in self.ports:
            port = Recorder(name, self.clock)
            setattr(self, name, port)
            self.hub.add_port(port)

    def make(self, name, **kw):
        return VirtualHub(name, self.clock.seconds, **kw)

    def send(self, port, frames, hub=None):
        hub = hub or self.hub
        hub.forward(port, frames)
        hub.flush(port)


class Switching(SwitchCase):
    def test_unknown_unicast_floods_but_not_back(self):
        f = frame(mac(2), mac(1))
        self.send(self.a, [f])
        self.assertEqual((self.a.got, self.b.got, self.c.got), ([], [f], [f]))

    def test_learned_unicast_goes_to_one_port(self):
        self.send(self.b, [frame(BROADCAST, mac(2))])
        f = frame(mac(2), mac(1))
        self.send(self.a, [f])
        self.assertEqual(self.b.got[-1], f)
        self.assertEqual(self.c.got, [frame(BROADCAST, mac(2))])
        self.assertIs(self.hub.lookup(mac(1)), self.a)
        self.assertEqual(self.a.macs, {mac(1)})

    def test_broadcast_and_multicast_flood(self):
        self.send(self.b, [frame(BROADCAST, mac(2))])
        self.send(self.c, [frame(mac(2), mac(3))])  # b is known
        m = frame(b"\x01\x00\x5e\x00\x00\x01", mac(2))
        bc = frame(BROADCAST, mac(2))
        self.send(self.b, [m, bc])
        self.assertEqual(self.a.got, [bc, m, bc])
        self.assertEqual(self.c.got, [bc, m, bc])
        self.assertNotIn(m, self.b.got)

    def test_one_delivery_per_destination_per_flush(self):
        calls = []
        original = self.b.deliver
        self.b.deliver = lambda frames, offset, source: (calls.append(len(frames)), original(frames, offset, source))
        self.hub.forward(self.a, [frame(BROADCAST, mac(1), bytes([i]) * 40) for i in range(5)])
        self.hub.forward(self.a, [frame(BROADCAST, mac(1), b"more")])
        self.assertEqual(calls, [])
        self.hub.flush(self.a)
        self.assertEqual(calls, [6])

    def test_frame_to_own_port_is_filtered(self):
        self.send(self.a, [frame(BROADCAST, mac(1))])
        self.send(self.a, [frame(mac(1), mac(9))])
        self.assertEqual(self.a.got, [])
        self.assertEqual(self.hub.filtered, 1)

    def test_aging(self):
        self.send(self.b, [frame(BROADCAST, mac(2))])
        f = frame(mac(2), mac(1))
        self.clock.advance(299)
        self.send(self.a, [f])
        self.assertNotIn(f, self.c.got)
        # b has been silent for more than 300 s: flooded again
        self.clock.advance(302)
        self.send(self.a, [f])
        self.assertIn(f, self.c.got)
        self.clock.advance(399)
        self.assertEqual(self.hub.expire(), 1)  # a's entry, seen at 601, stays until 901
        self.assertIsNone(self.hub.lookup(mac(1)))
        self.assertEqual(self.a.macs, set())

    def test_removed_port_forgets_its_macs(self):
        self.send(self.b, [frame(BROADCAST, mac(2))])
        self.hub.remove_port(self.b)
        self.send(self.a, [frame(mac(2), mac(1))])
        self.assertEqual(self.c.got[-1], frame(mac(2), mac(1)))
        self.assertIsNone(self.hub.lookup(mac(2)))

    def test_multicast_source_not_learned(self):
        self.send(self.a, [frame(BROADCAST, b"\x01" * 6)])
        self.assertEqual(self.hub.table, {})


class HostilePorts(SwitchCase):
    """A port whose user lies cannot take the switch over."""

    def test_a_port_cannot_steal_a_live_ports_mac(self):
        self.send(self.b, [frame(BROADCAST, mac(2), b"b here")])
        self.send(self.a, [frame(BROADCAST, mac(2), b"a pretends to be b")])
        self.assertEqual(self.c.got, [frame(BROADCAST, mac(2), b"b here")])  # the lie is dropped
        self.send(self.c, [frame(mac(2), mac(3), b"for b")])
        self.assertEqual(self.b.got[-1], frame(mac(2), mac(3), b"for b"))
        self.assertEqual(self.a.got, [frame(BROADCAST, mac(2), b"b here")])
        self.assertEqual(self.hub.mac_conflicts, 1)
        [conflict] = self.hub.describe_conflicts()
        self.assertEqual(conflict["ports"], ["a", "b"])

    def test_conflicts_are_reported_once_per_pair(self):
        seen = []
        hub = self.make("x", on_conflict=lambda h, c: seen.append(c))
        for port in (self.a, self.b):
            hub.add_port(port)
        self.send(self.a, [frame(BROADCAST, mac(7))], hub)
        for _ in range(3):
            self.send(self.b, [frame(BROADCAST, mac(7))], hub)
        self.assertEqual(len(seen), 1)
        self.assertEqual(hub.mac_conflicts, 3)

    def test_a_mac_moves_once_its_owner_is_gone_or_silent(self):
        self.send(self.b, [frame(BROADCAST, mac(2))])
        self.clock.advance(301)  # b went silent past the MAC age
        self.send(self.a, [frame(BROADCAST, mac(2), b"moved")])
        self.assertIs(self.hub.lookup(mac(2)), self.a)
        self.hub.remove_port(self.a)
        self.send(self.c, [frame(BROADCAST, mac(2), b"c now")])
        self.assertIs(self.hub.lookup(mac(2)), self.c)

    def test_allow_moves_follows_the_latest_sender(self):
        hub = self.make("x", allow_moves=True)
        for port in (self.a, self.b):
            hub.add_port(port)
        self.send(self.a, [frame(BROADCAST, mac(7))], hub)
        self.send(self.b, [frame(BROADCAST, mac(7))], hub)
        self.assertIs(hub.lookup(mac(7)), self.b)
        self.assertEqual(self.a.macs, set())

    def test_mac_limit_per_port(self):
        hub = self.make("x", max_macs_per_port=4)
        for port in (self.a, self.b):
            hub.add_port(port)
        self.send(self.a, [frame(BROADCAST, mac(i), b"%d" % i) for i in range(1, 10)], hub)
        self.assertEqual(len(self.a.macs), 4)
        self.assertEqual(hub.mac_limit_drops, 5)
        self.assertEqual(len(self.b.got), 4)  # frames from unlearnable MACs are dropped
        self.send(self.b, [frame(BROADCAST, mac(20))], hub)
        self.assertIs(hub.lookup(mac(20)), self.b)  # others still learn

    def test_a_ports_own_limit_wins(self):
        hub = self.make("x", max_macs_per_port=2)
        bridge = Recorder("bridge", self.clock, max_macs=100)
        hub.add_port(bridge)
        hub.add_port(self.a)
        self.send(bridge, [frame(BROADCAST, mac(i)) for i in range(1, 50)], hub)
        self.assertEqual(len(bridge.macs), 49)

    def test_full_table_refuses_without_a_scan(self):
        hub = self.make("small", max_entries=4, max_macs_per_port=100)
        for port in (self.a, self.b):
            hub.add_port(port)
        self.send(self.a, [frame(BROADCAST, mac(i)) for i in range(1, 10)], hub)
        self.assertEqual(len(hub.table), 4)
        self.assertEqual(hub.not_learned, 5)
        self.assertEqual(len(self.b.got), 9)  # still switched: flooded
        # a new MAC in a full table does not walk the table
        scans = []
        hub.table = _CountingDict(hub.table, scans)
        self.send(self.b, [frame(BROADCAST, mac(30))], hub)
        self.assertEqual(scans, [])

    def test_one_failing_destination_does_not_stop_the_others(self):
        class Broken(Recorder):
            def transmit(self, frames):
                raise RuntimeError("broken port")

        hub = self.make("x")
        broken = Broken("broken", self.clock)
        for port in (self.a, broken, self.b, self.c):
            hub.add_port(port)
        self.send(self.a, [frame(BROADCAST, mac(1), b"to all")], hub)
        self.assertEqual(self.b.got, [frame(BROADCAST, mac(1), b"to all")])
        self.assertEqual(self.c.got, [frame(BROADCAST, mac(1), b"to all")])
        self.assertEqual(hub.port_failures, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class _CountingDict(dict):
    def __init__(self, data, scans):
        super().__init__(data)
        self._scans = scans

    def items(self):
        self._scans.append("items")
        return super().items()

    def values(self):
        self._scans.append("values")
        return super().values()


class Runts(SwitchCase):
    def test_frames_shorter_than_their_header_are_dropped(self):
        a = Recorder("a10", self.clock, mac_offset=10)
        self.hub.add_port(a)
        self.send(a, [b"\0" * 20, b"\0" * 10 + frame(BROADCAST, mac(1))])
        self.assertEqual(self.hub.runts, 1)
        self.assertEqual(len(self.b.got), 1)
        self.assertEqual(self.b.got[0], frame(BROADCAST, mac(1)))  # converted for a plain port
        self.assertIs(self.hub.lookup(mac(1)), a)  # the MAC is read after the header


class Isolation(SwitchCase):
    def test_virtual_hubs_share_nothing(self):
        two = self.make("two")
        x = Recorder("x", self.clock)
        two.add_port(x)
        self.send(self.a, [frame(BROADCAST, mac(1)), frame(mac(9), mac(1))])
        self.assertEqual(x.got, [])
        self.assertEqual(len(self.b.got), 2)
        self.assertIsNone(two.lookup(mac(1)))


class TableHooks(SwitchCase):
    """on_learn / on_forget: the table's changes, for whoever mirrors it (the fabric's FDB reflection)."""

    def setUp(self):
        super().setUp()
        self.events = []
        self.hub.on_learn = lambda m, port: self.events.append(("learn", m, port.name))
        self.hub.on_forget = lambda m, port: self.events.append(("forget", m, port.name))

    def test_a_new_mac_once_not_every_frame(self):
        self.send(self.a, [frame(BROADCAST, mac(1)), frame(BROADCAST, mac(1))])
        self.send(self.a, [frame(mac(2), mac(1))])
        self.assertTrue(self.hub.claim(mac(1), self.a))
        self.assertEqual(self.events, [("learn", mac(1), "a")])

    def test_a_move_is_forget_then_learn(self):
        self.send(self.b, [frame(BROADCAST, mac(2))])
        self.clock.advance(301)  # b went silent: the MAC may move
        self.send(self.a, [frame(BROADCAST, mac(2))])
        self.assertEqual(self.events, [("learn", mac(2), "b"), ("forget", mac(2), "b"), ("learn", mac(2), "a")])

    def test_a_refused_move_changes_nothing(self):
        self.send(self.b, [frame(BROADCAST, mac(2))])
        self.send(self.a, [frame(BROADCAST, mac(2))])  # a conflict: dropped
        self.assertEqual(self.events, [("learn", mac(2), "b")])

    def test_aged_out_by_the_sweep_and_by_a_lookup(self):
        self.send(self.a, [frame(BROADCAST, mac(1))])
        self.send(self.b, [frame(BROADCAST, mac(2))])
        self.clock.advance(301)
        self.send(self.c, [frame(mac(1), mac(3))])  # finds a's entry too old
        self.assertEqual(self.hub.expire(), 1)  # b's
        self.assertEqual(self.events[-3:], [("learn", mac(3), "c"), ("forget", mac(1), "a"), ("forget", mac(2), "b")])

    def test_a_removed_or_blocked_port_forgets_its_macs(self):
        self.send(self.a, [frame(BROADCAST, mac(1)), frame(BROADCAST, mac(11))])
        self.send(self.b, [frame(BROADCAST, mac(2))])
        del self.events[:]
        self.hub.remove_port(self.a)
        self.hub.block(self.b)
        self.assertEqual(sorted(self.events[:2]), [("forget", mac(1), "a"), ("forget", mac(11), "a")])
        self.assertEqual(self.events[2:], [("forget", mac(2), "b")])

    def test_a_full_table_learns_nothing_and_says_nothing(self):
        hub = self.make("small", max_entries=1)
        hub.on_learn = self.hub.on_learn
        hub.add_port(self.a)
        self.send(self.a, [frame(BROADCAST, mac(1)), frame(BROADCAST, mac(2))], hub)
        self.assertEqual(self.events, [("learn", mac(1), "a")])


class YieldingPort(SwitchCase):
    """A fabric port's MACs belong to stations elsewhere: one that shows up here moves here."""

    def setUp(self):
        super().setUp()
        self.fabric = Recorder("fabric", self.clock, max_macs=100)
        self.fabric.yields_macs = True
        self.hub.add_port(self.fabric)

    def test_a_station_that_moves_here_takes_its_mac(self):
        self.send(self.fabric, [frame(BROADCAST, mac(5), b"from another node")])
        self.assertTrue(self.hub.claim(mac(5), self.a))  # its card joined this hub
        self.assertIs(self.hub.lookup(mac(5)), self.a)
        self.assertEqual((self.fabric.macs, self.hub.mac_conflicts, self.hub.conflicts), (set(), 0, {}))
        self.send(self.b, [frame(mac(5), mac(2), b"to 5")])
        self.assertEqual(self.a.got[-1], frame(mac(5), mac(2), b"to 5"))
        self.assertNotIn(frame(mac(5), mac(2), b"to 5"), self.fabric.got)

    def test_it_cannot_take_a_live_local_mac(self):
        self.send(self.a, [frame(BROADCAST, mac(1), b"the card")])
        self.send(self.fabric, [frame(BROADCAST, mac(1), b"a copy elsewhere")])
        self.assertIs(self.hub.lookup(mac(1)), self.a)
        self.assertEqual(self.hub.mac_conflicts, 1)
        self.assertNotIn(frame(BROADCAST, mac(1), b"a copy elsewhere"), self.b.got)
