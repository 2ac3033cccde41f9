"""
Real TLS on loopback, with the real reactor: the card verifies the hub,
and a goodbye crosses TLS promptly (the link unregisters as the TLS
transport's producer before closing, or TLS would wait for it forever).
"""

import os
import shutil
import socket
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from sevpn.accounts import Account
from sevpn.card import Card, NicSide
from sevpn.cardservice import tls_endpoint_for
from sevpn.hubservice import HubService
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
        card = Card(reactor, NicSide(FakeTap(reactor)), mac(1), tls_endpoint_for(reactor))
        account = Account(name="t", hub=f"127.0.0.1:{self.port}", user="alice", password="pw",
                          ca_file=ca_file or os.path.join(self.dir, "ca.pem"), server_name=server_name)
        card.connect(account)
        self.addCleanup(card.disconnect)
        return card

    @inlineCallbacks
    def test_connect_and_goodbye(self):
        card = self.card()
        yield eventually(lambda: card.state == "connected", "the card to connect")
        self.assertTrue(card.lan.tap.carrier)
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
        self.assertFalse(card.lan.tap.carrier)
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



class _Collector(Protocol):
    """Writes C{payload} in C{pieces} on connecting; collects what arrives."""

    def __init__(self, payload=b"", pieces=(), expect=0):
        self.payload, self.pieces, self.expect = payload, pieces, expect
        self.received = []
        self.done = Deferred()
        self.lost = Deferred()

    def connectionLost(self, reason):
        self.lost.callback(None)

    def connectionMade(self):
        # a small socket buffer: most writes are only partly taken at once
        self.transport.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
        at = 0
        for size in self.pieces:
            self.transport.write(self.payload[at:at + size])
            at += size

    def dataReceived(self, data):
        self.received.append(data)
        if sum(map(len, self.received)) >= self.expect and not self.done.called:
            self.done.callback(b"".join(self.received))


class LinkTLSStream(TestCase):
    """
    The link's TLS transport carries every byte in order, whatever the
    write sizes: records gathered in one pass, writes larger than its
    scratch space, and what the socket could not take at once.
    """

    @inlineCallbacks
    def test_bytes_cross_intact_both_ways(self):
        from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
        from twisted.internet.protocol import Factory

        from sevpn import tls, wire
        from sevpn.pki import client_tls_options, ensure_pki, server_tls_options

        state = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, state)
        cert, key = ensure_pki(state, ["127.0.0.1"])
        up, down = os.urandom(3 * tls.SCRATCH + 12345), os.urandom(2 * tls.SCRATCH + 7)
        # small, record-sized, a DATA batch, larger than the scratch space, the rest
        pieces = [1, 100, 16384, wire.MAX_BATCH, tls.SCRATCH + 1]
        pieces.append(len(up) - sum(pieces))
        hub = _Collector(expect=len(up))
        # the answer goes only once all has arrived: nothing else comes by
        # to flush what a write left behind
        hub.done.addCallback(lambda got: hub.transport.write(down) or got)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            tls.TLSFactory(server_tls_options(cert, key), False, Factory.forProtocol(lambda: hub)))
        self.addCleanup(port.stopListening)
        endpoint = tls.TLSClientEndpoint(
            client_tls_options(os.path.join(state, "ca.pem"), "127.0.0.1"),
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        card = yield endpoint.connect(Factory.forProtocol(lambda: _Collector(up, pieces, expect=len(down))))
        got_up = yield hub.done
        got_down = yield card.done
        card.transport.loseConnection()
        yield card.lost
        yield hub.lost
        for got, sent in ((got_up, up), (got_down, down)):
            self.assertEqual(len(got), len(sent))
            self.assertTrue(got == sent, "the bytes that arrived differ from what was sent")

    test_bytes_cross_intact_both_ways.timeout = 30


class PlainTLS:
    """Runs a test case's tests through Twisted's plain TLS: the fenced fast path's fallback."""

    def setUp(self):
        from sevpn import tls

        self.assertTrue(tls.fast_path(), "the fast path should resolve with the pinned versions")
        self.patch(tls, "_fast", None)
        self.assertFalse(tls.fast_path())
        return super().setUp()


class RealTLSPlainPath(PlainTLS, RealTLS):
    pass


class LinkTLSStreamPlainPath(PlainTLS, LinkTLSStream):
    pass


class Fence(TestCase):
    def test_a_missing_private_piece_turns_the_fast_path_off(self):
        from twisted.protocols.tls import TLSMemoryBIOProtocol

        from sevpn import tls

        self.patch(TLSMemoryBIOProtocol, "_flushSendBIO", None)
        del TLSMemoryBIOProtocol._flushSendBIO
        fast, why = tls._resolve()
        self.assertIsNone(fast)
        self.assertIn("_flushSendBIO", why)

    def test_the_plain_factory_builds_plain_tls(self):
        from twisted.internet.protocol import Factory
        from twisted.internet.ssl import CertificateOptions
        from twisted.protocols.tls import TLSMemoryBIOProtocol

        from sevpn import tls

        factory = tls.TLSFactory(CertificateOptions(), True, Factory.forProtocol(Protocol))
        self.assertIs(type(factory.buildProtocol(None)), tls.LinkTLSProtocol)
        self.patch(tls, "_fast", None)
        self.assertIs(type(factory.buildProtocol(None)), TLSMemoryBIOProtocol)
