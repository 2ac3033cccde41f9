"""
The hostile suite: what an unauthenticated peer or a logged-in user who
lies can do to a hub, and that it costs only them.

One test per finding of the hostile review, and a stateful test that drives
a hub with random interleavings of honest traffic and hostile messages,
checking after every step that the honest cards still receive every frame
meant for them, once and in order.
"""

import json
import struct

from hypothesis import HealthCheck, Phase, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from sevpn import card as card_states
from sevpn import wire
from sevpn.hub import Hub
from sevpn.hublink import HubLinkFactory
from tests.support import BROADCAST, Lab, RawFactory, frame, mac, payloads


def raw_connection(lab, host="198.51.100.66"):
    factory = RawFactory()
    lab.network.connect(factory, host=host)
    return lab.network.connections[-1], factory.protocols[-1]


class Findings(SynchronousTestCase):
    """Each finding of the review, as a user would check it."""

    def setUp(self):
        self.lab = Lab(self)
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def lines(self):
        return [formatEvent(e) for e in self.logged]

    def three_cards(self):
        cards = [self.lab.card(i) for i in (1, 2, 3)]
        for i, card in enumerate(cards, 1):
            card.lan.tap.os_sends([frame(BROADCAST, mac(i), b"hello")])
            self.lab.network.pump()
        return cards

    def test_1_frame_numbers_past_2_64_cost_only_that_link(self):
        a, b, c = self.three_cards()
        conn_c = [conn for conn in self.lab.network.connections if conn.client.card is c][0]
        conn_c.ct.write(wire.encode_data(2**64 - 1, 0, wire.encode_frames([frame(BROADCAST, mac(3))] * 2)))
        self.lab.network.pump()
        self.assertFalse(conn_c.alive)
        self.assertTrue(any("outside 1..2^64-1" in line for line in self.lines()))
        for n in range(5):
            a.lan.tap.os_sends([frame(BROADCAST, mac(1), b"a%d" % n)])
            b.lan.tap.os_sends([frame(mac(1), mac(2), b"b%d" % n)])
            self.lab.network.pump()
        self.assertEqual(payloads(b.lan.tap)[-5:], [b"a%d" % n for n in range(5)])
        self.assertEqual(payloads(a.lan.tap)[-5:], [b"b%d" % n for n in range(5)])
        self.assertEqual(c.state, card_states.CONNECTED)  # c itself resumed on a new link
        self.assertEqual(self.lab.hub.describe_macs()["DEFAULT"]["counters"]["port_failures"], 0)

    def test_3_no_megabyte_before_login(self):
        conn, peer = raw_connection(self.lab)
        conn.ct.write(struct.pack("!IB", 1 << 20, wire.HELLO) + b"x" * 4096)
        self.lab.network.pump()
        self.assertIsNotNone(peer.lost)
        self.assertLessEqual(conn.server.decoder.pending(), wire.MAX_HELLO)

    def test_4_parallel_guesses_do_not_all_get_a_check(self):
        from twisted.internet.defer import Deferred

        self.lab.user("alice", "right")
        checks = []

        def verify(f, *args):
            d = Deferred()
            checks.append((d, f, args))
            return d

        self.lab.hub.verify = verify
        guessers = [self.lab.card(10 + i, user="alice", password=f"guess{i}", host="198.51.100.66")
                    for i in range(20)]
        self.assertTrue(0 < len(checks) <= self.lab.hub.guard.allowed, len(checks))
        for d, f, args in checks:
            d.callback(f(*args))
        self.lab.network.pump()
        self.assertTrue(all(g.state != card_states.CONNECTED for g in guessers))
        # alice from elsewhere, and bob from the guesser's own address, still log in
        self.lab.hub.verify = __import__("twisted.internet.defer", fromlist=["maybeDeferred"]).maybeDeferred
        self.assertEqual(self.lab.card(1, user="alice", password="right", host="203.0.113.5").state,
                         card_states.CONNECTED)
        self.assertEqual(self.lab.card(2, user="bob", host="198.51.100.66").state, card_states.CONNECTED)

    def test_4_refusals_say_nothing_of_accounts_or_hubs(self):
        self.lab.user("alice", "right")
        answers = set()
        for i, (user, hub) in enumerate([("alice", "DEFAULT"), ("nobody", "DEFAULT"), ("alice", "NOWHERE")]):
            card = self.lab.card(20 + i, user=user, password="wrong", hub=hub, host=f"203.0.113.{20 + i}")
            answers.add(card.last_error)
        self.assertEqual(answers, {"the hub refused the connection: the user name or password is wrong"})

    def test_5_one_card_cannot_own_the_switch(self):
        a, b, c = self.three_cards()
        # 4,300 spoofed source MACs from one session
        spoofed = [frame(BROADCAST, bytes([2, 0xEE, 0, 0, i >> 8, i & 0xFF]), b"spoof") for i in range(4300)]
        for at in range(0, len(spoofed), 100):
            a.lan.tap.os_sends(spoofed[at:at + 100])
            self.lab.network.pump()
        counters = self.lab.hub.describe_macs()["DEFAULT"]["counters"]
        self.assertGreater(counters["mac_limit_drops"], 4000)
        [info_a] = [s for s in self.lab.hub.describe_sessions() if s["user"] == "u1"]
        self.assertLessEqual(info_a["macs"], self.lab.hub.max_macs_per_session)
        # a new card is learned, and unicast to it goes to it alone
        d = self.lab.card(4)
        d.lan.tap.os_sends([frame(BROADCAST, mac(4), b"new")])
        self.lab.network.pump()
        before = len(a.lan.tap.written)
        b.lan.tap.os_sends([frame(mac(4), mac(2), b"for d")])
        self.lab.network.pump()
        self.assertEqual(payloads(d.lan.tap)[-1], b"for d")
        self.assertEqual(len(a.lan.tap.written), before)  # not flooded to the attacker
        # and a frame from another card's MAC does not steal its traffic
        a.lan.tap.os_sends([frame(BROADCAST, mac(2), b"I am b")])
        self.lab.network.pump()
        c.lan.tap.os_sends([frame(mac(2), mac(3), b"for b")])
        self.lab.network.pump()
        self.assertEqual(payloads(b.lan.tap)[-1], b"for b")
        self.assertNotIn(b"for b", payloads(a.lan.tap))

    def test_7_held_sessions_draw_from_one_budget(self):
        lab = Lab(self, buffer_limit=64 << 20)
        lab.hub.budget.limit = 4 << 20
        talker = lab.card(1)
        held = [lab.card(i) for i in range(2, 10)]
        for card in held:
            card.lan.tap.os_sends([frame(BROADCAST, mac(held.index(card) + 2))])
            lab.network.pump()
        # eight cards gone without a goodbye: their sessions are held
        for card in held:
            [conn] = [c for c in lab.network.connections if c.client.card is card]
            lab.network.up = False
            from twisted.internet.error import ConnectionLost
            from twisted.python.failure import Failure

            conn.close(Failure(ConnectionLost("gone")))
            card.disconnect()
            lab.network.up = True
        self.assertEqual(sum(1 for s in lab.hub.describe_sessions() if s["state"] == "held"), 8)
        chunk = [frame(BROADCAST, mac(1), b"x" * 1400)] * 64
        for _ in range(40 * 12):  # ~40 MiB of broadcast
            talker.lan.tap.os_sends(chunk)
            lab.network.pump()
        self.assertLessEqual(lab.hub.budget.used, lab.hub.budget.limit)
        self.assertGreater(lab.hub.budget.reclaimed, 0)
        self.assertEqual(talker.state, card_states.CONNECTED)

    def test_7_sessions_per_user(self):
        cards = [self.lab.card(10 + i, user="u1") for i in range(self.lab.hub.max_sessions_per_user + 2)]
        states = [c.state for c in cards]
        self.assertEqual(states.count(card_states.CONNECTED), self.lab.hub.max_sessions_per_user)
        self.assertIn("this user has reached its session limit", cards[-1].last_error)
        self.assertEqual(cards[-1].state, card_states.CONNECTING)  # retried later, not refused for good

    def test_8_a_full_hub_says_so(self):
        self.lab.hub.max_sessions = 1
        self.lab.card(1)
        card = self.lab.card(2)
        self.assertIn("the hub has reached its session limit", card.last_error)

    def test_8_untrusted_strings_are_quoted_in_the_log(self):
        conn, peer = raw_connection(self.lab)
        evil = {"hub": "DEFAULT", "user": "x\n2026-01-01 [sevpn.hub.Hub#info] admin joined\x1b[31m" * 200,
                "password": "p"}
        conn.ct.write(wire.encode(wire.HELLO, wire.MAGIC + b"\x01" + json.dumps(evil).encode()))
        self.lab.network.pump()
        self.assertIn(b"bad-hello", peer.received)
        text = "\n".join(self.lines())
        self.assertNotIn("\x1b", text)
        self.assertNotIn("admin joined", text)

    def test_8_resume_point_checked_before_the_welcome(self):
        a = self.lab.card(1)
        session = self.lab.hub.sessions[a.status()["session"]]
        token = self.lab.hub.welcome(session, False).token
        conn, peer = raw_connection(self.lab)
        hello = wire.Hello("DEFAULT", "u1", "secret", None, frozenset(), wire.Resume(session.id, token, 10**9))
        conn.ct.write(hello.encode())
        self.lab.network.pump()
        self.assertIn(b"bad-hello", peer.received)
        self.assertNotIn(b'"resumed"', peer.received)  # no welcome went out
        self.assertEqual(a.state, card_states.CONNECTED)


