"""
The hub and cards talking over in-memory connections, on a fake clock:
the handshake, switching, refusals, hostile input, keepalive, reconnecting
forever, and session resumption that loses nothing.
"""

from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase

from sevpn import card as card_states
from sevpn import wire
from sevpn.hub import Hub
from sevpn.hublink import HANDSHAKE_TIMEOUT, HubLinkFactory
from sevpn.timing import KEEPALIVE_TIMEOUT
from tests.support import BROADCAST, Lab, frame, mac


def payloads(tap, dst=None):
    """The payloads a TAP received (the test frames number themselves)."""
    return [f[14:] for f in tap.written if dst is None or f[:6] == dst]


class Core(SynchronousTestCase):
    def setUp(self):
        self.lab = Lab(self)

    def test_cable_unplugged_until_welcomed(self):
        card = self.lab.card(1, connect=False)
        self.assertFalse(card.tap.carrier)
        card.connect(card.test_account)
        self.assertFalse(card.tap.carrier)  # hello sent, no welcome yet
        self.lab.network.pump()
        self.assertTrue(card.tap.carrier)
        self.assertEqual(card.state, card_states.CONNECTED)
        self.assertEqual([s["user"] for s in self.lab.hub.describe_sessions()], ["u1"])

    def test_frames_cross_the_hub(self):
        a, b = self.lab.card(1), self.lab.card(2)
        a.tap_frames([frame(BROADCAST, mac(1), b"arp?")])
        self.lab.network.pump()
        self.assertEqual(payloads(b.tap), [b"arp?"])
        self.assertEqual(a.tap.written, [])  # never echoed
        b.tap_frames([frame(mac(1), mac(2), b"reply")])
        a.tap_frames([frame(mac(2), mac(1), b"data")])
        self.lab.network.pump()
        self.assertEqual(payloads(a.tap), [b"reply"])
        self.assertEqual(payloads(b.tap), [b"arp?", b"data"])
        self.assertEqual(a.status()["frames_out"], 2)
        self.assertEqual(a.status()["bytes_in"], len(frame(mac(1), mac(2), b"reply")))

    def test_learned_unicast_reaches_only_its_card(self):
        a, b, c = self.lab.card(1), self.lab.card(2), self.lab.card(3)
        b.tap_frames([frame(BROADCAST, mac(2), b"hello")])
        self.lab.network.pump()
        a.tap_frames([frame(mac(2), mac(1), b"for b")])
        self.lab.network.pump()
        self.assertEqual(payloads(b.tap), [b"for b"])
        self.assertEqual(payloads(c.tap), [b"hello"])

    def test_virtual_hubs_are_separate_segments(self):
        self.lab.state.create_hub("OTHER")
        a, b = self.lab.card(1), self.lab.card(2)
        x = self.lab.card(3, hub="OTHER")
        self.assertTrue(x.tap.carrier)
        a.tap_frames([frame(BROADCAST, mac(1), b"bcast"), frame(mac(3), mac(1), b"unknown")])
        self.lab.network.pump()
        self.assertEqual(payloads(b.tap), [b"bcast", b"unknown"])
        self.assertEqual(x.tap.written, [])
        macs = self.lab.hub.describe_macs()
        self.assertEqual([m["mac"] for m in macs["DEFAULT"]["macs"]], ["02:00:00:00:00:01"])
        self.assertEqual(macs["OTHER"]["macs"], [])
        self.assertEqual(macs["DEFAULT"]["counters"]["flooded"], 2)  # the broadcast and the unknown unicast
        self.assertEqual(macs["OTHER"]["counters"]["flooded"], 0)

    def test_batch_is_one_message_per_destination(self):
        a, b = self.lab.card(1), self.lab.card(2)
        b.tap_frames([frame(BROADCAST, mac(2))])
        self.lab.network.pump()
        [conn_a, conn_b] = self.lab.network.connections
        writes = []
        original = conn_b.st.write
        conn_b.st.write = lambda data: (writes.append(data), original(data))
        a.tap_frames([frame(mac(2), mac(1), bytes([i]) * 40) for i in range(50)])
        self.lab.network.pump()
        self.assertEqual(len(payloads(b.tap)), 50)
        self.assertEqual(sum(1 for w in writes if w[4] == wire.DATA), 1)

    def test_duplicate_mac_shows_in_status(self):
        a, b = self.lab.card(1), self.lab.card(2)
        a.tap_frames([frame(BROADCAST, mac(9))])
        self.lab.network.pump()
        b.tap_frames([frame(BROADCAST, mac(9))])
        self.lab.network.pump()
        [dup] = self.lab.hub.describe_macs()["DEFAULT"]["duplicates"]
        self.assertEqual(dup["mac"], "02:00:00:00:00:09")
        self.assertEqual(len(dup["sessions"]), 2)


