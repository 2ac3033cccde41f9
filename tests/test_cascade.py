"""
Cascades between hubs through in-memory links on a fake clock: frames
both ways, MACs behind a cascade, the remote side's policy, zero-loss
resumption, files picked up live, and loops found and broken.
"""

from __future__ import annotations

import os
import stat

from twisted.internet.error import ConnectionLost
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from sevpn import card as card_states
from sevpn import loops
from sevpn.cascade import CascadeConfig, CascadeStore
from sevpn.users import StateError
from tests.support import BROADCAST, Sites, frame, mac, payloads

SETTLE = loops.HOLD + 2 * loops.PROBE_INTERVAL


class LogCapture:
    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self):
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events]

    def count(self, fragment):
        return sum(1 for line in self.lines() if fragment in line)


def cascade_sessions(lab):
    return [s for s in lab.hub.describe_sessions() if s["kind"] == "cascade"]


def cascade_port(lab, name):
    [port] = [p for p in lab.hub.vhub("DEFAULT").ports if p.name == f"cascade:{name}"]
    return port


class TwoSites(SynchronousTestCase):
    def setUp(self):
        self.sites = Sites(self)
        self.a1 = self.sites["A"].card(1)
        self.b1 = self.sites["B"].card(2)

    def test_frames_cross_both_ways_and_macs_are_learned_on_the_cascade(self):
        cascade = self.sites.cascade("ab", "A", "B")
        self.sites.run(SETTLE)
        self.assertEqual(cascade.describe()["loop_state"], loops.FORWARDING)
        self.a1.lan.tap.os_sends([frame(BROADCAST, mac(1), b"who has?")])
        self.sites.pump()
        self.assertEqual(payloads(self.b1.lan.tap), [b"who has?"])
        self.b1.lan.tap.os_sends([frame(mac(1), mac(2), b"i have")])
        self.sites.pump()
        self.assertEqual(payloads(self.a1.lan.tap), [b"i have"])
        # each hub learned the other site's MAC on the cascade's port
        [remote] = cascade_sessions(self.sites["B"])
        self.assertEqual(self.sites["B"].hub.vhub("DEFAULT").lookup(mac(1)).name, remote["id"])
        self.assertEqual(self.sites["A"].hub.vhub("DEFAULT").lookup(mac(2)).name, "cascade:ab")
        status = cascade.describe()
        self.assertEqual((status["state"], status["id"]), (card_states.CONNECTED, remote["id"]))
        self.assertEqual(remote["kind"], "cascade")
        self.assertEqual(remote["loop_state"], loops.FORWARDING)

    def test_a_new_cascade_forwards_only_after_listening(self):
        cascade = self.sites.cascade("ab", "A", "B")
        self.assertEqual(cascade.describe()["loop_state"], loops.LISTENING)
        self.a1.lan.tap.os_sends([frame(BROADCAST, mac(1), b"too early")])
        self.sites.pump()
        self.assertEqual(payloads(self.b1.lan.tap), [])
        self.sites.run(SETTLE)
        self.a1.lan.tap.os_sends([frame(BROADCAST, mac(1), b"now")])
        self.sites.pump()
        self.assertEqual(payloads(self.b1.lan.tap), [b"now"])

    def test_a_whole_lan_behind_a_cascade(self):
        """More MACs than a card may own live behind the cascade, on both hubs."""
        self.sites.cascade("ab", "A", "B")
        self.sites.run(SETTLE)
        # a bridged LAN of 40 stations behind card 1
        self.sites["A"].hub.sessions[self.a1.session.id].port.max_macs = 64
        self.a1.lan.tap.os_sends([frame(BROADCAST, mac(100 + i), b"hello") for i in range(40)])
        self.sites.pump()
        self.assertEqual(len(payloads(self.b1.lan.tap)), 40)
        [remote] = cascade_sessions(self.sites["B"])
        self.assertEqual(remote["macs"], 40)
        self.assertEqual(self.sites["B"].hub.describe_macs()["DEFAULT"]["counters"]["mac_limit_drops"], 0)

    def test_the_remote_operator_may_limit_a_cascades_macs(self):
        self.sites.cascade("ab", "A", "B", max_macs=5)
        self.sites.run(SETTLE)
        self.sites["A"].hub.sessions[self.a1.session.id].port.max_macs = 64
        self.a1.lan.tap.os_sends([frame(BROADCAST, mac(100 + i), b"hello") for i in range(8)])
        self.sites.pump()
        self.assertEqual(len(payloads(self.b1.lan.tap)), 5)
        self.assertEqual(self.sites["B"].hub.describe_macs()["DEFAULT"]["counters"]["mac_limit_drops"], 3)

    def test_only_cascade_users_may_cascade(self):
        log = LogCapture(self)
        cascade = self.sites.cascade("ab", "A", "B", allowed=False)
        status = cascade.describe()
        self.assertEqual(status["state"], card_states.REFUSED)
        self.assertIn("may not connect a cascade", status["last_error"])
        self.assertEqual(cascade_sessions(self.sites["B"]), [])
        self.assertEqual(log.count("refused 'from-A-ab' from 192.0.2.1:40001 on virtual hub 'DEFAULT': "
                                   "this user may not connect a cascade"), 1)
        # the remote operator allows it; adding the cascade again retries at once
        self.sites["B"].state.set_cascade_user("DEFAULT", cascade.config.user, True)
        self.sites.managers["A"].reload()
        self.sites.pump()
        self.assertEqual(self.sites.managers["A"].cascades["ab"].describe()["state"], card_states.CONNECTED)

    def test_a_cut_resumes_with_zero_loss(self):
        cascade = self.sites.cascade("ab", "A", "B")
        self.sites.run(SETTLE)
        session = cascade.describe()["id"]
        sent = []

        def send(n):
            batch = [frame(mac(2), mac(1), b"%06d" % (len(sent) + i)) for i in range(n)]
            sent.extend(f[14:] for f in batch)
            self.a1.lan.tap.os_sends(batch)

        self.b1.lan.tap.os_sends([frame(BROADCAST, mac(2), b"here")])
        self.sites.pump()
        send(50)
        self.sites.pump()
        network = self.sites["B"].network
        [conn] = [c for c in network.connections if getattr(c.client, "card", None) is cascade.card]
        send(30)  # written, still in flight when the line goes
        network.up = False
        conn.close(Failure(ConnectionLost("the line was cut")))
        self.assertEqual(cascade.describe()["state"], card_states.RESUMING)
        send(40)  # held while the cascade resumes
        self.sites.run(5)
        network.up = True
        self.sites.run(5)
        status = cascade.describe()
        self.assertEqual((status["state"], status["id"], status["resumes"]), (card_states.CONNECTED, session, 1))
        self.assertEqual(payloads(self.b1.lan.tap, dst=mac(2)), sent)  # each once, in order
        self.assertEqual(status["frames_dropped"], 0)
        [remote] = cascade_sessions(self.sites["B"])
        self.assertEqual(remote["resumes"], 1)
        self.assertEqual(self.b1.state, card_states.CONNECTED)  # its own link was never cut

    def test_cascades_are_read_again_live(self):
        manager = self.sites.managers["A"]
        cascade = self.sites.cascade("ab", "A", "B")
        self.assertEqual(len(cascade_sessions(self.sites["B"])), 1)
        path = os.path.join(self.sites["A"].state_dir, "cascades", "ab.json")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        CascadeStore(self.sites["A"].state_dir).delete("ab")
        manager.reload()
        self.sites.pump()
        self.assertEqual(manager.describe(), [])
        self.assertEqual(cascade.card.state, card_states.DISCONNECTED)
        self.assertEqual(cascade_sessions(self.sites["B"]), [])  # said goodbye: not held
        self.assertEqual([p.name for p in self.sites["A"].hub.vhub("DEFAULT").ports if "cascade" in p.name], [])

    def test_an_unusable_cascade_is_reported_not_fatal(self):
        manager = self.sites.managers["A"]
        store = manager.store
        store.save(CascadeConfig(name="nowhere", hub_name="NOSUCH", to="B:5555", remote_hub="DEFAULT", user="x",
                                 password="pw", ca_file="/nonexistent"))
        os.makedirs(store.directory, exist_ok=True)
        with open(os.path.join(store.directory, "broken.json"), "w") as f:
            f.write('{"name": "broken"}')
        result = manager.reload()
        self.assertIn("damaged", result["errors"]["broken"])
        [row] = result["cascades"]
        self.assertEqual(row["state"], "disconnected")
        self.assertIn("no virtual hub named NOSUCH", row["last_error"])
        self.assertEqual((row["frames_in"], row["resumes"], row["loop_state"]), (0, 0, None))

    def test_config_is_checked(self):
        with self.assertRaises(StateError):
            CascadeConfig(name="x/y", hub_name="DEFAULT", to="B:5555", remote_hub="DEFAULT", user="u",
                          password="p", ca_file="/ca")
        with self.assertRaises(StateError):
            CascadeConfig(name="x", hub_name="DEFAULT", to="B:99999", remote_hub="DEFAULT", user="u",
                          password="p", ca_file="/ca")