class Interleavings(RuleBasedStateMachine):
    """
    Honest cards send numbered frames while a hostile session and hostile
    strangers send whatever they like; after every step every honest card
    has received exactly the honest frames meant for it, in order.
    """

    def __init__(self):
        super().__init__()
        self._cleanups = []
        self.lab = Lab(self)
        self.honest = {i: self.lab.card(i) for i in (1, 2, 3)}
        self.liar = self.lab.card(9, offload=True)
        for i, card in self.honest.items():
            card.lan.tap.os_sends([frame(BROADCAST, mac(i), b"H-hello")])
            self.lab.network.pump()
        for card in self.honest.values():
            card.lan.tap.written.clear()
        self.expected = {i: [] for i in self.honest}
        self.n = 0

    def liar_connection(self):
        for conn in self.lab.network.connections:
            if getattr(conn.client, "card", None) is self.liar and conn.alive:
                return conn
        return None

    @rule(src=st.sampled_from([1, 2, 3]), dst=st.sampled_from([0, 1, 2, 3]), count=st.integers(1, 5))
    def honest_frames(self, src, dst, count):
        frames = []
        for _ in range(count):
            self.n += 1
            payload = b"H%06d" % self.n
            if dst == 0 or dst == src:
                frames.append(frame(BROADCAST, mac(src), payload))
                for i in self.honest:
                    if i != src:
                        self.expected[i].append(payload)
            else:
                frames.append(frame(mac(dst), mac(src), payload))
                self.expected[dst].append(payload)
        self.honest[src].lan.tap.os_sends(frames)

    @rule(first=st.sampled_from([0, 1, 2**63, 2**64 - 2, 2**64 - 1]),
          ack=st.one_of(st.just(0), st.integers(0, 2**64 - 1)),
          srcs=st.lists(st.sampled_from([1, 2, 3, 9, 0xEE]), min_size=1, max_size=4),
          header=st.sampled_from([b"\0" * 10, b"\x40" + b"\0" * 9, bytes([1, 1, 54, 0, 1, 0, 34, 0, 16, 0])]))
    def liar_data(self, first, ack, srcs, header):
        conn = self.liar_connection()
        if conn is None:
            return
        frames = [header + frame(BROADCAST if s % 2 else mac(1), mac(s), b"L-lie") for s in srcs]
        conn.ct.write(wire.encode_data(first, ack, wire.encode_frames(frames)))

    @rule(kind=st.sampled_from([wire.ACK, wire.NULL, wire.HELLO, wire.GOODBYE, wire.WELCOME, 99]),
          body=st.binary(max_size=40))
    def liar_message(self, kind, body):
        conn = self.liar_connection()
        if conn is not None:
            conn.ct.write(struct.pack("!IB", len(body), kind) + body)

    @rule(data=st.binary(max_size=200))
    def stranger(self, data):
        conn, _ = raw_connection(self.lab)
        conn.ct.write(data)

    @rule(obj=st.dictionaries(st.sampled_from(["hub", "user", "password", "mac", "features", "resume"]),
                              st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20),
                                        st.lists(st.integers(), max_size=3)), max_size=6))
    def stranger_hello(self, obj):
        conn, _ = raw_connection(self.lab, host="198.51.100.67")
        conn.ct.write(wire.encode(wire.HELLO, wire.MAGIC + b"\x01" + json.dumps(obj).encode()))

    @rule(seconds=st.sampled_from([0.05, 0.5, 3.0]))
    def time_passes(self, seconds):
        self.lab.network.run(seconds, step=0.05)

    @invariant()
    def honest_frames_arrive_once_in_order(self):
        self.lab.network.pump()
        for i, card in self.honest.items():
            got = [p[:7] for p in payloads(card.lan.tap) if p.startswith(b"H")]
            assert got == self.expected[i], (i, got[-5:], self.expected[i][-5:])
            assert card.state == card_states.CONNECTED, card.state

    def addCleanup(self, f, *args, **kw):
        self._cleanups.append((f, args, kw))

    def teardown(self):
        for f, args, kw in reversed(self._cleanups):
            f(*args, **kw)