class Refusals(SynchronousTestCase):
    def setUp(self):
        self.lab = Lab(self)
        self.lab.user("alice", "right")

    def assertRefused(self, card, fragment):
        self.assertEqual(card.state, card_states.REFUSED)
        self.assertIn(fragment, card.last_error)
        self.assertFalse(card.tap.carrier)
        self.assertEqual(self.lab.hub.sessions, {})
        # no hammering: time passes, no new attempt is made
        before = next(self.lab.network._ports)
        self.lab.network.run(60, step=1)
        self.assertEqual(next(self.lab.network._ports), before + 1)
        self.assertEqual(card.state, card_states.REFUSED)

    def test_wrong_password(self):
        card = self.lab.card(1, user="alice", password="wrong")
        self.assertRefused(card, "user name or password is wrong")
        self.assertEqual(self.lab.hub.refusals, 1)

    def test_unknown_user(self):
        self.assertRefused(self.lab.card(1, user="mallory", password="x"), "user name or password is wrong")

    def test_unknown_virtual_hub(self):
        card = self.lab.card(1, user="alice", password="right", hub="NOWHERE")
        self.assertRefused(card, "no virtual hub of that name")

    def test_guessing_is_throttled_per_address(self):
        guesses = [self.lab.card(10 + i, user="alice", password=f"guess{i}") for i in range(5)]
        self.assertTrue(all(g.state == card_states.REFUSED for g in guesses))
        checks = []
        original = self.lab.state.authenticate
        self.patch(self.lab.state, "authenticate", lambda *a: checks.append(a) or original(*a))
        # the right password from the same address now waits its turn, unchecked
        card = self.lab.card(1, user="alice", password="right")
        self.assertEqual(checks, [])
        self.assertEqual(card.state, card_states.CONNECTING)  # retried, not given up
        self.assertIn("too many failed logins", card.last_error)
        self.lab.network.run(15, step=0.5)
        self.assertEqual(card.state, card_states.CONNECTED)

    def test_connect_again_after_fixing(self):
        card = self.lab.card(1, user="alice", password="wrong")
        self.assertEqual(card.state, card_states.REFUSED)
        card.test_account.password = "right"
        card.connect(card.test_account)
        self.lab.network.pump()
        self.assertEqual(card.state, card_states.CONNECTED)


class Raw(Protocol):
    def __init__(self):
        self.received = b""
        self.lost = None

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost = reason


class RawFactory:
    def __init__(self):
        self.protocols = []

    def buildProtocol(self, addr):
        p = Raw()
        self.protocols.append(p)
        return p


