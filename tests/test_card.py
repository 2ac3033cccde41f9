"""
The card's life on a fake clock: reconnecting forever, resuming without
loss, its edge queue, and its state machine as the README shows it.
"""

from twisted.trial.unittest import SynchronousTestCase

from sevpn import card as card_states
from sevpn.hub import Hub
from sevpn.hublink import HubLinkFactory
from tests.support import BROADCAST, Lab, overflow_during_outage, frame, mac, payloads


class Reconnect(SynchronousTestCase):
    def setUp(self):
        self.lab = Lab(self)

    def test_hub_unreachable_at_start_then_appears(self):
        self.lab.network.up = False
        card = self.lab.card(1)
        self.lab.network.run(120, step=0.25)
        self.assertEqual(card.state, card_states.CONNECTING)
        self.assertFalse(card.lan.tap.carrier)
        # capped backoff: about one try per 2.5-5 s, never giving up
        self.assertTrue(25 <= card.attempts <= 55, card.attempts)
        self.assertIn("the line is down", card.last_error)
        self.lab.network.restore()
        self.lab.network.run(6, step=0.25)
        self.assertEqual(card.state, card_states.CONNECTED)
        self.assertTrue(card.lan.tap.carrier)

    def test_no_auto_reconnect(self):
        self.lab.network.up = False
        card = self.lab.card(1, connect=False)
        card.test_account.auto_reconnect = False
        card.connect(card.test_account)
        self.lab.network.run(10, step=0.25)
        self.assertEqual(card.state, card_states.DISCONNECTED)
        self.assertEqual(card.attempts, 1)

    def test_disconnect_says_goodbye_and_stops(self):
        a, _ = self.lab.card(1), self.lab.card(2)
        a.lan.tap.os_sends([frame(BROADCAST, mac(1))])
        self.lab.network.pump()
        a.disconnect()
        self.lab.network.run(30, step=0.5)
        self.assertEqual(a.state, card_states.DISCONNECTED)
        self.assertFalse(a.lan.tap.carrier)
        self.assertEqual([s["user"] for s in self.lab.hub.describe_sessions()], ["u2"])  # no hold
        self.assertEqual([m["mac"] for m in self.lab.hub.describe_macs()["DEFAULT"]["macs"]], ["02:00:00:00:00:02"])
        a.connect(a.test_account)
        self.lab.network.pump()
        self.assertTrue(a.lan.tap.carrier)


