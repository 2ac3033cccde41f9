"""The virtual hub's MAC-learning switch."""

from twisted.trial.unittest import SynchronousTestCase

from sevpn.switch import VirtualHub
from tests.support import BROADCAST, frame, mac


class Port:
    mac_offset = 0

    def __init__(self, name):
        self.name = name
        self.got = []

    def enqueue(self, f, offset):
        self.got.append(bytes(f))

    def __repr__(self):
        return self.name


class Switching(SynchronousTestCase):
    def setUp(self):
        self.hub = VirtualHub("DEFAULT", max_age=300)
        self.a, self.b, self.c = Port("a"), Port("b"), Port("c")
        for p in (self.a, self.b, self.c):
            self.hub.add_port(p)

    def test_unknown_unicast_floods_but_not_back(self):
        f = frame(mac(2), mac(1))
        self.hub.forward(self.a, [f], 0)
        self.assertEqual((self.a.got, self.b.got, self.c.got), ([], [f], [f]))

    def test_learned_unicast_goes_to_one_port(self):
        self.hub.forward(self.b, [frame(BROADCAST, mac(2))], 0)
        f = frame(mac(2), mac(1))
        self.hub.forward(self.a, [f], 1)
        self.assertEqual(self.b.got[-1], f)
        self.assertEqual(self.c.got, [frame(BROADCAST, mac(2))])
        self.assertEqual(self.hub.lookup(mac(1), 1), self.a)

    def test_broadcast_and_multicast_flood(self):
        self.hub.forward(self.b, [frame(BROADCAST, mac(2))], 0)
        self.hub.forward(self.c, [frame(mac(2), mac(3))], 0)  # b is known
        m = frame(b"\x01\x00\x5e\x00\x00\x01", mac(2))
        bc = frame(BROADCAST, mac(2))
        self.hub.forward(self.b, [m, bc], 1)
        self.assertEqual(self.a.got, [bc, m, bc])
        self.assertEqual(self.c.got, [bc, m, bc])
        self.assertNotIn(m, self.b.got)

    def test_frame_to_own_port_is_filtered(self):
        self.hub.forward(self.a, [frame(BROADCAST, mac(1))], 0)
        self.hub.forward(self.a, [frame(mac(1), mac(9))], 0)
        self.assertEqual(self.a.got, [])
        self.assertEqual(self.hub.filtered, 1)

    def test_aging(self):
        self.hub.forward(self.b, [frame(BROADCAST, mac(2))], 0)
        f = frame(mac(2), mac(1))
        self.hub.forward(self.a, [f], 299)
        self.assertNotIn(f, self.c.got)
        # b has been silent for more than 300 s: flooded again
        self.hub.forward(self.a, [f], 601)
        self.assertIn(f, self.c.got)
        self.assertEqual(self.hub.expire(1000), 1)  # a's entry, seen at 601, stays until 901
        self.assertIsNone(self.hub.lookup(mac(1), 1000))

    def test_removed_port_forgets_its_macs(self):
        self.hub.forward(self.b, [frame(BROADCAST, mac(2))], 0)
        self.hub.remove_port(self.b)
        self.hub.forward(self.a, [frame(mac(2), mac(1))], 1)
        self.assertEqual(self.c.got[-1], frame(mac(2), mac(1)))
        self.assertIsNone(self.hub.lookup(mac(2), 1))

    def test_multicast_source_not_learned(self):
        self.hub.forward(self.a, [frame(BROADCAST, b"\x01" * 6)], 0)
        self.assertEqual(self.hub.table, {})

    def test_table_is_bounded(self):
        hub = VirtualHub("small", max_entries=4)
        a, b = Port("a"), Port("b")
        hub.add_port(a)
        hub.add_port(b)
        hub.forward(a, [frame(BROADCAST, mac(i)) for i in range(1, 10)], 0)
        self.assertEqual(len(hub.table), 4)
        self.assertEqual(hub.not_learned, 5)
        self.assertEqual(len(b.got), 9)  # still switched: flooded

    def test_duplicate_mac_is_reported(self):
        seen = []
        hub = VirtualHub("dup", on_duplicate=lambda h, d: seen.append(d))
        a, b = Port("a"), Port("b")
        hub.add_port(a)
        hub.add_port(b)
        hub.forward(a, [frame(BROADCAST, mac(7))], 0)
        hub.forward(b, [frame(BROADCAST, mac(7))], 1)
        hub.forward(a, [frame(BROADCAST, mac(7))], 2)
        self.assertEqual(len(seen), 1)  # logged once per pair
        [dup] = hub.describe_duplicates(name_of=repr)
        self.assertEqual(dup["sessions"], ["a", "b"])
        self.assertEqual(dup["moves"], 2)
        self.assertEqual(hub.lookup(mac(7), 2), a)  # the latest sender wins


class Runts(SynchronousTestCase):
    def test_frames_shorter_than_their_header_are_dropped(self):
        hub = VirtualHub("x")
        a, b = Port("a"), Port("b")
        a.mac_offset = 10
        hub.add_port(a)
        hub.add_port(b)
        hub.forward(a, [b"\0" * 20, b"\0" * 10 + frame(BROADCAST, mac(1))], 0)
        self.assertEqual(hub.runts, 1)
        self.assertEqual(len(b.got), 1)
        self.assertEqual(hub.lookup(mac(1), 0), a)  # the MAC is read after the header


class Isolation(SynchronousTestCase):
    def test_virtual_hubs_share_nothing(self):
        one, two = VirtualHub("one"), VirtualHub("two")
        a, b, x = Port("a"), Port("b"), Port("x")
        one.add_port(a)
        one.add_port(b)
        two.add_port(x)
        one.forward(a, [frame(BROADCAST, mac(1)), frame(mac(9), mac(1))], 0)
        self.assertEqual(x.got, [])
        self.assertEqual(len(b.got), 2)
        self.assertIsNone(two.lookup(mac(1), 0))
