"""
UDP sockets for the channel, with the real reactor on loopback: the hub's
address syntax, datagrams in and out, and a hub and two cards whose
channel keys come from real TLS sessions.
"""

import os
import shutil
import socket
import tempfile
from functools import partial

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sevpn import datagram, tls, udp
from sevpn.accounts import Account
from sevpn.card import Card, NicSide
from sevpn.cardservice import tls_endpoint_for
from sevpn.hubservice import HubService
from sevpn.users import HubState
from tests.support import FakeTap, frame, mac, payloads
from tests.test_tls import eventually


class Addresses(SynchronousTestCase):
    def test_parse(self):
        self.assertEqual(udp.parse_spec("udp:5555"), ("", 5555))
        self.assertEqual(udp.parse_spec("udp:port=6000:interface=10.0.0.1"), ("10.0.0.1", 6000))
        self.assertEqual(udp.parse_spec("udp:0:interface=\\:\\:1"), ("::1", 0))
        for bad in ("tcp:5555", "udp:", "udp:x", "udp:70000", "udp:5555:backlog=3", "udp:interface=1.2.3.4"):
            self.assertRaises(udp.SpecError, udp.parse_spec, bad)

    def test_default_beside_the_tcp_listener(self):
        self.assertEqual(udp.default_spec("tcp:5555"), "udp:5555")
        self.assertEqual(udp.default_spec("tcp6:5555"), "udp:5555:interface=\\:\\:")
        self.assertEqual(udp.default_spec("tcp:port=443:interface=192.0.2.1"), "udp:443:interface=192.0.2.1")
        self.assertEqual(udp.default_spec("tcp6:5555:interface=\\:\\:1"), "udp:5555:interface=\\:\\:1")
        self.assertIsNone(udp.default_spec("unix:/run/sevpn.sock"))
        self.assertEqual(udp.parse_spec(udp.default_spec("tcp6:5555")), ("::", 5555))


class Receiver:
    def __init__(self):
        self.got = []
        self.reads = 0

    def datagram_received(self, data, address):
        self.got.append((bytes(data), address))

    def read_done(self):
        self.reads += 1


class Sockets(TestCase):
    @inlineCallbacks
    def test_datagrams_both_ways_in_batches(self):
        hub_side, card_side = Receiver(), Receiver()
        hub = udp.listen(reactor, "udp:0:interface=127.0.0.1", hub_side)
        self.addCleanup(hub.close)
        card = udp.connect(reactor, "127.0.0.1", hub.port, card_side)
        self.addCleanup(card.close)
        for i in range(50):
            self.assertTrue(card.send(b"%d" % i))
        yield eventually(lambda: len(hub_side.got) == 50, "the hub to read 50 datagrams")
        self.assertEqual([d for d, _ in hub_side.got], [b"%d" % i for i in range(50)])
        self.assertLess(hub_side.reads, 50)  # read in batches, each followed by read_done
        address = hub_side.got[0][1]
        self.assertTrue(hub.send(b"back", address))
        yield eventually(lambda: card_side.got, "the card to read the answer")
        self.assertEqual(card_side.got[0][0], b"back")

    def test_large_datagrams_are_read_whole(self):
        hub_side = Receiver()
        hub = udp.listen(reactor, "udp:0:interface=127.0.0.1", hub_side)
        self.addCleanup(hub.close)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sender.close)
        big = os.urandom(datagram.MAX_UDP_PAYLOAD)
        sender.sendto(big, ("127.0.0.1", hub.port))
        return eventually(lambda: hub_side.got and hub_side.got[0][0] == big, "the whole datagram")

    def test_a_refused_send_is_a_drop_not_an_error(self):
        card = udp.connect(reactor, "127.0.0.1", 9, Receiver())  # discard: nobody listens
        self.addCleanup(card.close)
        results = set()
        for _ in range(5):
            results.add(card.send(b"x"))
        self.assertIn(True, results)  # the first goes; ICMP refusals later are drops

    def test_a_port_in_use_is_a_sentence(self):
        hub = udp.listen(reactor, "udp:0:interface=127.0.0.1", Receiver())
        self.addCleanup(hub.close)
        self.assertRaises(OSError, udp.listen, reactor, f"udp:{hub.port}:interface=127.0.0.1", Receiver())