class InterleavingsInMemory(SynchronousTestCase):
    def test_random_interleavings(self):
        run_state_machine_as_test(Interleavings, settings=settings(
            max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck),
        ))


class HubRestartIsFresh(SynchronousTestCase):
    def test_a_new_hub_knows_no_tokens(self):
        lab = Lab(self)
        a = lab.card(1)
        old = a.status()["session"]
        lab.network.cut()
        hub = Hub(lab.state, lab.clock)
        lab.network.server_factory = HubLinkFactory(hub, lab.clock, lab.keepalive)
        lab.network.restore()
        lab.network.run(3)
        self.assertNotEqual(a.status()["session"], old)


class InterleavingsOverTLS(SynchronousTestCase):
    """
    The same game against a real hub process over loopback TLS: honest
    cards and a lying one are blocking wire-protocol clients, strangers
    come from other loopback addresses.
    """

    timeout = 600

    def setUp(self):
        import os
        import shutil
        import signal
        import socket
        import subprocess
        import sys
        import tempfile

        from scripts.netns import BIN, env, wait_for
        from sevpn.users import HubState

        self.dir = tempfile.mkdtemp(prefix="sevpn-hostile-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        state = HubState(os.path.join(self.dir, "hub"))
        for user in ("u1", "u2", "u3", "mallory"):
            state.add_user("DEFAULT", user, b"pw")
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.hub = subprocess.Popen(
            [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "sevpn-hub", "--state-dir", state.state_dir,
             "--listen", f"tcp:{self.port}:interface=127.0.0.1", "--max-sessions-per-user", "1000"],
            stdout=open(os.path.join(self.dir, "hub.log"), "wb"), stderr=subprocess.STDOUT, env=env(),
            start_new_session=True,
        )
        self.addCleanup(lambda: (os.killpg(self.hub.pid, signal.SIGKILL), self.hub.wait()))
        wait_for(lambda: os.path.exists(os.path.join(state.state_dir, "control.sock")), 30, "the hub to start")
        self.ca = os.path.join(state.state_dir, "ca.pem")
        _ = sys

    def test_random_interleavings(self):
        test = self

        class OverTLS(RuleBasedStateMachine):
            def __init__(self):
                super().__init__()
                from tests.support import BlockingCard

                self.honest = {i: BlockingCard("127.0.0.1", test.port, test.ca, f"u{i}", "pw", mac(i))
                               for i in (1, 2, 3)}
                self.liars = 0
                self.liar = self.new_liar()
                for i, card in self.honest.items():
                    card.send([frame(BROADCAST, mac(i), b"H-hello")])
                for card in self.honest.values():
                    card.receive(0.2)
                    card.received.clear()
                self.expected = {i: [] for i in self.honest}
                self.n = 0
                self.strangers = []

            def new_liar(self):
                from tests.support import BlockingCard

                self.liars += 1  # each from its own address: the login guard is not what is tested here
                return BlockingCard("127.0.0.1", test.port, test.ca, "mallory", "pw", mac(9),
                                    source=f"127.1.{self.liars // 250}.{self.liars % 250 + 1}")

            @rule(src=st.sampled_from([1, 2, 3]), dst=st.sampled_from([0, 1, 2, 3]), count=st.integers(1, 4))
            def honest_frames(self, src, dst, count):
                frames = []
                for _ in range(count):
                    self.n += 1
                    payload = b"H%06d" % self.n
                    if dst in (0, src):
                        frames.append(frame(BROADCAST, mac(src), payload))
                        for i in self.honest:
                            if i != src:
                                self.expected[i].append(payload)
                    else:
                        frames.append(frame(mac(dst), mac(src), payload))
                        self.expected[dst].append(payload)
                self.honest[src].send(frames)

            @rule(first=st.sampled_from([None, None, 2**64 - 1, 2**64 - 1, 0]),
                  srcs=st.lists(st.sampled_from([1, 2, 9, 0xEE]), min_size=1, max_size=3))
            def liar_data(self, first, srcs):
                frames = [frame(BROADCAST if s % 2 else mac(1), mac(s), b"L-lie") for s in srcs]
                for _ in range(2):
                    try:
                        if first is None:
                            self.liar.send(frames)
                        else:
                            self.liar.sock.sendall(wire.encode_data(first, 0, wire.encode_frames(frames)))
                        return
                    except OSError:  # the hub dropped the liar: it logs in again
                        self.liar.close()
                        self.liar = self.new_liar()

            @rule(data=st.binary(min_size=1, max_size=100), tls=st.booleans(), last=st.integers(2, 250))
            def stranger(self, data, tls, last):
                import socket
                import ssl

                try:
                    sock = socket.create_connection(("127.0.0.1", test.port), timeout=2,
                                                    source_address=(f"127.0.0.{last}", 0))
                    if tls:
                        sock = ssl.create_default_context(cafile=test.ca).wrap_socket(sock, server_hostname="localhost")
                    sock.sendall(data)
                    self.strangers.append(sock)
                except OSError:
                    pass  # turned away: that is allowed

            @invariant()
            def honest_frames_arrive_once_in_order(self):
                import time

                deadline = time.monotonic() + 3
                for i, card in self.honest.items():
                    while True:
                        card.receive(0.02)
                        got = [p[14:21] for p in card.received if p[14:15] == b"H"]
                        if len(got) >= len(self.expected[i]) or time.monotonic() > deadline:
                            break
                    assert got == self.expected[i], (i, got[-5:], self.expected[i][-5:])

            def teardown(self):
                import time

                for card in list(self.honest.values()) + [self.liar]:
                    card.close()
                for sock in self.strangers:
                    sock.close()
                time.sleep(0.3)  # the goodbyes are in before the next example's cards say hello

        # A real process and real time: an example does not replay exactly, so no shrinking.
        run_state_machine_as_test(OverTLS, settings=settings(
            max_examples=8, stateful_step_count=16, deadline=None, suppress_health_check=list(HealthCheck),
            phases=[Phase.generate], database=None,
        ))