class HostileInput(SynchronousTestCase):
    """Bad input ends that one connection; the hub and other sessions go on."""

    def setUp(self):
        self.lab = Lab(self)
        self.a, self.b = self.lab.card(1), self.lab.card(2)
        self.raw = RawFactory()
        self.lab.network.connect(self.raw)
        self.peer = self.raw.protocols[-1]
        self.conn = self.lab.network.connections[-1]
        self.logged = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def send(self, data):
        self.conn.ct.write(data)
        self.lab.network.pump()

    def assertClosedAndOthersFine(self, reason):
        self.assertIsNotNone(self.peer.lost)
        self.assertTrue(any(reason in str(e.get("reason", "")) for e in self.logged), self.logged[-3:])
        self.a.tap_frames([frame(BROADCAST, mac(1), b"still here")])
        self.lab.network.pump()
        self.assertEqual(payloads(self.b.tap), [b"still here"])
        self.assertEqual(len(self.lab.hub.sessions), 2)

    def test_garbage_instead_of_hello(self):
        self.send(b"GET / HTTP/1.1\r\n\r\n")
        self.assertClosedAndOthersFine("unknown message type")

    def test_oversized_message(self):
        self.send(b"\x7f\xff\xff\xff\x04")
        self.assertClosedAndOthersFine("exceeds")

    def test_data_before_hello(self):
        self.send(wire.encode_data(1, 0, wire.encode_frames([frame(BROADCAST, mac(5))])))
        self.assertEqual(self.b.tap.written, [])
        self.assertClosedAndOthersFine("unexpected DATA")

    def test_malformed_hello(self):
        self.send(wire.encode(wire.HELLO, wire.MAGIC + b"\x01{not json"))
        self.assertClosedAndOthersFine("not valid JSON")

    def test_hello_missing_fields(self):
        self.send(wire.encode_json(wire.HELLO, {"hub": "DEFAULT"}))
        self.assertIn(b"bad-hello", self.peer.received)
        self.assertIsNotNone(self.peer.lost)

    def test_stalled_peer_is_dropped(self):
        self.send(b"\x00\x00")  # half a header, then silence
        self.lab.network.run(HANDSHAKE_TIMEOUT + 1, step=1)
        self.assertClosedAndOthersFine("no hello within")

    def test_bad_frame_inside_session(self):
        """A card that sends a truncated frame loses its own link only."""
        conn_a = self.lab.network.connections[0]
        conn_a.ct.write(wire.encode_data(1, 0, b"\x00\x00\x00\x40short"))
        self.lab.network.pump()
        self.assertTrue(any("ends inside a frame" in str(e.get("reason", "")) for e in self.logged))
        self.b.tap_frames([frame(BROADCAST, mac(2), b"b lives")])
        self.lab.network.pump()
        self.assertTrue(self.b.tap.carrier)

    def test_connection_flood_is_turned_away(self):
        from sevpn import hublink

        self.patch(hublink, "MAX_HANDSHAKES", 2)  # the raw peer of setUp holds one
        self.lab.network.connect(self.raw)
        self.lab.network.connect(self.raw)
        self.lab.network.pump()
        third = self.raw.protocols[-1]
        self.assertIsNotNone(third.lost)  # turned away at once
        factory = self.lab.network.server_factory
        self.assertEqual((factory.handshaking, factory.turned_away), (2, 1))
        # the cards' sessions are untouched
        self.a.tap_frames([frame(BROADCAST, mac(1), b"still here")])
        self.lab.network.pump()
        self.assertEqual(payloads(self.b.tap), [b"still here"])
        # once the silent ones time out, connections are admitted again
        self.lab.network.run(HANDSHAKE_TIMEOUT + 1, step=1)
        self.assertEqual(factory.handshaking, 0)
        card = self.lab.card(3)
        self.assertTrue(card.tap.carrier)

    def test_ack_of_never_sent_frame(self):
        self.lab.network.connections[0].ct.write(wire.encode_ack(10**6))
        self.lab.network.pump()
        self.assertTrue(any("acknowledged frame 1000000" in str(e.get("reason", "")) for e in self.logged))


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
            self.card.tap_frames([frame(BROADCAST, mac(1))])
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