class Resume(SynchronousTestCase):
    """Session resumption: a short outage loses not one frame."""

    def setUp(self):
        self.lab = Lab(self, resume_window=60)
        self.a, self.b = self.lab.card(1), self.lab.card(2)
        self.n = 0
        self.a.lan.tap.os_sends([frame(BROADCAST, mac(1), b"hi")])
        self.b.lan.tap.os_sends([frame(BROADCAST, mac(2), b"hi")])
        self.lab.network.pump()
        self.expect_a, self.expect_b = [], []
        self.a.lan.tap.written.clear()
        self.b.lan.tap.written.clear()

    def traffic(self, count=5):
        """Frames both ways, numbered, through the hub."""
        fa, fb = [], []
        for _ in range(count):
            self.n += 1
            fa.append(frame(mac(2), mac(1), b"a%06d" % self.n))
            fb.append(frame(mac(1), mac(2), b"b%06d" % self.n))
        self.a.lan.tap.os_sends(fa)
        self.b.lan.tap.os_sends(fb)
        self.expect_b += [f[14:] for f in fa]
        self.expect_a += [f[14:] for f in fb]

    def assertExact(self):
        self.lab.network.run(1)
        self.assertEqual(payloads(self.b.lan.tap), self.expect_b)
        self.assertEqual(payloads(self.a.lan.tap), self.expect_a)
        for card in (self.a, self.b):
            self.assertEqual(card.status()["frames_dropped"], 0)
        for s in self.lab.hub.describe_sessions():
            self.assertEqual(s["frames_dropped"], 0)

    def outage(self, seconds, traffic_during=True):
        self.traffic()  # in flight when the line goes
        self.lab.network.cut()
        self.assertEqual(self.a.state, card_states.RESUMING)
        self.assertTrue(self.a.lan.tap.carrier)  # applications see no unplugged cable
        if traffic_during:
            self.traffic()
        self.lab.network.run(seconds, step=0.25)
        self.lab.network.restore()
        self.lab.network.run(6, step=0.25)
        self.assertEqual(self.a.state, card_states.CONNECTED)

    def test_resume_after_outages(self):
        for seconds in (1, 5, 20):
            self.traffic()
            self.lab.network.pump()
            self.outage(seconds)
            self.traffic()
        self.assertExact()
        self.assertEqual(self.a.status()["resumes"], 3)
        self.assertEqual([s["resumes"] for s in self.lab.hub.describe_sessions()], [3, 3])
        self.assertEqual(self.a.lan.tap.carrier_changes, [True])  # up once, never down
        self.assertGreater(self.a.status()["frames_retransmitted"], 0)

    def test_loss_before_any_ack(self):
        self.traffic(50)
        # the line dies before anything is pumped: nothing was acknowledged
        self.lab.network.cut()
        self.lab.network.restore()
        self.lab.network.run(3)
        self.assertExact()

    def test_loss_during_the_resume_handshake(self):
        self.traffic()
        self.lab.network.cut()
        self.traffic()
        self.lab.network.restore()
        # let the card reconnect and its hello reach the hub, then cut:
        # the hub's welcome and what it resent are lost
        for _ in range(200):
            self.lab.clock.advance(0.05)
            if len(self.lab.network.connections) == 2:
                break
        for conn in self.lab.network.connections:
            conn.server.dataReceived(b"".join(conn.ct.buffer))
            conn.ct.buffer = []
            self.assertTrue(conn.st.buffer)
        self.lab.network.cut()
        self.traffic()
        self.lab.network.restore()
        self.lab.network.run(3)
        # and once more right after the welcome
        self.lab.network.cut()
        self.traffic()
        self.lab.network.restore()
        self.lab.network.run(3)
        self.traffic()
        self.assertExact()

    def test_both_cards_cut_twice_in_a_row(self):
        self.traffic()
        self.lab.network.cut()
        self.lab.network.restore()
        self.lab.clock.advance(0.05)
        self.lab.network.cut()
        self.traffic()
        self.lab.network.restore()
        self.lab.network.run(5)
        self.traffic()
        self.assertExact()

    def test_window_passes(self):
        self.traffic()
        self.lab.network.pump()
        self.lab.network.cut()
        self.lab.network.run(59, step=1)
        self.assertTrue(self.a.lan.tap.carrier)
        self.assertEqual(len(self.lab.hub.sessions), 2)
        self.lab.network.run(2, step=1)
        # both ends gave the session up: cable unplugged, MAC table clean
        self.assertFalse(self.a.lan.tap.carrier)
        self.assertEqual(self.lab.hub.sessions, {})
        self.assertEqual(self.lab.hub.describe_macs()["DEFAULT"]["macs"], [])
        old = self.a.status()
        self.assertIsNone(old["session"])
        self.lab.network.restore()
        self.lab.network.run(6, step=0.5)
        self.assertTrue(self.a.lan.tap.carrier)
        self.assertEqual(self.a.status()["resumes"], 0)  # a fresh session

    def test_buffer_overflow_is_counted(self):
        lab = Lab(self, buffer_limit=4096)
        a, b = lab.card(1), lab.card(2)
        overflow_during_outage(lab, a, b)
        got = payloads(b.lan.tap)
        dropped = a.status()["frames_dropped"]
        self.assertGreater(dropped, 0)
        self.assertEqual(len(got) + dropped, 40)
        # what arrived is the newest frames, in order, each once
        self.assertEqual([g[:5] for g in got], [b"%05d" % i for i in range(40 - len(got), 40)])

    def test_hub_restart_is_a_fresh_session(self):
        old_session = self.a.status()["session"]
        self.lab.network.cut()
        # the hub process is replaced: its memory is gone
        hub = Hub(self.lab.state, self.lab.clock)
        self.lab.network.server_factory = HubLinkFactory(hub, self.lab.clock, self.lab.keepalive)
        self.lab.network.restore()
        self.lab.network.run(3)
        self.assertEqual(self.a.state, card_states.CONNECTED)
        self.assertNotEqual(self.a.status()["session"], old_session)
        self.assertTrue(self.a.lan.tap.carrier)
        self.traffic()
        self.lab.network.run(1)
        self.assertEqual(payloads(self.b.lan.tap)[-5:], self.expect_b[-5:])


