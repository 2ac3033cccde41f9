"""
Real TLS on loopback, with the real reactor: the card verifies the hub,
and a goodbye crosses TLS promptly (the link unregisters as the TLS
transport's producer before closing, or TLS would wait for it forever).
"""

import os
import shutil
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from sevpn.accounts import Account
from sevpn.card import Card
from sevpn.services import HubService, tls_endpoint_for
from sevpn.users import HubState
from tests.support import FakeTap, mac


@inlineCallbacks
def eventually(predicate, what, timeout=10.0):
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        yield deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


class RealTLS(TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        HubState(self.dir).add_user("DEFAULT", "alice", b"pw")
        self.service = HubService(state_dir=self.dir, listen=["tcp:0:interface=127.0.0.1"])
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.port = self.service.ports[0].getHost().port
        self.cards = []

    def card(self, ca_file=None, server_name=None):
        card = Card(reactor, FakeTap(), mac(1), tls_endpoint_for(reactor))
        account = Account(name="t", hub=f"127.0.0.1:{self.port}", user="alice", password="pw",
                          ca_file=ca_file or os.path.join(self.dir, "ca.pem"), server_name=server_name)
        card.connect(account)
        self.addCleanup(card.disconnect)
        return card

    @inlineCallbacks
    def test_connect_and_goodbye(self):
        card = self.card()
        yield eventually(lambda: card.state == "connected", "the card to connect")
        self.assertTrue(card.tap.carrier)
        self.assertEqual(len(self.service.hub.sessions), 1)
        done = card.disconnect()
        # the hub ends the session on the goodbye, not after a timeout
        yield eventually(lambda: not self.service.hub.sessions, "the hub to see the goodbye", timeout=2)
        yield eventually(lambda: done.called, "the card's connection to close", timeout=2)

    @inlineCallbacks
    def test_wrong_name_is_refused(self):
        card = self.card(server_name="impostor.example")
        yield eventually(lambda: card.last_error, "a verification error")
        self.assertIn("certificate is not valid for impostor.example", card.last_error)
        self.assertEqual(card.state, "connecting")
        self.assertFalse(card.tap.carrier)
        self.assertEqual(self.service.hub.sessions, {})

    @inlineCallbacks
    def test_other_ca_is_refused(self):
        other = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, other)
        from sevpn.pki import ensure_pki

        ensure_pki(other)
        card = self.card(ca_file=os.path.join(other, "ca.pem"))
        yield eventually(lambda: card.last_error, "a verification error")
        self.assertIn("not signed by the trusted CA", card.last_error)
        self.assertEqual(self.service.hub.sessions, {})
