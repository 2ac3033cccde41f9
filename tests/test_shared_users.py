"""
Two hub nodes sharing their users in one PostgreSQL database, as a
fabric's nodes do: two real hub services on loopback with the same
C{--users postgresql://...}, the real C{sevpn} command on each node, cards
over real TLS, a real server that is stopped and started again.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from scripts.netns import env
from tests import pgcluster
from tests.support import mac


def sevpn(*args, input=None):
    return subprocess.run([sys.executable, "-m", "sevpn.cli", *args], capture_output=True, text=True,
                          input=input, env=env(), timeout=60)


@inlineCallbacks
def waitFor(condition, what, seconds=20.0):
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        yield deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"{what} did not happen within {seconds:g} s")


class TwoNodes(TestCase):
    def setUp(self):
        self.cluster = pgcluster.Cluster()  # its own server: the tests stop it
        self.addCleanup(self.cluster.destroy)
        self.cluster.start()
        self.url = self.cluster.url(self.cluster.database(self))
        self.dir = tempfile.mkdtemp(prefix="sevpn-shared-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.pw = os.path.join(self.dir, "pw")
        with open(self.pw, "w") as f:
            f.write("pw\n")
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)
        self.cards = []

    def start_nodes(self, poll):
        from sevpn.files import StateDir
        from sevpn.hubservice import HubService
        from sevpn.pki import ensure_ca

        # one CA for both nodes, as docs/fabric.md's step 4 has it
        first, second = os.path.join(self.dir, "node1"), os.path.join(self.dir, "node2")
        StateDir(first).create()
        StateDir(second).create()
        ensure_ca(first)
        for name, mode in (("ca.pem", 0o644), ("ca.key", 0o600)):
            shutil.copyfile(os.path.join(first, name), os.path.join(second, name))
            os.chmod(os.path.join(second, name), mode)
        self.nodes = {}
        for n in (1, 2):
            state = os.path.join(self.dir, f"node{n}")
            service = HubService(state_dir=state, listen=["tcp:0:interface=127.0.0.1"], users=self.url,
                                 users_settings={"poll": poll})
            service.startService()
            self.addCleanup(service.stopService)
            self.nodes[n] = service

    def state(self, n):
        return self.nodes[n].state_dir

    def cli(self, n, *args):
        """The sevpn command on node C{n}: its state dir, the shared users."""
        return deferToThread(sevpn, *args, "--users", self.url, "--state-dir", self.state(n))

    @inlineCallbacks
    def card(self, n, user, number, identity=(None, None)):
        """A card logging in on node C{n} (with a password, or a certificate and key); its settled state."""
        from sevpn.accounts import Account
        from sevpn.card import Card, NicSide
        from sevpn.cardservice import tls_endpoint_for
        from tests.support import FakeTap

        port = self.nodes[n].ports[0].getHost().port
        card = Card(reactor, NicSide(FakeTap(reactor)), mac(number), tls_endpoint_for(reactor))
        cert_file, key_file = identity
        card.connect(Account(name=f"c{number}", hub=f"127.0.0.1:{port}", user=user,
                             password=None if cert_file else "pw", cert_file=cert_file, key_file=key_file,
                             ca_file=os.path.join(self.state(n), "ca.pem")))
        self.addCleanup(card.disconnect)
        self.cards.append(card)
        card.settled = yield card.when_settled()
        return card

    def status(self, n):
        return deferToThread(sevpn, "hub", "status", "--json", "--state-dir", self.state(n))

    def lines(self, fragment):
        return [line for line in (formatEvent(e) for e in self.logged) if fragment in line]

    def sessions(self, n):
        return [(s["user"], s["state"]) for s in self.nodes[n].hub.describe_sessions()]

    @inlineCallbacks
    def test_a_change_on_one_node_is_effective_on_the_other(self):
        self.start_nodes(poll=3600)  # no polling within the test: only NOTIFY can be this quick
        r = yield self.cli(2, "hub", "user", "add", "alice", "--password-file", self.pw)
        self.assertEqual(r.returncode, 0, r.stderr)
        on1 = yield self.card(1, "alice", 1)
        self.assertEqual(on1.settled, "connected")  # added through node 2, logs in on node 1
        on2 = yield self.card(2, "alice", 2)
        self.assertEqual(on2.settled, "connected")

        r = yield self.cli(1, "hub", "user", "disable", "alice", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        told = json.loads(r.stdout)
        self.assertEqual((told["user"], told["disabled"]), ("alice", True))
        # node 1 ends its session when the command tells it, or when the database did (whichever came first:
        # "ended" lists it only in the first case)
        self.assertIn(told["ended"], ([], [{"hub": "DEFAULT", "id": told["ended"][0]["id"] if told["ended"] else None,
                                           "user": "alice", "reason": "user alice was disabled by the operator"}]))
        # node 2 heard it from the database: its session ends with a goodbye, and the card is refused
        yield waitFor(lambda: on2.state == "refused", "the refusal of alice's card on node 2", 10)
        self.assertEqual(self.sessions(2), [])
        self.assertEqual(len(self.lines("of alice on DEFAULT ended: user alice was disabled by the operator")), 2)
        yield waitFor(lambda: on1.state == "refused", "the refusal of alice's card on node 1", 10)

        r = yield self.cli(2, "hub", "user", "enable", "alice")
        self.assertEqual(r.returncode, 0, r.stderr)
        again = yield self.card(1, "alice", 3)
        self.assertEqual(again.settled, "connected")
        status = json.loads((yield self.status(1)).stdout)
        self.assertEqual((status["users"]["store"], status["users"]["answering"]), ("postgresql", True))

    @inlineCallbacks
    def test_a_certificate_revoked_on_one_node(self):
        self.start_nodes(poll=3600)
        out = os.path.join(self.dir, "certs")
        os.mkdir(out)
        r = yield self.cli(2, "hub", "user", "add", "bob", "--cert", "--out", out)
        self.assertEqual(r.returncode, 0, r.stderr)
        identity = (os.path.join(out, "bob.pem"), os.path.join(out, "bob.key"))
        on1 = yield self.card(1, "bob", 1, identity)
        self.assertEqual(on1.settled, "connected")  # registered through node 2, logs in on node 1
        [session] = self.nodes[1].hub.describe_sessions()
        self.assertEqual(session["auth"], "certificate")
        r = yield self.cli(2, "hub", "user", "cert", "revoke", "bob")
        self.assertEqual(r.returncode, 0, r.stderr)
        yield waitFor(lambda: on1.state == "refused", "the refusal of bob's card on node 1", 10)
        self.assertEqual(self.sessions(1), [])
        [line] = self.lines("of bob on DEFAULT ended: the certificate")
        self.assertIn(f"the certificate {session['certificate']} of user bob was revoked by the operator", line)

    @inlineCallbacks
    def test_a_database_outage(self):
        self.start_nodes(poll=0.5)
        for user in ("bob", "eve"):
            r = yield self.cli(1, "hub", "user", "add", user, "--password-file", self.pw)
            self.assertEqual(r.returncode, 0, r.stderr)
        yield waitFor(lambda: "bob" in self.nodes[1].user_store.users("DEFAULT"), "node 1's copy of bob")
        r = yield self.cli(2, "hub", "user", "disable", "eve")
        self.assertEqual(r.returncode, 0, r.stderr)
        yield waitFor(lambda: self.nodes[1].user_store.users("DEFAULT")["eve"].get("disabled"), "eve disabled")

        yield deferToThread(self.cluster.stop)
        yield waitFor(lambda: len(self.lines("does not answer")) == 2, "one outage sentence from each node")
        [line] = [line for line in self.lines("does not answer")][:1]
        self.assertIn(f"the user database postgresql://postgres@{self.cluster.dir}/", line)
        self.assertIn("logins use this node's copy of the users", line)

        known = yield self.card(1, "bob", 1)
        self.assertEqual(known.settled, "connected")  # from node 1's copy
        unknown = yield self.card(1, "mallory", 2)
        self.assertEqual(unknown.settled, "refused")
        disabled = yield self.card(1, "eve", 3)
        self.assertEqual(disabled.settled, "refused")  # the copy's flag holds
        again = yield self.card(2, "bob", 4)
        self.assertEqual(again.settled, "connected")
        self.assertEqual(len(self.lines("does not answer")), 2)  # not one per login

        r = yield self.cli(2, "hub", "user", "add", "carol", "--password-file", self.pw)
        self.assertEqual(r.returncode, 1)
        self.assertTrue(r.stderr.startswith("sevpn: cannot change the users: the user database postgresql://"),
                        r.stderr)
        self.assertIn("does not answer (", r.stderr)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1)
        status = json.loads((yield self.status(1)).stdout)
        self.assertEqual(status["users"]["answering"], False)

        yield deferToThread(self.cluster.start)
        yield waitFor(lambda: len(self.lines("answers again")) == 2, "both nodes finding the database back")
        r = yield self.cli(2, "hub", "user", "add", "carol", "--password-file", self.pw)
        self.assertEqual(r.returncode, 0, r.stderr)
        carol = yield self.card(1, "carol", 5)
        self.assertEqual(carol.settled, "connected")
        self.assertEqual([state for user, state in self.sessions(1) if user == "bob"], ["connected"])
