"""
The hub through in-memory links on a fake clock: joining, switching,
refusals, hostile input, resume tokens, backpressure, mixed offload, and
logins checked off the reactor thread.
"""

import dataclasses
import json

from twisted.trial.unittest import SynchronousTestCase

from sevpn import card as card_states
from sevpn import wire
from sevpn.defaults import HANDSHAKE_TIMEOUT
from tests.support import BROADCAST, Lab, RawFactory, frame, mac, payloads


class Core(SynchronousTestCase):
    def setUp(self):
        self.lab = Lab(self)

    def test_cable_unplugged_until_welcomed(self):
        card = self.lab.card(1, connect=False)
        self.assertFalse(card.lan.tap.carrier)
        card.connect(card.test_account)
        self.assertFalse(card.lan.tap.carrier)  # hello sent, no welcome yet
        self.lab.network.pump()
        self.assertTrue(card.lan.tap.carrier)
        self.assertEqual(card.state, card_states.CONNECTED)
        self.assertEqual([s["user"] for s in self.lab.hub.describe_sessions()], ["u1"])

    def test_frames_cross_the_hub(self):
        a, b = self.lab.card(1), self.lab.card(2)
        a.lan.tap.os_sends([frame(BROADCAST, mac(1), b"arp?")])
        self.lab.network.pump()
        self.assertEqual(payloads(b.lan.tap), [b"arp?"])
        self.assertEqual(a.lan.tap.written, [])  # never echoed
        b.lan.tap.os_sends([frame(mac(1), mac(2), b"reply")])
        a.lan.tap.os_sends([frame(mac(2), mac(1), b"data")])
        self.lab.network.pump()
        self.assertEqual(payloads(a.lan.tap), [b"reply"])
        self.assertEqual(payloads(b.lan.tap), [b"arp?", b"data"])
        self.assertEqual(a.status()["frames_out"], 2)
        self.assertEqual(a.status()["bytes_in"], len(frame(mac(1), mac(2), b"reply")))

    def test_learned_unicast_reaches_only_its_card(self):
        a, b, c = self.lab.card(1), self.lab.card(2), self.lab.card(3)
        b.lan.tap.os_sends([frame(BROADCAST, mac(2), b"hello")])
        self.lab.network.pump()
        a.lan.tap.os_sends([frame(mac(2), mac(1), b"for b")])
        self.lab.network.pump()
        self.assertEqual(payloads(b.lan.tap), [b"for b"])
        self.assertEqual(payloads(c.lan.tap), [b"hello"])

    def test_virtual_hubs_are_separate_segments(self):
        self.lab.state.create_hub("OTHER")
        a, b = self.lab.card(1), self.lab.card(2)
        x = self.lab.card(3, hub="OTHER")
        self.assertTrue(x.lan.tap.carrier)
        a.lan.tap.os_sends([frame(BROADCAST, mac(1), b"bcast"), frame(mac(3), mac(1), b"unknown")])
        self.lab.network.pump()
        self.assertEqual(payloads(b.lan.tap), [b"bcast", b"unknown"])
        self.assertEqual(x.lan.tap.written, [])
        macs = self.lab.hub.describe_macs()
        # each card's own MAC (said in its hello) is its port's from the start
        self.assertEqual([m["mac"] for m in macs["DEFAULT"]["macs"]], ["02:00:00:00:00:01", "02:00:00:00:00:02"])
        self.assertEqual([m["mac"] for m in macs["OTHER"]["macs"]], ["02:00:00:00:00:03"])
        self.assertEqual(macs["DEFAULT"]["counters"]["flooded"], 2)  # the broadcast and the unknown unicast
        self.assertEqual(macs["OTHER"]["counters"]["flooded"], 0)

    def test_batch_is_one_message_per_destination(self):
        a, b = self.lab.card(1), self.lab.card(2)
        b.lan.tap.os_sends([frame(BROADCAST, mac(2))])
        self.lab.network.pump()
        [conn_a, conn_b] = self.lab.network.connections
        writes = []
        original = conn_b.st.write
        conn_b.st.write = lambda data: (writes.append(data), original(data))
        a.lan.tap.os_sends([frame(mac(2), mac(1), bytes([i]) * 40) for i in range(50)])
        self.lab.network.pump()
        self.assertEqual(len(payloads(b.lan.tap)), 50)
        self.assertEqual(sum(1 for w in writes if w[4] == wire.DATA), 1)

    def test_a_card_cannot_take_another_cards_mac(self):
        """The first owner keeps a MAC; frames another card sends from it are dropped, counted and shown."""
        a, b, c = self.lab.card(1), self.lab.card(2), self.lab.card(3)
        a.lan.tap.os_sends([frame(BROADCAST, mac(9), b"a owns 9")])
        self.lab.network.pump()
        b.lan.tap.os_sends([frame(BROADCAST, mac(9), b"b lies")])
        self.lab.network.pump()
        self.assertEqual(payloads(c.lan.tap), [b"a owns 9"])
        c.lan.tap.os_sends([frame(mac(9), mac(3), b"for 9")])
        self.lab.network.pump()
        self.assertEqual(payloads(a.lan.tap), [b"for 9"])  # still a's, not stolen by b
        self.assertNotIn(b"for 9", payloads(b.lan.tap))
        macs = self.lab.hub.describe_macs()["DEFAULT"]
        [conflict] = macs["conflicts"]
        self.assertEqual(conflict["mac"], "02:00:00:00:00:09")
        self.assertEqual(len(conflict["ports"]), 2)
        self.assertEqual(macs["counters"]["mac_conflicts"], 1)