class SendErrors(SynchronousTestCase):
    """No error of a send leaves the socket: it would stop whoever sent (the card's TAP reader)."""

    class Sock:
        def __init__(self, errors):
            self.errors = list(errors)
            self.sent = []
            self.connects = []

        def send(self, data):
            if self.errors:
                code = self.errors.pop(0)
                raise OSError(code, os.strerror(code))
            self.sent.append(bytes(data))

        sendto = None

        def connect(self, address):
            self.connects.append(address)

    def test_a_destroyed_socket_is_connected_again(self):
        import errno

        sock = self.Sock([errno.EDESTADDRREQ])  # what 'ss -K' leaves a connected UDP socket with
        reader = udp.DatagramSocket(reactor, sock, Receiver())
        reader.remote = ("192.0.2.2", 5555)
        self.assertTrue(reader.send(b"x"))
        self.assertEqual((sock.connects, sock.sent), ([("192.0.2.2", 5555)], [b"x"]))

    def test_any_other_error_drops_the_datagram(self):
        import errno

        codes = [errno.EAGAIN, errno.ENETUNREACH, errno.EPERM, errno.EBADF, errno.EIO, errno.EMSGSIZE]
        sock = self.Sock(codes)
        reader = udp.DatagramSocket(reactor, sock, Receiver())
        reader.remote = ("192.0.2.2", 5555)
        self.assertEqual([reader.send(b"x") for _ in codes], [False] * len(codes))
        self.assertEqual(reader.send_errors, len(codes))
        self.assertTrue(reader.send(b"y"))