class EdgeQueue(SynchronousTestCase):
    def test_card_drops_at_the_edge_when_the_hub_stays_full(self):
        """A card's link to the hub queues like a switch port: up to PORT_QUEUE, then drops."""
        from sevpn.port import PORT_QUEUE

        lab = Lab(self)
        a = lab.card(1)
        a.session.link.pauseProducing()
        big = frame(BROADCAST, mac(1), b"x" * 60000)
        queued = -(-PORT_QUEUE // len(big))
        for _ in range(queued):
            a.lan.tap.os_sends([big])
        self.assertEqual(a.status()["congestion_drops"], 0)  # a burst is queued
        a.lan.tap.os_sends([big] * 3)
        self.assertEqual(a.status()["congestion_drops"], 3)
        a.session.link.resumeProducing()
        a.lan.tap.os_sends([big])
        self.assertEqual(a.status()["congestion_drops"], 3)
        self.assertEqual(a.status()["frames_dropped"], 0)
        lab.network.pump()
        self.assertEqual(a.status()["frames_out"], queued + 1)


class ReplacedSessions(SynchronousTestCase):
    """A session being replaced: the transitions that were wrong before the state machines."""

    def setUp(self):
        self.lab = Lab(self)
        self.lab.state.create_hub("OTHER")
        self.logged = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def text(self):
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.logged]

    def macs(self, hub="DEFAULT"):
        return {m["mac"] for m in self.lab.hub.describe_macs()[hub]["macs"]}

    def kill(self, card):
        """The card's process dies: its connection closes and it never speaks again."""
        [conn] = [c for c in self.lab.network.connections if c.client.card is card]
        self.lab.network.up = False
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        conn.close(Failure(ConnectionLost("the card was killed")))
        card.disconnect()  # stands for "never again": it has no link to say anything on
        self.lab.network.up = True

    def test_connect_while_connected_says_goodbye_first(self):
        a, b = self.lab.card(1), self.lab.card(2)
        a.lan.tap.os_sends([frame(BROADCAST, mac(1), b"a")])
        self.lab.network.pump()
        old = a.status()["session"]
        self.lab.user("u1", hub="OTHER")
        from dataclasses import replace

        a.connect(replace(a.test_account, name="other", hub_name="OTHER"))
        self.lab.network.pump()
        self.assertEqual(a.state, card_states.CONNECTED)
        # the old session ended at once on the goodbye: not held, MACs gone, no false conflict
        self.assertNotIn(old, [s["id"] for s in self.lab.hub.describe_sessions()])
        self.assertEqual(self.macs("DEFAULT"), {"02:00:00:00:00:02"})  # b's; a's went with its session
        self.assertEqual(self.lab.hub.describe_macs()["DEFAULT"]["conflicts"], [])
        self.assertTrue(any("switches to account other" in line for line in self.text()))
        # and back to DEFAULT: the card's MAC is its own there at once
        a.connect(a.test_account)
        self.lab.network.pump()
        a.lan.tap.os_sends([frame(BROADCAST, mac(1), b"back")])
        self.lab.network.pump()
        self.assertEqual(payloads(b.lan.tap)[-1], b"back")
        self.assertEqual(self.macs("OTHER"), set())

    def test_a_restarted_card_ends_its_held_session(self):
        a, b = self.lab.card(1), self.lab.card(2)
        a.lan.tap.os_sends([frame(BROADCAST, mac(1), b"a")])
        self.lab.network.pump()
        old = a.status()["session"]
        self.kill(a)
        self.assertEqual([s["state"] for s in self.lab.hub.describe_sessions() if s["id"] == old], ["held"])
        again = self.lab.card(1)  # the same state dir: the same MAC and user, a fresh session
        self.assertNotIn(old, [s["id"] for s in self.lab.hub.describe_sessions()])
        again.lan.tap.os_sends([frame(BROADCAST, mac(1), b"I am back")])
        self.lab.network.pump()
        self.assertEqual(payloads(b.lan.tap)[-1], b"I am back")
        self.assertEqual(self.lab.hub.describe_macs()["DEFAULT"]["conflicts"], [])
        self.assertTrue(any("replaced by a new login of the same card" in line for line in self.text()))

    def test_another_users_held_session_is_not_ended(self):
        a = self.lab.card(1)
        old = a.status()["session"]
        self.kill(a)
        self.lab.card(3, user="u3")  # another user, another MAC
        self.assertIn(old, [s["id"] for s in self.lab.hub.describe_sessions()])

    def test_the_hubs_goodbye_reason_reaches_the_card(self):
        a = self.lab.card(1)
        self.lab.hub.shutdown()
        self.lab.network.pump()
        self.assertTrue(any("closed the session (the hub is shutting down); reconnecting" in line
                            for line in self.text()), self.text()[-5:])
        self.assertEqual(a.lan.tap.carrier_changes, [True, False, True])  # unplugged, then a fresh session
        self.assertEqual(a.status()["reconnects"], 1)