class Refusals(SynchronousTestCase):
    def setUp(self):
        self.lab = Lab(self)
        self.lab.user("alice", "right")

    def assertRefused(self, card, fragment):
        self.assertEqual(card.state, card_states.REFUSED)
        self.assertIn(fragment, card.last_error)
        self.assertFalse(card.lan.tap.carrier)
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

    def test_unknown_virtual_hub_answers_like_a_wrong_password(self):
        card = self.lab.card(1, user="alice", password="right", hub="NOWHERE")
        self.assertRefused(card, "user name or password is wrong")

    def test_disabled_user_answers_like_a_wrong_password_after_a_check(self):
        """A guesser cannot tell a disabled account, an unknown hub or user from a wrong password."""
        from sevpn import users

        self.lab.user("bob", "pw")
        path = self.lab.state_dir + "/hubs/DEFAULT/users.json"
        with open(path) as f:
            data = json.load(f)
        data["users"]["bob"]["disabled"] = True
        from sevpn.files import write_json

        write_json(path, data)
        checks = []
        original = users.verify_password
        self.patch(users, "verify_password", lambda *a: checks.append(a) or original(*a))
        self.assertRefused(self.lab.card(1, user="bob", password="pw"), "user name or password is wrong")
        self.assertRefused(self.lab.card(2, user="bob", password="wrong"), "user name or password is wrong")
        self.assertRefused(self.lab.card(3, user="nobody", password="pw"), "user name or password is wrong")
        self.assertRefused(self.lab.card(4, user="bob", password="pw", hub="NOWHERE"), "user name or password is wrong")
        self.assertEqual(len(checks), 4)  # one password check each, whatever the reason

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
        self.a.lan.tap.os_sends([frame(BROADCAST, mac(1), b"still here")])
        self.lab.network.pump()
        self.assertEqual(payloads(self.b.lan.tap), [b"still here"])
        self.assertEqual(len(self.lab.hub.sessions), 2)

    def test_garbage_instead_of_hello(self):
        self.send(b"GET / HTTP/1.1\r\n\r\n")
        self.assertClosedAndOthersFine("unknown message type")

    def test_oversized_message(self):
        self.send(b"\x7f\xff\xff\xff\x04")
        self.assertClosedAndOthersFine("exceeds")

    def test_data_before_hello(self):
        self.send(wire.encode_data(1, 0, wire.encode_frames([frame(BROADCAST, mac(5))])))
        self.assertEqual(self.b.lan.tap.written, [])
        self.assertClosedAndOthersFine("unexpected DATA")

    def test_malformed_hello(self):
        self.send(wire.encode(wire.HELLO, wire.MAGIC + b"\x01{not json"))
        self.assertClosedAndOthersFine("not valid JSON")

    def test_hello_missing_fields(self):
        self.send(wire.encode(wire.HELLO, wire.MAGIC + b"\x01" + json.dumps({"hub": "DEFAULT"}).encode()))
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
        self.b.lan.tap.os_sends([frame(BROADCAST, mac(2), b"b lives")])
        self.lab.network.pump()
        self.assertTrue(self.b.lan.tap.carrier)

    def test_connection_flood_from_one_address_is_turned_away(self):
        factory = self.lab.network.server_factory
        attackers = RawFactory()
        for _ in range(12):
            self.lab.network.connect(attackers, host="198.51.100.66")
        self.lab.network.pump()
        turned_away = [p for p in attackers.protocols if p.lost is not None]
        self.assertEqual(len(turned_away), 12 - factory.admission.per_address)
        # a card from elsewhere still gets in, and the cards' sessions are untouched
        card = self.lab.card(3, host="203.0.113.3")
        self.assertTrue(card.lan.tap.carrier)
        self.a.lan.tap.os_sends([frame(BROADCAST, mac(1), b"still here")])
        self.lab.network.pump()
        self.assertEqual(payloads(self.b.lan.tap), [b"still here"])
        # once the silent ones time out, that address is admitted again
        self.lab.network.run(HANDSHAKE_TIMEOUT + 1, step=1)
        self.assertEqual(factory.handshaking, 0)
        self.lab.network.connect(attackers, host="198.51.100.66")
        self.lab.network.pump()
        self.assertIsNone(attackers.protocols[-1].lost)

    def test_new_connections_per_second_are_bounded_per_address(self):
        factory = self.lab.network.server_factory
        attackers = RawFactory()
        admitted = 0
        for second in range(10):
            for _ in range(17):
                self.lab.network.connect(attackers, host="198.51.100.66")
                self.lab.network.pump()
                if attackers.protocols[-1].lost is None:
                    admitted += 1
                    attackers.protocols[-1].transport.loseConnection()  # it goes at once: only the rate binds
                    self.lab.network.pump()
            self.lab.clock.advance(1)
        rate, burst = factory.admission.rate, factory.admission.burst
        self.assertLessEqual(admitted, burst + 10 * rate)
        # meanwhile every login from elsewhere went through
        cards = [self.lab.card(10 + i, host=f"203.0.113.{10 + i}") for i in range(11)]
        self.assertTrue(all(c.lan.tap.carrier for c in cards))

    def test_ack_of_never_sent_frame(self):
        self.lab.network.connections[0].ct.write(wire.encode_ack(10**6))
        self.lab.network.pump()
        self.assertTrue(any("acknowledged frame 1000000" in str(e.get("reason", "")) for e in self.logged))