class Reconnect(SynchronousTestCase):
    def setUp(self):
        self.lab = Lab(self)

    def test_hub_unreachable_at_start_then_appears(self):
        self.lab.network.up = False
        card = self.lab.card(1)
        self.lab.network.run(120, step=0.25)
        self.assertEqual(card.state, card_states.CONNECTING)
        self.assertFalse(card.tap.carrier)
        # capped backoff: about one try per 2.5-5 s, never giving up
        self.assertTrue(25 <= card.attempts <= 55, card.attempts)
        self.assertIn("the line is down", card.last_error)
        self.lab.network.restore()
        self.lab.network.run(6, step=0.25)
        self.assertEqual(card.state, card_states.CONNECTED)
        self.assertTrue(card.tap.carrier)

    def test_no_auto_reconnect(self):
        self.lab.network.up = False
        card = self.lab.card(1, connect=False)
        card.test_account.auto_reconnect = False
        card.connect(card.test_account)
        self.lab.network.run(10, step=0.25)
        self.assertEqual(card.state, card_states.IDLE)
        self.assertEqual(card.attempts, 1)

    def test_disconnect_says_goodbye_and_stops(self):
        a, _ = self.lab.card(1), self.lab.card(2)
        a.tap_frames([frame(BROADCAST, mac(1))])
        self.lab.network.pump()
        a.disconnect()
        self.lab.network.run(30, step=0.5)
        self.assertEqual(a.state, card_states.IDLE)
        self.assertFalse(a.tap.carrier)
        self.assertEqual([s["user"] for s in self.lab.hub.describe_sessions()], ["u2"])  # no hold
        self.assertEqual(self.lab.hub.describe_macs()["DEFAULT"]["macs"], [])
        a.connect(a.test_account)
        self.lab.network.pump()
        self.assertTrue(a.tap.carrier)


class Resume(SynchronousTestCase):
    """Seed fact 6: a short outage loses not one frame."""

    def setUp(self):
        self.lab = Lab(self, resume_window=60)
        self.a, self.b = self.lab.card(1), self.lab.card(2)
        self.n = 0
        self.a.tap_frames([frame(BROADCAST, mac(1), b"hi")])
        self.b.tap_frames([frame(BROADCAST, mac(2), b"hi")])
        self.lab.network.pump()
        self.expect_a, self.expect_b = [], []
        self.a.tap.written.clear()
        self.b.tap.written.clear()

    def traffic(self, count=5):
        """Frames both ways, numbered, through the hub."""
        fa, fb = [], []
        for _ in range(count):
            self.n += 1
            fa.append(frame(mac(2), mac(1), b"a%06d" % self.n))
            fb.append(frame(mac(1), mac(2), b"b%06d" % self.n))
        self.a.tap_frames(fa)
        self.b.tap_frames(fb)
        self.expect_b += [f[14:] for f in fa]
        self.expect_a += [f[14:] for f in fb]

    def assertExact(self):
        self.lab.network.run(1)
        self.assertEqual(payloads(self.b.tap), self.expect_b)
        self.assertEqual(payloads(self.a.tap), self.expect_a)
        for card in (self.a, self.b):
            self.assertEqual(card.status()["frames_dropped"], 0)
        for s in self.lab.hub.describe_sessions():
            self.assertEqual(s["frames_dropped"], 0)

    def outage(self, seconds, traffic_during=True):
        self.traffic()  # in flight when the line goes
        self.lab.network.cut()
        self.assertEqual(self.a.state, card_states.RESUMING)
        self.assertTrue(self.a.tap.carrier)  # applications see no unplugged cable
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
        self.assertEqual(self.a.tap.carrier_changes, [True])  # up once, never down
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
        self.assertTrue(self.a.tap.carrier)
        self.assertEqual(len(self.lab.hub.sessions), 2)
        self.lab.network.run(2, step=1)
        # both ends gave the session up: cable unplugged, MAC table clean
        self.assertFalse(self.a.tap.carrier)
        self.assertEqual(self.lab.hub.sessions, {})
        self.assertEqual(self.lab.hub.describe_macs()["DEFAULT"]["macs"], [])
        old = self.a.status()
        self.assertIsNone(old["session"])
        self.lab.network.restore()
        self.lab.network.run(6, step=0.5)
        self.assertTrue(self.a.tap.carrier)
        self.assertEqual(self.a.status()["resumes"], 0)  # a fresh session

    def test_buffer_overflow_is_counted(self):
        lab = Lab(self, buffer_limit=4096)
        a, b = lab.card(1), lab.card(2)
        b.tap_frames([frame(BROADCAST, mac(2))])
        lab.network.pump()
        lab.network.cut()
        for i in range(40):
            a.tap_frames([frame(mac(2), mac(1), b"%05d" % i + b"x" * 500)])
        lab.network.restore()
        lab.network.run(3)
        got = payloads(b.tap)
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
        self.assertTrue(self.a.tap.carrier)
        self.traffic()
        self.lab.network.run(1)
        self.assertEqual(payloads(self.b.tap)[-5:], self.expect_b[-5:])