class RealChannels(TestCase):
    """A hub service and two cards in this process: TLS on loopback, and UDP beside it."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        state = HubState(self.dir)
        for user in ("alice", "bob"):
            state.add_user("DEFAULT", user, b"pw")

    def start_hub(self, **kw):
        service = HubService(state_dir=self.dir, listen=["tcp:0:interface=127.0.0.1"], **kw)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def card(self, service, n, user, udp_mode="always"):
        port = service.ports[0].getHost().port
        card = Card(reactor, NicSide(FakeTap(reactor)), mac(n), tls_endpoint_for(reactor),
                    udp=partial(udp.connect, reactor), udp_mode=udp_mode)
        card.connect(Account(name="t", hub=f"127.0.0.1:{port}", user=user, password="pw",
                             ca_file=os.path.join(self.dir, "ca.pem")))
        self.addCleanup(card.disconnect)
        return card

    @inlineCallbacks
    def test_frames_cross_over_udp_with_keys_from_tls(self):
        self.assertIsNone(tls.EXPORTER_MISSING)
        service = self.start_hub(udp_mode="always")
        self.assertTrue(service.status()["udp"].startswith("udp:"))
        a, b = self.card(service, 1, "alice"), self.card(service, 2, "bob")
        yield eventually(lambda: a.status().get("udp") == b.status().get("udp") == "up", "both channels up")
        yield eventually(lambda: len(service.sessions()) == 2 and all(s["udp"] == "up" for s in service.sessions()), "the hub's side up")
        a.lan.tap.os_sends([frame(mac(2), mac(1), b"%06d" % i + b"." * 1200) for i in range(100)])
        yield eventually(lambda: len(payloads(b.lan.tap, mac(2))) == 100, "100 frames at b")
        self.assertEqual([p[:6] for p in payloads(b.lan.tap, mac(2))], [b"%06d" % i for i in range(100)])
        self.assertGreaterEqual(b.status()["udp_datagrams_in"], 100)
        self.assertEqual(service.status()["udp_unknown_channel"], 0)
        self.assertEqual(a.status()["udp_peer"], f"127.0.0.1:{service.udp_channels.port}")

    @inlineCallbacks
    def test_on_a_clean_line_the_channel_stands_by(self):
        """The default (auto): UDP works, but loopback loses nothing, so frames stay on TCP."""
        service = self.start_hub()
        a, b = self.card(service, 1, "alice", "auto"), self.card(service, 2, "bob", "auto")
        yield eventually(lambda: a.status().get("udp") == b.status().get("udp") == "ready", "both channels ready")
        a.lan.tap.os_sends([frame(mac(2), mac(1), b"%06d" % i + b"." * 1200) for i in range(100)])
        yield eventually(lambda: len(payloads(b.lan.tap, mac(2))) == 100, "100 frames at b")
        self.assertLess(b.status()["udp_datagrams_in"], 20)  # probes and their answers only

    @inlineCallbacks
    def test_a_hub_started_with_no_udp(self):
        service = self.start_hub(udp=False)
        self.assertIsNone(service.status()["udp"])
        a = self.card(service, 1, "alice")
        yield eventually(lambda: a.state == "connected", "the card to connect")
        self.assertEqual(a.status()["udp"], "off")

    def test_an_unusable_udp_address_is_a_sentence(self):
        service = HubService(state_dir=self.dir, listen=["tcp:0:interface=127.0.0.1"], udp_listen="udp:x")
        e = self.assertRaises(SystemExit, service.startService)
        self.assertIn("--udp-listen", str(e))
        self.flushLoggedErrors()


class Exporter(TestCase):
    """The fence around TLS keying material (sevpn.tls): without it, no channel."""

    def test_no_tls_session_no_keys(self):
        self.assertIsNone(tls.keying_material(object(), datagram.LABEL, 64, b"c"))

        class NotTLS:
            def getHandle(self):
                return object()  # a plain TCP transport's handle is its socket

        self.assertIsNone(tls.keying_material(NotTLS(), datagram.LABEL, 64, b"c"))

    def test_without_the_fence_the_hub_offers_no_udp(self):
        self.patch(tls, "EXPORTER_MISSING", "pyOpenSSL's Connection has no export_keying_material")
        self.assertIsNone(tls.keying_material(object(), datagram.LABEL, 64, b"c"))
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        service = HubService(state_dir=directory, listen=["tcp:0:interface=127.0.0.1"])
        service.startService()
        self.addCleanup(service.stopService)
        self.assertIsNone(service.status()["udp"])
        self.assertIsNone(service.links.udp)


class Options(SynchronousTestCase):
    def test_hub_options(self):
        from sevpn import hubtap

        config = hubtap.Options()
        config.parseOptions(["--udp-listen", "udp:6000:interface=127.0.0.1"])
        service = hubtap.makeService(config)
        self.assertEqual((service.udp, service.udp_listen), (True, "udp:6000:interface=127.0.0.1"))
        config = hubtap.Options()
        config.parseOptions(["--no-udp"])
        self.assertFalse(hubtap.makeService(config).udp)

    def test_card_option(self):
        from sevpn import nictap

        config = nictap.Options()
        config.parseOptions(["--no-udp"])
        self.assertFalse(nictap.makeService(config).udp)
        config = nictap.Options()
        config.parseOptions([])
        self.assertTrue(nictap.makeService(config).udp)

    def test_a_bad_udp_address_is_refused_when_parsed(self):
        from twisted.python import usage

        from sevpn import hubtap

        e = self.assertRaises(usage.UsageError, hubtap.Options().parseOptions, ["--udp-listen", "udp:99999"])
        self.assertIn("--udp-listen", str(e))


class Workers(TestCase):
    """Hub workers: a role that can hand out a UDP socket gets a channel table on it; one that cannot, none."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def service(self, role):
        service = HubService(state_dir=self.dir, listen=["tcp:0:interface=127.0.0.1"])
        service.role = role
        return service

    def test_a_role_without_udp_sockets(self):
        service = self.service(object())
        self.assertIsNone(service._listen_udp(reactor))

    def test_a_role_with_a_udp_socket(self):
        given = []

        class Role:
            def listen_udp(self, spec):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind(("127.0.0.1", 0))
                given.append((spec, sock))
                return sock

        service = self.service(Role())
        channels = service._listen_udp(reactor)
        self.addCleanup(service.udp_socket.close)
        [(spec, sock)] = given
        self.assertEqual(spec, "udp:0:interface=127.0.0.1")
        self.assertEqual(channels.port, sock.getsockname()[1])
        self.assertIs(channels.transport.socket, sock)