class Tokens(SynchronousTestCase):
    """A resume token is bound to its session and user, and dies with it."""

    def setUp(self):
        self.lab = Lab(self)
        self.victim = self.lab.card(1)
        self.session = self.lab.hub.sessions[self.victim.status()["session"]]
        self.token = self.lab.hub.welcome(self.session, False).token

    def join(self, user, token, session_id=None):
        """Whether a hello asking for the victim's session gets it."""
        hello = wire.Hello("DEFAULT", user, "secret", None, frozenset(),
                           wire.Resume(session_id or self.session.id, token, 0))
        session, resumed, _ = self.lab.hub.join("192.0.2.9:4000", hello)
        self.assertEqual(resumed, session is self.session)
        return resumed

    def test_wrong_user_gets_a_fresh_session(self):
        self.lab.network.cut()
        self.lab.user("eve")
        self.assertFalse(self.join("eve", self.token))

    def test_wrong_token(self):
        self.lab.network.cut()
        self.assertFalse(self.join("u1", "AAAA"))
        self.assertFalse(self.join("u1", "not base64!"))
        self.assertTrue(self.join("u1", self.token))

    def test_expired_and_ended_tokens_are_useless(self):
        self.lab.network.cut()
        self.lab.network.run(61, step=1)
        self.assertFalse(self.join("u1", self.token))

    def test_replay_after_goodbye(self):
        self.victim.disconnect()
        self.lab.network.pump()
        self.assertFalse(self.join("u1", self.token))