class ReadmeTable(SynchronousTestCase):
    """
    The README's table "What a user sees on a real line" is the card's
    state machine as a user meets it: each row is driven here, and its
    log line, state and carrier must be what the README says.
    """

    def setUp(self):
        self.lab = Lab(self, resume_window=60)
        self.logged = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def rows(self):
        import os
        import re

        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
            text = f.read()
        section = text.split("## What a user sees on a real line", 1)[1].split("\n\n", 2)[1]
        rows = {}
        for line in section.splitlines()[2:]:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            event, log, state, carrier = cells
            rows[event] = (re.search(r"`([^`]*)`", log).group(1), state.strip("`"), carrier.split()[0])
        return rows

    def check(self, card, row, since):
        import re

        from twisted.logger import formatEvent

        log, state, carrier = row
        pattern = re.escape(log)
        for placeholder, value in (("host:5555", "192.0.2.2:5555"), ("alice", card.account.user), ("…", ".*"),
                                   ("N", r"\d+")):
            pattern = pattern.replace(re.escape(placeholder), value)
        lines = [formatEvent(e) for e in self.logged[since:]]
        self.assertTrue(any(re.fullmatch(pattern, line) for line in lines), (log, lines))
        self.assertEqual(card.state, state)
        self.assertEqual(str(int(card.lan.tap.carrier)), carrier)

    def test_every_row(self):
        rows = self.rows()
        scenarios = {
            "connected": self.connected,
            "hub unreachable": self.unreachable,
            "refused (password, virtual hub, user disabled)": self.refused,
            "link lost": self.link_lost,
            "resumed": self.resumed,
            "window passed": self.window_passed,
            "hub lost the session (restarted)": self.hub_lost_session,
            "hub shut down cleanly": self.hub_shut_down,
            "another account connected": self.another_account,
            "disconnected": self.disconnected,
            "link lost, auto-reconnect off": self.no_auto_reconnect,
        }
        self.assertEqual(set(rows), set(scenarios))
        for event, scenario in scenarios.items():
            self.lab = Lab(self, resume_window=60)
            since = len(self.logged)
            card = scenario()
            self.check(card, rows[event], since)

    def connected(self):
        return self.lab.card(1)

    def unreachable(self):
        self.lab.network.up = False
        card = self.lab.card(1)
        self.lab.network.run(2)
        return card

    def refused(self):
        return self.lab.card(1, password="wrong")

    def link_lost(self):
        card = self.lab.card(1)
        self.lab.network.cut()
        return card

    def resumed(self):
        card = self.link_lost()
        self.lab.network.restore()
        self.lab.network.run(1)
        return card

    def window_passed(self):
        card = self.link_lost()
        self.lab.network.run(61, step=1)
        return card

    def hub_lost_session(self):
        card = self.link_lost()
        hub = Hub(self.lab.state, self.lab.clock)
        self.lab.network.server_factory = HubLinkFactory(hub, self.lab.clock, self.lab.keepalive)
        self.lab.network.restore()
        self.lab.network.run(1)
        self.assertEqual(card.lan.tap.carrier_changes, [True, False, True])
        return card

    def hub_shut_down(self):
        card = self.lab.card(1)
        self.lab.hub.shutdown()
        self.lab.network.up = False
        self.lab.network.pump()
        return card

    def another_account(self):
        from dataclasses import replace

        card = self.lab.card(1)
        self.lab.network.up = False
        card.connect(replace(card.test_account, name="second"))
        return card

    def disconnected(self):
        card = self.lab.card(1)
        card.disconnect()
        return card

    def no_auto_reconnect(self):
        card = self.lab.card(1, connect=False)
        card.test_account.auto_reconnect = False
        card.connect(card.test_account)
        self.lab.network.pump()
        self.lab.network.cut()
        return card


