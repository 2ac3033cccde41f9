"""
The link: keepalive, a silent peer declared dead, and its state machine.
"""

from twisted.trial.unittest import SynchronousTestCase

from sevpn import card as card_states
from sevpn import wire
from sevpn.timing import KEEPALIVE_TIMEOUT
from tests.support import BROADCAST, Lab, RawFactory, frame, mac


class Keepalive(SynchronousTestCase):
    def setUp(self):
        self.lab = Lab(self)
        self.card = self.lab.card(1)
        [self.conn] = self.lab.network.connections

    def test_idle_link_sends_null_packets_and_stays_up(self):
        sizes = []
        original = self.conn.ct.write
        self.conn.ct.write = lambda d: (sizes.append(len(d)) if d[4] == wire.NULL else None, original(d))
        self.lab.network.run(120, step=0.5)
        self.assertEqual(self.card.state, card_states.CONNECTED)
        self.assertEqual(self.lab.network.connections, [self.conn])
        # every 7.5 s with this test's fixed random draw
        self.assertTrue(14 <= len(sizes) <= 17, sizes)
        self.assertTrue(all(37 <= s <= 61 for s in sizes))

    def test_no_keepalive_while_traffic_flows(self):
        nulls = []
        original = self.conn.ct.write
        self.conn.ct.write = lambda d: (nulls.append(d) if d[4] == wire.NULL else None, original(d))
        for _ in range(60):
            self.card.lan.tap.os_sends([frame(BROADCAST, mac(1))])
            self.lab.network.run(1, step=0.5)
        self.assertEqual(nulls, [])

    def test_silent_hub_is_declared_dead(self):
        # the hub's bytes no longer arrive; the card's still leave
        self.conn.st.write = lambda data: None
        self.conn.st.writeSequence = lambda seq: None
        self.lab.network.run(KEEPALIVE_TIMEOUT - 1, step=0.5)
        self.assertEqual(self.card.state, card_states.CONNECTED)
        self.lab.network.run(2, step=0.5)
        # the card gave the silent link up and resumed on a new one at once
        self.assertFalse(self.conn.alive)
        self.assertEqual(self.card.status()["reconnects"], 1)
        self.assertEqual(self.card.status()["resumes"], 1)
        self.assertEqual(self.card.state, card_states.CONNECTED)


class Life(SynchronousTestCase):
    """The link's state machine, seen from the hub's side of real (in-memory) connections."""

    def setUp(self):
        self.lab = Lab(self)
        self.card = self.lab.card(1)
        [self.conn] = self.lab.network.connections
        self.hub_link = self.conn.server

    def test_goodbye_ends_the_session_and_the_connection(self):
        closed = self.hub_link.when_closed()
        self.card.disconnect()
        self.lab.network.pump()
        self.assertTrue(closed.called)
        self.assertFalse(self.hub_link.open)
        self.assertEqual(self.lab.hub.sessions, {})

    def test_a_failure_detaches_the_session_once_and_unclean(self):
        lost = []
        original = self.lab.hub.link_lost
        self.patch(self.lab.hub, "link_lost", lambda s, clean, reason: (lost.append((clean, reason)),
                                                                       original(s, clean, reason)))
        self.hub_link.fail("a test says so")
        self.lab.network.pump()
        self.assertEqual(lost, [(False, "a test says so")])
        # held, so the card took it back on a new link
        self.assertEqual([(s["state"], s["resumes"]) for s in self.lab.hub.describe_sessions()], [("connected", 1)])

    def test_a_hello_sized_limit_until_the_handshake_is_over(self):
        raw = RawFactory()
        self.lab.network.connect(raw)
        conn = self.lab.network.connections[-1]
        conn.ct.write(wire.encode(wire.HELLO, wire.MAGIC + b"\x01" + b" " * (64 * 1024)))
        self.lab.network.pump()
        self.assertIsNotNone(raw.protocols[-1].lost)
        self.assertEqual(conn.server.reason, "HELLO message of 65542 bytes exceeds the 16390-byte limit")
        # a card that is in may send large messages
        self.card.lan.tap.os_sends([frame(BROADCAST, mac(1), b"x" * 60000)] * 3)
        self.lab.network.pump()
        self.assertTrue(self.hub_link.open)

    def test_ready_links_ignore_a_second_handshake(self):
        self.conn.ct.write(self.card.hello().encode())
        self.lab.network.pump()
        self.assertFalse(self.hub_link.open)
        self.assertIn("unexpected HELLO", self.hub_link.reason)
