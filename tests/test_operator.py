"""
The operator acting on a running hub: a user disabled or deleted, a
virtual hub deleted, a session kicked, a policy changed.  Sessions end at
once, with a goodbye whose reason the card logs; the others go on.

First through in-memory links on a fake clock, then the hub service's
control commands over its real control socket with a card over real TLS.
"""

import os
import shutil
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sevpn import card as card_states
from sevpn import control
from sevpn.files import write_json
from tests.support import BROADCAST, Lab, frame, mac, payloads


class Logged:
    def capture(self):
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def text(self):
        return [formatEvent(e) for e in self.logged]

    def assertLogged(self, fragment):
        self.assertTrue(any(fragment in line for line in self.text()), f"{fragment!r} not in {self.text()[-6:]}")


class UsersChanged(SynchronousTestCase, Logged):
    def setUp(self):
        self.lab = Lab(self)
        self.capture()
        self.a, self.b = self.lab.card(1), self.lab.card(2)
        self.hub = self.lab.hub

    def sessions(self):
        return {s["user"]: s["id"] for s in self.hub.describe_sessions()}

    def test_a_disabled_users_session_ends_with_a_reason(self):
        old = self.sessions()["u1"]
        self.lab.state.set_user("DEFAULT", "u1", disabled=True)
        self.assertIn("u1", self.sessions())  # the file alone changes nothing until the hub is told
        ended, errors = self.hub.users_changed()
        self.assertEqual([(s.id, why) for s, why in ended], [(old, "user u1 was disabled by the operator")])
        self.assertEqual(errors, [])
        self.assertLogged(f"session {old} of u1 on DEFAULT ended: user u1 was disabled by the operator")
        self.lab.network.pump()
        # the card heard why, tried again, and the hub refused it
        self.assertLogged("closed the session (user u1 was disabled by the operator); reconnecting")
        self.assertEqual(self.a.state, card_states.REFUSED)
        self.assertFalse(self.a.lan.tap.carrier)
        self.assertEqual(list(self.sessions()), ["u2"])
        # the other card goes on
        self.b.lan.tap.os_sends([frame(BROADCAST, mac(2), b"still here")])
        self.lab.network.pump()
        self.assertEqual(self.b.state, card_states.CONNECTED)

    def test_enable_again(self):
        self.lab.state.set_user("DEFAULT", "u1", disabled=True)
        self.hub.users_changed()
        self.lab.network.pump()
        self.lab.state.set_user("DEFAULT", "u1", disabled=False)
        self.assertEqual(self.hub.users_changed(), ([], []))
        self.a.connect(self.a.test_account)
        self.lab.network.pump()
        self.assertEqual(self.a.state, card_states.CONNECTED)

    def test_a_deleted_user(self):
        self.lab.state.delete_user("DEFAULT", "u2")
        [(session, why)] = self.hub.users_changed()[0]
        self.assertEqual((session.user, why), ("u2", "user u2 was deleted by the operator"))
        self.lab.network.pump()
        self.assertLogged("closed the session (user u2 was deleted by the operator)")
        self.assertEqual(self.b.state, card_states.REFUSED)

    def test_a_deleted_virtual_hub(self):
        x = self.lab.card(3, hub="LAB")
        self.lab.state.delete_hub("LAB")
        [(session, why)] = self.hub.users_changed()[0]
        self.assertEqual((session.user, why), ("u3", "virtual hub LAB was deleted by the operator"))
        self.lab.network.pump()
        self.assertEqual(x.state, card_states.REFUSED)
        self.assertEqual(sorted(self.sessions()), ["u1", "u2"])

    def test_a_held_session_ends_too(self):
        """A card whose link broke must not come back into a disabled user's session."""
        self.lab.network.cut()
        self.assertEqual({s["state"] for s in self.hub.describe_sessions()}, {"held"})
        self.lab.state.set_user("DEFAULT", "u1", disabled=True)
        [(session, _)] = self.hub.users_changed()[0]
        self.assertEqual(session.user, "u1")
        self.lab.network.restore()
        self.lab.network.run(2)
        self.assertEqual(self.a.state, card_states.REFUSED)
        self.assertEqual(list(self.sessions()), ["u2"])

    def test_policy_reaches_live_sessions(self):
        self.lab.state.set_user("DEFAULT", "u1", max_macs=1, rate_in=10_000_000)
        self.assertEqual(self.hub.users_changed(), ([], []))
        session = self.hub.sessions[self.sessions()["u1"]]
        self.assertEqual(session.port.max_macs, 1)
        self.assertIsNotNone(session.port.in_limit)  # the rate the card may send at
        # the MAC limit holds for what the session sends next: a second source MAC is not let in
        self.a.lan.tap.os_sends([frame(BROADCAST, mac(1), b"one"), frame(BROADCAST, mac(9), b"two")])
        self.lab.network.pump()
        self.assertEqual(payloads(self.b.lan.tap), [b"one"])
        self.assertEqual(self.hub.describe_macs()["DEFAULT"]["counters"]["mac_limit_drops"], 1)

    def test_a_damaged_users_file_leaves_sessions_alone(self):
        write_json(os.path.join(self.lab.state_dir, "hubs", "DEFAULT", "users.json"), {"users": []})
        ended, [error] = self.hub.users_changed()
        self.assertEqual(ended, [])
        self.assertIn("is damaged (it holds no 'users' object)", error)
        self.assertEqual(sorted(self.sessions()), ["u1", "u2"])
        self.assertLogged("cannot apply the users of virtual hub DEFAULT")

    def test_kick(self):
        old = self.sessions()["u1"]
        session = self.hub.kick(old, "maintenance at noon")
        self.assertEqual(session.user, "u1")
        self.assertLogged(f"session {old} of u1 on DEFAULT ended: maintenance at noon")
        self.lab.network.pump()
        self.assertLogged("closed the session (maintenance at noon); reconnecting")
        # a kick is no ban: the card comes back in a fresh session
        self.assertEqual(self.a.state, card_states.CONNECTED)
        self.assertNotEqual(self.sessions()["u1"], old)
        self.assertRaises(KeyError, self.hub.kick, "no-such-session", "x")