class SeveralNodes(SynchronousTestCase):
    """An account that lists several nodes of a hub: tried in turn, and the card moves when its node goes."""

    def setUp(self):
        from sevpn.card import Card, NicSide
        from tests.support import FakeTap, MemoryNetwork

        self.lab = Lab(self)
        self.lab.user("u1")
        self.node2 = Hub(self.lab.state, self.lab.clock)
        self.net2 = MemoryNetwork(self.lab.clock, HubLinkFactory(self.node2, self.lab.clock, self.lab.keepalive))
        self.card = Card(self.lab.clock, NicSide(FakeTap(self.lab.clock)), mac(1),
                         lambda account: [self.lab.network, self.net2], keepalive=self.lab.keepalive)
        from sevpn.accounts import Account

        self.account = Account(name="fabric", hub="192.0.2.2:5555", more_hubs=["192.0.2.3:5555"], user="u1",
                               password="secret", ca_file="/nonexistent")

    def run_both(self, seconds):
        end = self.lab.clock.seconds() + seconds
        while self.lab.clock.seconds() < end:
            self.lab.network.pump()
            self.net2.pump()
            self.lab.clock.advance(0.05)

    def test_the_next_node_when_the_first_is_down(self):
        self.lab.network.up = False
        self.card.connect(self.account)
        self.run_both(3)
        self.assertEqual(self.card.state, card_states.CONNECTED)
        self.assertEqual(self.card.status()["hub"], "192.0.2.3:5555")
        self.assertEqual(len(self.node2.sessions), 1)

    def test_moves_when_its_node_goes(self):
        self.card.connect(self.account)
        self.run_both(1)
        self.assertEqual(self.card.status()["hub"], "192.0.2.2:5555")
        self.lab.network.cut()  # node 1 is gone, and stays gone
        self.run_both(10)
        self.assertEqual(self.card.state, card_states.CONNECTED)
        self.assertEqual(self.card.status()["hub"], "192.0.2.3:5555")
        # a fresh session on the other node: the cable was unplugged and plugged in again
        self.assertEqual(self.card.lan.tap.carrier_changes, [True, False, True])

    def test_a_failure_is_logged_with_the_node_that_failed(self):
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.lab.network.up = False
        self.card.connect(self.account)
        self.run_both(3)
        [failed] = [e for e in events if e.get("log_format", "").startswith("cannot connect to hub")]
        self.assertEqual(failed["addr"], "192.0.2.2:5555")


class ResumeWithLargeFrames(SynchronousTestCase):
    def test_a_welcome_and_a_large_resend_in_one_read(self):
        """The hub's welcome and the super-frames it resends arrive together; the card reads both."""
        lab = Lab(self)
        a, b = lab.card(1), lab.card(2)
        a.lan.tap.os_sends([frame(BROADCAST, mac(1))])
        lab.network.pump()
        lab.network.cut()
        big = [frame(mac(1), mac(2), bytes([i]) * 60000) for i in range(3)]
        b.lan.tap.os_sends(big)  # held at the hub for a
        lab.network.restore()
        lab.network.run(3)
        self.assertEqual(a.state, card_states.CONNECTED)
        self.assertEqual(a.status()["resumes"], 1)
        self.assertEqual(a.lan.tap.written[-3:], big)