class Loops(SynchronousTestCase):
    """Cascades that close a loop: found, logged, one cascade per loop blocked, nothing multiplied."""

    def make(self, names, links):
        self.sites = Sites(self, names=names)
        self.log = LogCapture(self)
        self.cards = {name: self.sites[name].card(i + 1) for i, name in enumerate(names)}
        self.cascades = {}
        for frm, to in links:
            self.cascades[frm + to] = self.sites.cascade(frm + to, frm, to)
        self.sites.run(3 * SETTLE)

    def states(self):
        return sorted(c.describe()["loop_state"] for c in self.cascades.values())

    def crossings(self):
        """Frames carried by all cascades so far (each counted at its sender)."""
        total = 0
        for lab in self.sites.labs.values():
            total += sum(s["frames_out"] for s in cascade_sessions(lab))
        return total + sum(c.describe()["frames_out"] for c in self.cascades.values())

    def assertOneCopyEach(self, sender):
        for card in self.cards.values():
            del card.lan.tap.written[:]
        before = self.crossings()
        conflicts = self.conflicts()
        self.cards[sender].lan.tap.os_sends([frame(BROADCAST, self.cards[sender].mac, b"broadcast")])
        self.sites.pump()  # no time passes: no probes
        for name, card in self.cards.items():
            self.assertEqual(payloads(card.lan.tap), [] if name == sender else [b"broadcast"], name)
        self.assertEqual(self.crossings() - before, len(self.cards) - 1)
        self.assertEqual(self.conflicts(), conflicts)

    def conflicts(self):
        return sum(lab.hub.describe_macs()["DEFAULT"]["counters"]["mac_conflicts"] for lab in self.sites.labs.values())

    def test_two_cascades_between_two_hubs(self):
        self.make(("A", "B"), [("A", "B"), ("B", "A")])
        self.assertEqual(self.states(), [loops.BLOCKED, loops.FORWARDING])
        self.assertGreaterEqual(self.log.count("LOOP on virtual hub DEFAULT"), 1)
        [blocked] = [c for c in self.cascades.values() if c.describe()["loop_state"] == loops.BLOCKED]
        self.assertEqual(blocked.describe()["loops_detected"], 1)
        self.assertEqual(blocked.card.state, card_states.CONNECTED)  # blocked, not dropped
        # the other end of the blocked cascade blocks its session too
        other = "B" if blocked.config.name == "AB" else "A"
        ends = {s["id"]: s["loop_state"] for s in cascade_sessions(self.sites[other])}
        self.assertEqual(ends[blocked.describe()["id"]], loops.BLOCKED_BY_PEER)
        self.assertOneCopyEach("A")
        self.assertOneCopyEach("B")
        # it stays so: no flapping
        self.sites.run(20)
        self.assertEqual(self.states(), [loops.BLOCKED, loops.FORWARDING])
        self.assertEqual(blocked.describe()["loops_detected"], 1)

    def test_a_ring_of_three_hubs(self):
        self.make(("A", "B", "C"), [("A", "B"), ("B", "C"), ("C", "A")])
        self.assertEqual(self.states(), [loops.BLOCKED, loops.FORWARDING, loops.FORWARDING])
        for sender in ("A", "B", "C"):
            self.assertOneCopyEach(sender)

    def test_a_redundant_cascade_is_the_one_blocked(self):
        """An established cascade keeps forwarding when a second one closes a loop."""
        self.make(("A", "B"), [("A", "B")])
        self.cascades["BA"] = self.sites.cascade("BA", "B", "A")
        self.sites.run(SETTLE)
        self.assertEqual(self.cascades["AB"].describe()["loop_state"], loops.FORWARDING)
        self.assertEqual(self.cascades["BA"].describe()["loop_state"], loops.BLOCKED)
        self.assertEqual(self.cascades["AB"].describe()["loops_detected"], 0)

    def test_the_blocked_cascade_takes_over_when_the_loop_is_gone(self):
        self.make(("A", "B"), [("A", "B"), ("B", "A")])
        [forwarding] = [n for n, c in self.cascades.items() if c.describe()["loop_state"] == loops.FORWARDING]
        [blocked] = [n for n, c in self.cascades.items() if c.describe()["loop_state"] == loops.BLOCKED]
        CascadeStore(self.sites[forwarding[0]].state_dir).delete(forwarding)
        self.sites.managers[forwarding[0]].reload()
        del self.cascades[forwarding]
        self.sites.run(SETTLE)
        self.assertEqual(self.cascades[blocked].describe()["loop_state"], loops.FORWARDING)
        self.assertEqual(self.log.count(f"the loop through cascade {blocked} on virtual hub DEFAULT is gone"), 1)
        self.assertOneCopyEach("A")

    def test_a_loop_that_forms_again_is_broken_again(self):
        """
        The forwarding cascade's line goes down for longer than the hold
        time: the blocked one takes over; when the line is back, the loop
        is there again, with both cascades forwarding, and is broken again.
        """
        self.make(("A", "B"), [("A", "B"), ("B", "A")])
        [forwarding] = [c for c in self.cascades.values() if c.describe()["loop_state"] == loops.FORWARDING]
        [blocked] = [c for c in self.cascades.values() if c.describe()["loop_state"] == loops.BLOCKED]
        network = self.sites[forwarding.config.to.split(":")[0]].network
        [conn] = [c for c in network.connections if getattr(c.client, "card", None) is forwarding.card]
        network.up = False
        conn.close(Failure(ConnectionLost("the line was cut")))
        self.sites.run(SETTLE)
        self.assertEqual(blocked.describe()["loop_state"], loops.FORWARDING)
        self.assertEqual(forwarding.card.state, card_states.RESUMING)
        network.up = True
        self.sites.run(3 * SETTLE)
        self.assertEqual(forwarding.describe()["resumes"], 1)
        self.assertEqual(self.states(), [loops.BLOCKED, loops.FORWARDING])
        self.assertGreaterEqual(self.log.count("LOOP on virtual hub DEFAULT"), 2)
        self.assertOneCopyEach("A")
        self.assertOneCopyEach("B")