def _user_with_cheap_hash(state_dir, user, password):
    from sevpn import users

    write_json(os.path.join(state_dir, "hubs", "DEFAULT", "users.json"),
               {"users": {user: {"password": users.hash_password(password, n=2)}}})


class ControlCommands(TestCase, Logged):
    """The hub service's C{users-changed} and C{kick} on its control socket, a card over real TLS."""

    @inlineCallbacks
    def setUp(self):
        from sevpn.accounts import Account
        from sevpn.card import Card, NicSide
        from sevpn.cardservice import tls_endpoint_for
        from sevpn.hubservice import HubService
        from sevpn.users import HubState
        from tests.support import FakeTap

        self.capture()
        self.dir = tempfile.mkdtemp(prefix="op-operator-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        HubState(self.dir).ensure_default()
        _user_with_cheap_hash(self.dir, "alice", b"pw")
        self.service = HubService(state_dir=self.dir, listen=["tcp:0:interface=127.0.0.1"])
        self.service.startService()
        self.addCleanup(self.service.stopService)
        port = self.service.ports[0].getHost().port
        self.card = Card(reactor, NicSide(FakeTap(reactor)), mac(1), tls_endpoint_for(reactor))
        self.card.connect(Account(name="t", hub=f"127.0.0.1:{port}", user="alice", password="pw",
                                  ca_file=os.path.join(self.dir, "ca.pem")))
        self.addCleanup(self.card.disconnect)
        state = yield self.card.when_settled()
        self.assertEqual(state, "connected")

    def call(self, command, **args):
        return deferToThread(control.call, self.dir, command, **args)

    @inlineCallbacks
    def test_kick_over_the_control_socket(self):
        [session] = (yield self.call("sessions"))
        answer = yield self.call("kick", session=session["id"], reason="operator test")
        self.assertEqual(answer, {"id": session["id"], "hub": "DEFAULT", "user": "alice", "reason": "operator test"})
        with self.assertRaises(control.ControlError) as caught:
            yield self.call("kick", session="deadbeef")
        self.assertEqual(str(caught.exception), "there is no session deadbeef on this hub (see 'sevpn hub sessions')")
        for _ in range(100):
            if any("closed the session (operator test)" in line for line in self.text()):
                break
            yield deferToThread(lambda: None)
        self.assertLogged("closed the session (operator test); reconnecting")
        self.assertEqual((yield self.card.when_settled()), "connected")  # a fresh session
        [again] = (yield self.call("sessions"))
        self.assertNotEqual(again["id"], session["id"])

    @inlineCallbacks
    def test_users_changed_over_the_control_socket(self):
        from sevpn.users import HubState

        [session] = (yield self.call("sessions"))
        HubState(self.dir).set_user("DEFAULT", "alice", disabled=True)
        answer = yield self.call("users-changed")
        self.assertEqual(answer, {"ended": [{"id": session["id"], "hub": "DEFAULT", "user": "alice",
                                             "reason": "user alice was disabled by the operator"}], "errors": []})
        self.assertEqual((yield self.call("sessions")), [])
        state = yield self.card.when_settled()
        self.assertEqual(state, "refused")

    @inlineCallbacks
    def test_status_has_the_version(self):
        from sevpn import __version__

        status = yield self.call("status")
        self.assertEqual(status["version"], __version__)