class Tokens(SynchronousTestCase):
    """A resume token is bound to its session and user, and dies with it."""

    def setUp(self):
        self.lab = Lab(self)
        self.victim = self.lab.card(1)
        self.session = self.lab.hub.sessions[self.victim.status()["session"]]

    def hello_with(self, user, token, session_id=None):
        thief = self.lab.card(9, user=user, connect=False)
        thief.account = thief.test_account
        from sevpn.card import CardSession

        thief.session = CardSession(thief, session_id or self.session.id, token, False)
        return thief.hello()  # carries the victim's session and token

    def test_wrong_user_gets_a_fresh_session(self):
        self.lab.network.cut()
        self.lab.network.restore()
        self.lab.user("eve")
        hello = self.hello_with("eve", self.lab.hub.token_text(self.session))
        hello["password"] = "secret"
        link = self.lab.network.server_factory.buildProtocol(None)
        from tests.support import MemoryTransport

        link.makeConnection(MemoryTransport(self.lab.network, 1))
        self.successResultOf(self.lab.hub.authenticate(link, hello))
        session, resumed, _ = self.lab.hub.join(link, hello)
        self.assertFalse(resumed)
        self.assertIsNot(session, self.session)

    def test_wrong_token(self):
        self.lab.network.cut()
        self.lab.network.restore()
        self.assertIsNone(self.lab.hub._resumable(
            {"session": self.session.id, "token": "AAAA", "received": 0}, "u1", "DEFAULT"))
        self.assertIs(self.lab.hub._resumable(
            {"session": self.session.id, "token": self.lab.hub.token_text(self.session), "received": 0},
            "u1", "DEFAULT"), self.session)

    def test_expired_and_ended_tokens_are_useless(self):
        token = self.lab.hub.token_text(self.session)
        self.lab.network.cut()
        self.lab.network.run(61, step=1)
        self.assertIsNone(self.lab.hub._resumable({"session": self.session.id, "token": token}, "u1", "DEFAULT"))

    def test_replay_after_goodbye(self):
        token = self.lab.hub.token_text(self.session)
        self.victim.disconnect()
        self.lab.network.pump()
        self.assertIsNone(self.lab.hub._resumable({"session": self.session.id, "token": token}, "u1", "DEFAULT"))