class Backpressure(SynchronousTestCase):
    def test_a_full_card_holds_back_its_sources(self):
        """The hub loses nothing: it stops reading the sender until there is room."""
        lab = Lab(self)
        a, b = lab.card(1), lab.card(2)
        b.lan.tap.os_sends([frame(BROADCAST, mac(2))])
        lab.network.pump()
        hub_b = [s for s in lab.hub.sessions.values() if s.user == "u2"][0]
        hub_a = [s for s in lab.hub.sessions.values() if s.user == "u1"][0]
        hub_b.link.pauseProducing()
        for i in range(10):
            a.lan.tap.os_sends([frame(mac(2), mac(1), b"%d" % i * 1000)])
            lab.network.pump()
        self.assertEqual(len(payloads(b.lan.tap)), 1)  # one batch went out, then a was held back
        self.assertTrue(hub_a.link.transport.reading_paused)
        hub_b.link.resumeProducing()
        lab.network.pump()
        self.assertEqual([p[:1] for p in payloads(b.lan.tap)], [b"%d" % i for i in range(10)])
        self.assertEqual(hub_b.port.congestion_drops, 0)

    def test_a_stalled_card_does_not_stall_its_senders(self):
        from sevpn.port import STALL_TIME

        lab = Lab(self)
        a, b, c = lab.card(1), lab.card(2), lab.card(3)
        for i, card in ((1, a), (2, b), (3, c)):
            card.lan.tap.os_sends([frame(BROADCAST, mac(i))])
            lab.network.pump()
        hub_b = [s for s in lab.hub.sessions.values() if s.user == "u2"][0]
        hub_b.link.pauseProducing()  # b stops reading and never resumes
        a.lan.tap.os_sends([frame(mac(2), mac(1), b"to b")])
        lab.network.pump()
        lab.network.run(STALL_TIME * 2)
        a.lan.tap.os_sends([frame(mac(3), mac(1), b"to c"), frame(mac(2), mac(1), b"to b again")])
        lab.network.pump()
        self.assertEqual(payloads(c.lan.tap)[-1], b"to c")  # a goes on
        self.assertEqual(hub_b.port.congestion_drops, 1)  # what is for b is dropped and counted
        hub_b.link.resumeProducing()
        a.lan.tap.os_sends([frame(mac(2), mac(1), b"back")])
        lab.network.pump()
        self.assertEqual(payloads(b.lan.tap)[-1], b"back")

    def test_an_overflowing_port_drops_and_counts(self):
        """Past the port queue (floods from many cards), the hub drops."""
        from sevpn.port import PORT_QUEUE

        lab = Lab(self)
        cards = [lab.card(i) for i in range(1, 8)]
        lab.network.pump()
        slow = [s for s in lab.hub.sessions.values() if s.user == "u7"][0]
        slow.link.pauseProducing()
        for c in cards[:6]:
            c.lan.tap.os_sends([frame(BROADCAST, mac(cards.index(c) + 1), b"x" * 60000)])
            lab.network.pump()
        queued = -(-PORT_QUEUE // 60018)
        self.assertEqual(slow.port.congestion_drops, 6 - queued)
        [info] = [s for s in lab.hub.describe_sessions() if s["user"] == "u7"]
        self.assertEqual(info["congestion_drops"], 6 - queued)


class MixedOffload(SynchronousTestCase):
    """A card with kernel offload and one without share a virtual hub."""

    def setUp(self):
        from tests.test_offload import gso, ipv4_tcp, verify_tcp4

        self.gso, self.ipv4_tcp, self.verify = gso, ipv4_tcp, verify_tcp4
        self.lab = Lab(self)
        self.fast = self.lab.card(1, offload=True)
        self.plain = self.lab.card(2)
        self.fast.lan.tap.os_sends([b"\0" * 10 + frame(BROADCAST, mac(1))])
        self.plain.lan.tap.os_sends([frame(BROADCAST, mac(2), b"hi")])
        self.lab.network.pump()

    def test_negotiated_per_session(self):
        sessions = {s["user"]: s["offload"] for s in self.lab.hub.describe_sessions()}
        self.assertEqual(sessions, {"u1": True, "u2": False})
        self.assertEqual(self.fast.session.port.mac_offset, 10)  # nothing to convert at the card

    def test_super_frame_is_segmented_for_the_plain_card(self):
        payload = bytes(range(256)) * 20
        self.fast.lan.tap.os_sends([self.gso(self.ipv4_tcp(payload), 1, 1000, 34)])
        self.lab.network.pump()
        segments = self.plain.lan.tap.written[-6:]
        self.assertEqual(len(self.plain.lan.tap.written), 1 + 6)  # the broadcast, then six segments
        for seg in segments:
            self.verify(seg)
        self.assertEqual(b"".join(s[54:] for s in segments), payload)

    def test_plain_frames_gain_a_header_for_the_fast_card(self):
        self.assertEqual(self.fast.lan.tap.written, [b"\0" * 10 + frame(BROADCAST, mac(2), b"hi")])

    def test_bad_header_is_dropped_where_it_enters(self):
        """Not relayed to any card, offload or not: headers are checked at the hub's ingress."""
        other_fast = self.lab.card(3, offload=True)
        self.fast.lan.tap.os_sends([b"\x40" + b"\0" * 9 + frame(BROADCAST, mac(1)),
                                    self.gso(self.ipv4_tcp(b"z" * 60000), 1, 1, 34)])
        self.lab.network.pump()
        self.assertEqual(len(self.plain.lan.tap.written), 1)  # only the broadcast of setUp
        self.assertEqual(other_fast.lan.tap.written, [])
        self.assertEqual(self.lab.hub.describe_macs()["DEFAULT"]["counters"]["bad_headers"], 2)

    def test_card_converts_when_the_hub_does_not_offer_offload(self):
        from sevpn.card import Card

        original = Card.hello

        def hello(card):
            # a feature this hub does not know, instead of offload
            return dataclasses.replace(original(card), features=frozenset(["vnet-hdr-from-the-future"]))

        self.patch(Card, "hello", hello)
        lab = Lab(self)
        fast, plain = lab.card(1, offload=True), lab.card(2)
        self.assertEqual(fast.session.port.mac_offset, 0)  # the card converts to and from its TAP
        payload = b"q" * 3000
        fast.lan.tap.os_sends([self.gso(self.ipv4_tcp(payload), 1, 1000, 34)])
        plain.lan.tap.os_sends([frame(mac(1), mac(2), b"back")])
        lab.network.pump()
        self.assertEqual(b"".join(s[54:] for s in plain.lan.tap.written), payload)
        self.assertEqual(fast.lan.tap.written, [b"\0" * 10 + frame(mac(1), mac(2), b"back")])


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
        self.a.lan.tap.os_sends([frame(BROADCAST, mac(1), b"meanwhile")])
        self.lab.network.pump()
        self.assertEqual(payloads(self.b.lan.tap), [b"meanwhile"])
        d, f, args = self.checks.pop()
        d.callback(f(*args))
        self.lab.network.pump()
        self.assertTrue(c.lan.tap.carrier)

    def test_card_leaves_during_the_password_check(self):
        self.lab.card(3)
        self.lab.network.cut()
        d, f, args = self.checks.pop()
        d.callback(f(*args))
        self.assertEqual(sorted(s.user for s in self.lab.hub.sessions.values()), ["u1", "u2"])


class Policies(SynchronousTestCase):
    """A user's own limits, applied to their session's port."""

    def setUp(self):
        self.lab = Lab(self)

    def set_policy(self, user, **policy):
        import os

        from sevpn.files import write_json

        path = os.path.join(self.lab.state_dir, "hubs", "DEFAULT", "users.json")
        users = dict(self.lab.state.users("DEFAULT"))
        users[user] = dict(users[user], policy=policy)
        write_json(path, {"users": users})
        self.lab.hub.policies_changed()

    def test_rate_toward_a_user(self):
        a, b = self.lab.card(1), self.lab.card(2)
        self.set_policy("u2", rate_out=8 * 200_000)  # 200 kB/s toward u2
        big = [frame(mac(2), mac(1), bytes([i]) * 1400) for i in range(50)]
        for _ in range(20):  # 1.4 MB in a second
            a.lan.tap.os_sends(big)
            self.lab.network.run(0.05)
        got = sum(len(f) for f in b.lan.tap.written)
        self.assertLess(got, 200_000 * 1.0 + 2 * 65600 + 50_000)
        self.assertGreater(got, 100_000)
        [info] = [s for s in self.lab.hub.describe_sessions() if s["user"] == "u2"]
        self.assertGreater(info["rate_drops"], 0)

    def test_rate_from_a_user(self):
        a, b = self.lab.card(1), self.lab.card(2)
        self.set_policy("u1", rate_in=8 * 100_000)
        for _ in range(20):
            a.lan.tap.os_sends([frame(mac(2), mac(1), b"y" * 1400)] * 50)
            self.lab.network.run(0.05)
        self.assertLess(sum(len(f) for f in b.lan.tap.written), 100_000 + 2 * 65600 + 50_000)

    def test_storm_control(self):
        a, b = self.lab.card(1), self.lab.card(2)
        self.set_policy("u1", broadcast_pps=100)
        for _ in range(10):  # 1,000 broadcasts a second for a second
            a.lan.tap.os_sends([frame(BROADCAST, mac(1), b"storm")] * 100)
            self.lab.network.run(0.1)
        a.lan.tap.os_sends([frame(mac(2), mac(1), b"unicast goes through")])
        self.lab.network.pump()
        storm = [p for p in payloads(b.lan.tap) if p == b"storm"]
        self.assertLessEqual(len(storm), 100 + 10 + 10)
        self.assertEqual(payloads(b.lan.tap)[-1], b"unicast goes through")
        self.assertGreater(self.lab.hub.describe_macs()["DEFAULT"]["counters"]["storm_drops"], 800)

    def test_no_policy_no_limit(self):
        a, b = self.lab.card(1), self.lab.card(2)
        for _ in range(10):
            a.lan.tap.os_sends([frame(BROADCAST, mac(1), b"x" * 1400)] * 100)
            self.lab.network.run(0.01)
        self.assertEqual(len(b.lan.tap.written), 1000)


class SessionBounds(SynchronousTestCase):
    """How many sessions a hub holds, and a MAC table with room for every one of them."""

    def test_a_hub_holds_max_sessions_and_turns_the_next_away_as_full(self):
        lab = Lab(self)
        lab.hub.max_sessions = 3
        cards = [lab.card(n) for n in range(1, 5)]
        lab.network.run(2)
        # the fourth is told the hub is full, and tries again later
        self.assertEqual([c.state for c in cards], [card_states.CONNECTED] * 3 + [card_states.CONNECTING])
        self.assertEqual(len(lab.hub.sessions), 3)

    def test_the_mac_table_has_room_for_every_session(self):
        from sevpn.hub import Hub
        from sevpn.switch import DEFAULT_MAX_ENTRIES

        from twisted.internet.task import Clock

        hub = Hub(None, Clock(), max_sessions=10000)
        self.assertEqual(hub.vhub("DEFAULT").max_entries, 20000)
        self.assertEqual(Hub(None, Clock(), max_sessions=10).vhub("DEFAULT").max_entries, DEFAULT_MAX_ENTRIES)