class Backpressure(SynchronousTestCase):
    def test_a_full_card_holds_back_its_sources(self):
        """The hub loses nothing: it stops reading the sender until there is room."""
        lab = Lab(self)
        a, b = lab.card(1), lab.card(2)
        b.tap_frames([frame(BROADCAST, mac(2))])
        lab.network.pump()
        hub_b = [s for s in lab.hub.sessions.values() if s.user == "u2"][0]
        hub_a = [s for s in lab.hub.sessions.values() if s.user == "u1"][0]
        hub_b.link.pauseProducing()
        for i in range(10):
            a.tap_frames([frame(mac(2), mac(1), b"%d" % i * 1000)])
            lab.network.pump()
        self.assertEqual(len(payloads(b.tap)), 1)  # one batch went out, then a was held back
        self.assertTrue(hub_a.link.transport.reading_paused)
        hub_b.link.resumeProducing()
        lab.network.pump()
        self.assertEqual([p[:1] for p in payloads(b.tap)], [b"%d" % i for i in range(10)])
        self.assertEqual(hub_b.congestion_drops, 0)

    def test_a_stalled_card_does_not_stall_its_senders(self):
        from sevpn.link import STALL_TIME

        lab = Lab(self)
        a, b, c = lab.card(1), lab.card(2), lab.card(3)
        for i, card in ((1, a), (2, b), (3, c)):
            card.tap_frames([frame(BROADCAST, mac(i))])
            lab.network.pump()
        hub_b = [s for s in lab.hub.sessions.values() if s.user == "u2"][0]
        hub_b.link.pauseProducing()  # b stops reading and never resumes
        a.tap_frames([frame(mac(2), mac(1), b"to b")])
        lab.network.pump()
        lab.network.run(STALL_TIME * 2)
        a.tap_frames([frame(mac(3), mac(1), b"to c"), frame(mac(2), mac(1), b"to b again")])
        lab.network.pump()
        self.assertEqual(payloads(c.tap)[-1], b"to c")  # a goes on
        self.assertEqual(hub_b.congestion_drops, 1)  # what is for b is dropped and counted
        hub_b.link.resumeProducing()
        a.tap_frames([frame(mac(2), mac(1), b"back")])
        lab.network.pump()
        self.assertEqual(payloads(b.tap)[-1], b"back")

    def test_an_overflowing_port_drops_and_counts(self):
        """Past the port queue (floods from many cards), the hub drops."""
        from sevpn.link import PORT_QUEUE

        lab = Lab(self)
        cards = [lab.card(i) for i in range(1, 8)]
        lab.network.pump()
        slow = [s for s in lab.hub.sessions.values() if s.user == "u7"][0]
        slow.link.pauseProducing()
        for c in cards[:6]:
            c.tap_frames([frame(BROADCAST, mac(cards.index(c) + 1), b"x" * 60000)])
            lab.network.pump()
        queued = -(-PORT_QUEUE // 60018)
        self.assertEqual(slow.congestion_drops, 6 - queued)
        [info] = [s for s in lab.hub.describe_sessions() if s["user"] == "u7"]
        self.assertEqual(info["congestion_drops"], 6 - queued)

    def test_card_drops_at_the_edge_when_the_hub_stays_full(self):
        """A card's link to the hub queues like a switch port: up to PORT_QUEUE, then drops."""
        from sevpn.link import PORT_QUEUE

        lab = Lab(self)
        a = lab.card(1)
        a.session.link.pauseProducing()
        big = frame(BROADCAST, mac(1), b"x" * 60000)
        queued = -(-PORT_QUEUE // len(big))
        for _ in range(queued):
            a.tap_frames([big])
        self.assertEqual(a.status()["congestion_drops"], 0)  # a burst is queued
        a.tap_frames([big] * 3)
        self.assertEqual(a.status()["congestion_drops"], 3)
        a.session.link.resumeProducing()
        a.tap_frames([big])
        self.assertEqual(a.status()["congestion_drops"], 3)
        self.assertEqual(a.status()["frames_dropped"], 0)
        lab.network.pump()
        self.assertEqual(a.status()["frames_out"], queued + 1)


class MixedOffload(SynchronousTestCase):
    """A card with kernel offload and one without share a virtual hub."""

    def setUp(self):
        from tests.test_offload import gso, ipv4_tcp, verify_tcp4

        self.gso, self.ipv4_tcp, self.verify = gso, ipv4_tcp, verify_tcp4
        self.lab = Lab(self)
        self.fast = self.lab.card(1, offload=True)
        self.plain = self.lab.card(2)
        self.fast.tap_frames([b"\0" * 10 + frame(BROADCAST, mac(1))])
        self.plain.tap_frames([frame(BROADCAST, mac(2), b"hi")])
        self.lab.network.pump()

    def test_negotiated_per_session(self):
        sessions = {s["user"]: s["offload"] for s in self.lab.hub.describe_sessions()}
        self.assertEqual(sessions, {"u1": True, "u2": False})
        self.assertFalse(self.fast.session.convert)

    def test_super_frame_is_segmented_for_the_plain_card(self):
        payload = bytes(range(256)) * 20
        self.fast.tap_frames([self.gso(self.ipv4_tcp(payload), 1, 1000, 34)])
        self.lab.network.pump()
        segments = self.plain.tap.written[-6:]
        self.assertEqual(len(self.plain.tap.written), 1 + 6)  # the broadcast, then six segments
        for seg in segments:
            self.verify(seg)
        self.assertEqual(b"".join(s[54:] for s in segments), payload)

    def test_plain_frames_gain_a_header_for_the_fast_card(self):
        self.assertEqual(self.fast.tap.written, [b"\0" * 10 + frame(BROADCAST, mac(2), b"hi")])

    def test_bad_header_is_dropped_and_counted(self):
        self.fast.tap_frames([b"\x40" + b"\0" * 9 + frame(mac(2), mac(1))])
        self.lab.network.pump()
        self.assertEqual(len(self.plain.tap.written), 1)
        [toward_plain] = [s for s in self.lab.hub.describe_sessions() if s["user"] == "u2"]
        self.assertEqual(toward_plain["bad_frames"], 1)

    def test_card_converts_when_the_hub_does_not_offer_offload(self):
        from sevpn.card import Card

        original = Card.hello

        def hello(card):
            h = original(card)
            h["features"] = ["vnet-hdr-from-the-future"]  # a feature this hub does not know
            return h

        self.patch(Card, "hello", hello)
        lab = Lab(self)
        fast, plain = lab.card(1, offload=True), lab.card(2)
        self.assertTrue(fast.session.convert)
        payload = b"q" * 3000
        fast.tap_frames([self.gso(self.ipv4_tcp(payload), 1, 1000, 34)])
        plain.tap_frames([frame(mac(1), mac(2), b"back")])
        lab.network.pump()
        self.assertEqual(b"".join(s[54:] for s in plain.tap.written), payload)
        self.assertEqual(fast.tap.written, [b"\0" * 10 + frame(mac(1), mac(2), b"back")])


class SlowLogin(SynchronousTestCase):
    """The password check runs elsewhere; the hub goes on meanwhile."""

    def setUp(self):
        from twisted.internet.defer import Deferred

        self.lab = Lab(self)
        self.a, self.b = self.lab.card(1), self.lab.card(2)
        self.checks = []

        def verify(f, *args):
            d = Deferred()
            self.checks.append((d, f, args))
            return d

        self.lab.hub.verify = verify

    def test_frames_flow_while_a_password_is_checked(self):
        c = self.lab.card(3)
        self.assertEqual(len(self.checks), 1)
        self.a.tap_frames([frame(BROADCAST, mac(1), b"meanwhile")])
        self.lab.network.pump()
        self.assertEqual(payloads(self.b.tap), [b"meanwhile"])
        d, f, args = self.checks.pop()
        d.callback(f(*args))
        self.lab.network.pump()
        self.assertTrue(c.tap.carrier)

    def test_card_leaves_during_the_password_check(self):
        self.lab.card(3)
        self.lab.network.cut()
        d, f, args = self.checks.pop()
        d.callback(f(*args))
        self.assertEqual(sorted(s.user for s in self.lab.hub.sessions.values()), ["u1", "u2"])
