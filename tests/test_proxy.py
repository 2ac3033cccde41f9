"""
Proxy traversal: the proxy URL, both handshakes (pure), the Twisted
adapter on a Clock, and real proxies (tinyproxy, dante, squid) carrying
real TLS to an echo server on loopback.
"""

from __future__ import annotations

import base64
import os
import shutil
import struct
import tempfile

from twisted.internet import reactor, tcp
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError, DNSLookupError, NoProtocol
from twisted.internet.interfaces import IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from service_identity import VerificationError

from sevpn.accounts import Account
from sevpn.card import Card, NicSide
from sevpn.cardservice import tls_endpoint_for
from sevpn.hubservice import HubService
from sevpn.link import describe_failure
from sevpn.pki import client_tls_options
from sevpn.proxy import (
    MAX_HTTP_ANSWER,
    Credentials,
    HttpConnectHandshake,
    ProxyEndpoint,
    ProxyError,
    ProxySpec,
    Socks5Handshake,
    endpoint_for,
    parse_proxy_url,
)
from sevpn.tls import TLSClientEndpoint
from sevpn.users import HubState
from tests import proxy_servers
from tests.support import BROADCAST, FakeTap, frame, mac

EXPECTED = "(expected http://[user:pass@]host:port or socks5://[user:pass@]host:port)"


class ParseProxyURL(SynchronousTestCase):
    def test_http_with_credentials(self):
        spec = parse_proxy_url("http://alice:s3cret@proxy.example:3128")
        self.assertEqual(spec, ProxySpec("http", "proxy.example", 3128, "alice", "s3cret"))
        self.assertEqual(spec.credentials, Credentials("alice", "s3cret"))
        self.assertEqual(spec.address, "proxy.example:3128")

    def test_socks5_without_credentials(self):
        spec = parse_proxy_url("socks5://10.0.0.1:1080")
        self.assertEqual(spec, ProxySpec("socks5", "10.0.0.1", 1080))
        self.assertIsNone(spec.credentials)

    def test_scheme_case_and_trailing_slash(self):
        self.assertEqual(parse_proxy_url(" HTTP://proxy:8080/ "), ProxySpec("http", "proxy", 8080))

    def test_ipv6_literal_in_brackets(self):
        spec = parse_proxy_url("socks5://u:p@[2001:db8::1]:1080")
        self.assertEqual(spec.host, "2001:db8::1")
        self.assertEqual(spec.address, "[2001:db8::1]:1080")
        self.assertEqual(spec.describe(), "socks5://u@[2001:db8::1]:1080")

    def test_credentials_are_percent_decoded(self):
        spec = parse_proxy_url("http://al%40ice:p%3Aw%2Fd%25%C3%A9@proxy:3128")
        self.assertEqual((spec.username, spec.password), ("al@ice", "p:w/d%\u00e9"))

    def test_password_with_raw_at_sign_and_colon(self):
        spec = parse_proxy_url("socks5://bob:p@ss:w@proxy:1080")
        self.assertEqual((spec.username, spec.password, spec.host), ("bob", "p@ss:w", "proxy"))

    def test_user_without_password(self):
        spec = parse_proxy_url("http://bob@proxy:3128")
        self.assertEqual(spec.credentials, Credentials("bob", ""))

    def test_describe_and_repr_leave_the_password_out(self):
        spec = parse_proxy_url("http://alice:hunter2@proxy:3128")
        self.assertEqual(spec.describe(), "http://alice@proxy:3128")
        self.assertNotIn("hunter2", repr(spec))
        self.assertNotIn("hunter2", repr(spec.credentials))
        self.assertEqual(parse_proxy_url("socks5://proxy:1080").describe(), "socks5://proxy:1080")

    def assertRefused(self, text, *fragments):
        with self.assertRaises(ValueError) as caught:
            parse_proxy_url(text)
        message = str(caught.exception)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_other_schemes(self):
        self.assertEqual(
            self.assertRefused("ftp://x"), f"'ftp://x' is not a proxy URL {EXPECTED}")
        self.assertRefused("https://proxy:3128", "is not a proxy URL", EXPECTED)
        self.assertRefused("socks5h://proxy:1080", "write socks5://")
        self.assertRefused("proxy:3128", "is not a proxy URL", EXPECTED)
        self.assertRefused("", "is not a proxy URL")
        self.assertRefused(None, "is not a proxy URL")

    def test_missing_parts(self):
        self.assertRefused("http://proxy", "'http://proxy'", "has no port", EXPECTED)
        self.assertRefused("http://", "has no host")
        self.assertRefused("http://:3128", "has no host")
        self.assertRefused("socks5://[::1]", "has no port")
        self.assertRefused("http://:pw@proxy:3128", "credentials without a user name")

    def test_bad_ports(self):
        for port in ("0", "65536", "abc", "", "-1", "\u0663"):
            self.assertRefused(f"http://proxy:{port}", "is not a number from 1 to 65535")

    def test_bad_hosts(self):
        self.assertRefused("http://::1:3128", "IPv6 address without brackets")
        self.assertRefused("http://[proxy]:3128", "no valid IPv6 address in brackets")
        self.assertRefused("http://[::1:3128", "no valid IPv6 address in brackets")
        self.assertRefused("http://pro xy:3128", "no valid host name")
        self.assertRefused("http://proxy:3128/path", "has a path or query")
        self.assertRefused("http://proxy:3128?x=1", "has a path or query")

    def test_credentials_the_protocol_cannot_carry(self):
        self.assertRefused("http://a%3Ab:pw@proxy:3128", "holds a ':'")
        self.assertRefused("socks5://" + "u" * 256 + ":pw@proxy:1080", "user name", "255 bytes")
        self.assertRefused("socks5://u:" + "p" * 256 + "@proxy:1080", "password", "255 bytes")
        self.assertRefused("http://u:%FF@proxy:3128", "not UTF-8")

    def test_errors_do_not_show_the_password(self):
        message = self.assertRefused("http://alice:hunter2@proxy", "has no port")
        self.assertNotIn("hunter2", message)
        self.assertIn("alice:***@proxy", message)
        message = self.assertRefused("http://alice:hun@ter2@proxy", "has no port")
        self.assertNotIn("ter2", message)


class HttpConnect(SynchronousTestCase):
    def handshake(self, host="hub.example", port=5555, credentials=None):
        shake = HttpConnectHandshake(host, port, credentials)
        request = shake.start()
        return shake, request

    def test_request(self):
        shake, request = self.handshake()
        self.assertEqual(request, b"CONNECT hub.example:5555 HTTP/1.1\r\nHost: hub.example:5555\r\n\r\n")
        self.assertEqual(shake.data_to_send(), b"")

    def test_request_with_basic_credentials(self):
        shake, request = self.handshake(credentials=Credentials("alice", "s3cr\u00e9t:x"))
        lines = request.split(b"\r\n")
        self.assertEqual(lines[-2:], [b"", b""])
        auth = [line for line in lines if line.startswith(b"Proxy-Authorization: Basic ")]
        self.assertEqual(len(auth), 1)
        self.assertEqual(base64.b64decode(auth[0].split()[-1]), "alice:s3cr\u00e9t:x".encode())

    def test_ipv6_target_in_brackets(self):
        shake, request = self.handshake("2001:db8::5", 443)
        self.assertTrue(request.startswith(b"CONNECT [2001:db8::5]:443 HTTP/1.1\r\nHost: [2001:db8::5]:443\r\n"))

    def test_targets_that_cannot_go_into_a_request(self):
        for host, port in [("hub\r\nX-Evil: 1", 5555), ("hub example", 5555), ("", 5555), ("[::1]", 5555),
                           ("1:2:3", 5555), ("hub", 0), ("hub", 65536), ("hub", True), ("hub", "5555")]:
            with self.assertRaises(ValueError, msg=(host, port)):
                HttpConnectHandshake(host, port)

    def test_tunnel_up(self):
        shake, _ = self.handshake()
        self.assertEqual(shake.feed(b"HTTP/1.1 200 Connection established\r\n\r\n"), (True, b""))

    def test_bytes_after_the_answer_belong_to_the_tunnel(self):
        shake, _ = self.handshake()
        answer = b"HTTP/1.0 200 OK\r\nProxy-Agent: x\r\n\r\n\x16\x03\x01tunnel\r\n\r\n"
        self.assertEqual(shake.feed(answer), (True, b"\x16\x03\x01tunnel\r\n\r\n"))

    def test_answer_byte_by_byte(self):
        shake, _ = self.handshake()
        answer = b"HTTP/1.1 200 Connection established\r\nVia: 1.1 proxy\r\n\r\n"
        for i in range(len(answer) - 1):
            self.assertEqual(shake.feed(answer[i:i + 1]), (False, b""), answer[:i + 1])
        self.assertEqual(shake.feed(answer[-1:] + b"after"), (True, b"after"))

    def test_bare_newlines(self):
        shake, _ = self.handshake()
        self.assertEqual(shake.feed(b"HTTP/1.0 200 OK\nServer: x\n\nrest"), (True, b"rest"))

    def test_interim_answers_are_skipped(self):
        shake, _ = self.handshake()
        self.assertEqual(shake.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2"), (False, b""))
        self.assertEqual(shake.feed(b"00 OK\r\n\r\nx"), (True, b"x"))

    def refusal(self, answer, credentials=None):
        shake, _ = self.handshake(credentials=credentials)
        with self.assertRaises(ProxyError) as caught:
            shake.feed(answer)
        return str(caught.exception)

    def test_407_without_credentials(self):
        self.assertEqual(
            self.refusal(b"HTTP/1.0 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n"),
            "the proxy wants credentials (give them in the proxy URL: http://user:pass@host:port) "
            "(HTTP 407 Proxy Authentication Required)")

    def test_401_with_credentials(self):
        # tinyproxy's answer to wrong credentials
        message = self.refusal(b"HTTP/1.0 401 Unauthorized\r\n\r\n", Credentials("alice", "pw"))
        self.assertTrue(message.startswith("the proxy did not accept the credentials of user 'alice'"), message)

    def test_407_with_credentials(self):
        message = self.refusal(b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\n", Credentials("alice", "pw"))
        self.assertEqual(
            message, "the proxy did not accept the credentials of user 'alice' (check the user name and "
                     "password in the proxy URL) (HTTP 407 Proxy Authentication Required)")

    def test_403(self):
        self.assertEqual(self.refusal(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\nnope!"),
                         "the proxy refused the tunnel to hub.example:5555 (HTTP 403 Forbidden)")

    def test_other_refusals(self):
        self.assertEqual(self.refusal(b"HTTP/1.1 405\r\n\r\n"),
                         "the proxy refused the tunnel to hub.example:5555 (HTTP 405)")
        self.assertEqual(self.refusal(b"HTTP/1.1 503 Service Unavailable\r\n\r\n"),
                         "the proxy could not open the tunnel to hub.example:5555 (HTTP 503 Service Unavailable)")
        self.assertEqual(self.refusal(b"HTTP/1.1 302 Found\r\nLocation: x\r\n\r\n"),
                         "the proxy refused the tunnel to hub.example:5555 (HTTP 302 Found)")

    def test_reason_phrase_is_sanitized_and_cut(self):
        message = self.refusal(b"HTTP/1.1 403 \x1b[31mred" + b"x" * 200 + b"\r\n\r\n")
        self.assertNotIn("\x1b", message)
        self.assertLess(len(message), 160)
        self.assertIn("(HTTP 403 ?[31mredxxx", message)

    def test_not_http(self):
        self.assertIn("did not answer in HTTP", self.refusal(b"\x05\xff"[:2] + b"abc"))
        self.assertIn("if it is a SOCKS proxy, write socks5://", self.refusal(b"\x05\x00\x00\x01\x00"))
        self.assertIn("no HTTP status line", self.refusal(b"HTTP/1.1 OK\r\n\r\n"))

    def test_oversized_answer(self):
        shake, _ = self.handshake()
        head = b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_HTTP_ANSWER - 20)
        self.assertEqual(len(head), MAX_HTTP_ANSWER)
        self.assertEqual(shake.feed(head), (False, b""))  # at the limit: still waiting
        with self.assertRaises(ProxyError) as caught:
            shake.feed(b"a")
        self.assertEqual(str(caught.exception), "the proxy's answer is longer than 16 KiB; it is not a tunnel")

    def test_oversized_answer_in_one_piece(self):
        shake, _ = self.handshake()
        with self.assertRaises(ProxyError):
            shake.feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HTTP_ANSWER + b"\r\n\r\n")

    def test_large_answer_within_the_limit_and_much_tunnel_data(self):
        shake, _ = self.handshake()
        head = b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_HTTP_ANSWER - 24) + b"\r\n\r\n"
        self.assertEqual(len(head), MAX_HTTP_ANSWER)
        tunnel = os.urandom(100_000)
        self.assertEqual(shake.feed(head + tunnel), (True, tunnel))

    def test_interim_answers_count_toward_the_limit(self):
        shake, _ = self.handshake()
        interim = b"HTTP/1.1 100 Continue\r\nX: " + b"a" * 1000 + b"\r\n\r\n"
        with self.assertRaises(ProxyError):
            for _ in range(MAX_HTTP_ANSWER // len(interim) + 1):
                shake.feed(interim)

    def test_no_feeding_before_start_or_after_the_end(self):
        shake = HttpConnectHandshake("hub", 1)
        self.assertRaises(RuntimeError, shake.feed, b"x")
        shake.start()
        shake.feed(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertRaises(RuntimeError, shake.feed, b"x")


def socks_reply(code=0, bound=b"\x01\x7f\x00\x00\x01", port=1080):
    return b"\x05" + bytes([code]) + b"\x00" + bound + struct.pack("!H", port)


class Socks5(SynchronousTestCase):
    def test_greeting(self):
        self.assertEqual(Socks5Handshake("hub", 1).start(), b"\x05\x01\x00")
        self.assertEqual(Socks5Handshake("hub", 1, Credentials("u", "p")).start(), b"\x05\x02\x00\x02")

    def test_host_name_goes_to_the_proxy(self):
        shake = Socks5Handshake("hub.example", 5555)
        shake.start()
        self.assertEqual(shake.feed(b"\x05\x00"), (False, b""))
        self.assertEqual(shake.data_to_send(), b"\x05\x01\x00\x03\x0bhub.example\x15\xb3")
        self.assertEqual(shake.data_to_send(), b"")  # once
        self.assertEqual(shake.feed(socks_reply() + b"tunnel"), (True, b"tunnel"))

    def test_address_types(self):
        for host, encoded in [("192.0.2.7", b"\x01\xc0\x00\x02\x07"),
                              ("2001:db8::1", b"\x04" + bytes.fromhex("20010db8" + "0" * 23 + "1")),
                              ("b\u00fccher.example", b"\x03\x15xn--bcher-kva.example")]:
            shake = Socks5Handshake(host, 443)
            shake.start()
            shake.feed(b"\x05\x00")
            self.assertEqual(shake.data_to_send(), b"\x05\x01\x00" + encoded + b"\x01\xbb", host)

    def test_names_that_cannot_be_sent(self):
        self.assertRaises(ValueError, Socks5Handshake, "a" * 256, 1)
        self.assertRaises(ValueError, Socks5Handshake, "a..b", 1)
        self.assertRaises(ValueError, Socks5Handshake, "hub", 0)
        self.assertRaises(ValueError, Socks5Handshake, "hub", 1, Credentials("", "p"))

    def test_user_password(self):
        shake = Socks5Handshake("hub", 5555, Credentials("alice", "s3cret"))
        shake.start()
        self.assertEqual(shake.feed(b"\x05\x02"), (False, b""))
        self.assertEqual(shake.data_to_send(), b"\x01\x05alice\x06s3cret")
        self.assertEqual(shake.feed(b"\x01\x00"), (False, b""))
        self.assertEqual(shake.data_to_send(), b"\x05\x01\x00\x03\x03hub\x15\xb3")
        self.assertEqual(shake.feed(socks_reply()), (True, b""))

    def test_proxy_that_needs_no_credentials_we_have(self):
        shake = Socks5Handshake("hub", 5555, Credentials("alice", "s3cret"))
        shake.start()
        shake.feed(b"\x05\x00")
        self.assertEqual(shake.data_to_send(), b"\x05\x01\x00\x03\x03hub\x15\xb3")

    def test_everything_byte_by_byte(self):
        shake = Socks5Handshake("hub", 5555, Credentials("alice", "s3cret"))
        shake.start()
        sent = b""
        answers = b"\x05\x02" + b"\x01\x00" + socks_reply(bound=b"\x03\x09proxy.lan")
        for i in range(len(answers) - 1):
            self.assertEqual(shake.feed(answers[i:i + 1]), (False, b""))
            sent += shake.data_to_send()
        self.assertEqual(shake.feed(answers[-1:] + b"\x00more"), (True, b"\x00more"))
        self.assertEqual(sent, b"\x01\x05alice\x06s3cret" + b"\x05\x01\x00\x03\x03hub\x15\xb3")

    def test_bound_address_types_and_leftover(self):
        for bound in [b"\x01\x7f\x00\x00\x01", b"\x04" + bytes(16), b"\x03\x00", b"\x03\xff" + b"n" * 255]:
            shake = Socks5Handshake("hub", 1)
            shake.start()
            shake.feed(b"\x05\x00")
            reply = socks_reply(bound=bound)
            self.assertEqual(shake.feed(reply[:-1]), (False, b""))
            self.assertEqual(shake.feed(reply[-1:] + b"tail"), (True, b"tail"), bound[:2])

    def refusal(self, *answers, credentials=None, host="hub.example"):
        shake = Socks5Handshake(host, 5555, credentials)
        shake.start()
        with self.assertRaises(ProxyError) as caught:
            for answer in answers:
                shake.feed(answer)
        return str(caught.exception)

    def test_reply_codes(self):
        reasons = {
            1: "general SOCKS server failure",
            2: "connection not allowed by the proxy's rules",
            3: "network unreachable",
            4: "host unreachable",
            5: "connection refused",
            6: "TTL expired",
            7: "the proxy does not support the CONNECT command",
            8: "address type not supported",
            9: "reply code 9",
            255: "reply code 255",
        }
        for code, reason in reasons.items():
            message = self.refusal(b"\x05\x00", socks_reply(code), host="192.0.2.1")
            self.assertEqual(message, f"the SOCKS proxy could not open the tunnel to 192.0.2.1:5555 ({reason})")

    def test_refusal_is_seen_before_the_whole_reply(self):
        # a failing server may send a short reply and close: the code is enough
        self.assertIn("(connection refused)", self.refusal(b"\x05\x00", b"\x05\x05"))

    def test_names_not_supported(self):
        self.assertEqual(self.refusal(b"\x05\x00", socks_reply(8)),
                         "the SOCKS proxy could not open the tunnel to hub.example:5555 (address type not "
                         "supported: it does not take host names; give the hub as an IP address)")

    def test_no_acceptable_method(self):
        self.assertEqual(self.refusal(b"\x05\xff"),
                         "the SOCKS proxy accepts none of our authentication methods (it may want a user name "
                         "and password: socks5://user:pass@host:port)")
        self.assertEqual(self.refusal(b"\x05\xff", credentials=Credentials("u", "p")),
                         "the SOCKS proxy accepts none of our authentication methods (we offer none and user "
                         "name/password)")

    def test_method_not_offered(self):
        self.assertIn("chose an authentication method we did not offer (2)", self.refusal(b"\x05\x02"))
        self.assertIn("did not offer (1)", self.refusal(b"\x05\x01", credentials=Credentials("u", "p")))

    def test_credentials_refused(self):
        self.assertEqual(self.refusal(b"\x05\x02", b"\x01\x01", credentials=Credentials("alice", "pw")),
                         "the SOCKS proxy did not accept the credentials of user 'alice' (check the user name "
                         "and password in the proxy URL)")

    def test_not_socks5(self):
        self.assertEqual(self.refusal(b"\x04\x00"), "the proxy did not answer in SOCKS5 (version byte 4)")
        self.assertIn("if it is an HTTP proxy, write http://", self.refusal(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
        self.assertIn("version byte 4", self.refusal(b"\x05\x00", b"\x04\x00\x00\x01"))

    def test_unknown_bound_address_type(self):
        self.assertEqual(self.refusal(b"\x05\x00", b"\x05\x00\x00\x07\x00\x00"),
                         "the SOCKS proxy's reply has an unknown address type (7)")


# -- the adapter, on a Clock ------------------------------------------------


@implementer(ITCPTransport)
class TCPLikeTransport(StringTransport):
    """Like the reactor's TCP transport: reads reach C{self.protocol}."""

    protocol = None


@implementer(IStreamClientEndpoint)
class ProxyLine:
    """The TCP connection to the proxy, driven by the test."""

    def __init__(self, transport_class=TCPLikeTransport):
        self.transport_class = transport_class
        self.cancelled = False
        self.attempt = Deferred(self._cancel)

    def _cancel(self, d):
        self.cancelled = True

    def connect(self, factory):
        self.factory = factory
        return self.attempt

    def answer(self):
        """The proxy accepts the TCP connection (as the reactor does it)."""
        self.protocol = self.factory.buildProtocol(None)
        self.transport = self.transport_class()
        if hasattr(self.transport, "protocol"):
            self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        self.attempt.callback(self.protocol)
        return self.transport

    def from_proxy(self, data):
        """Bytes arriving from the proxy, where the transport delivers them."""
        target = getattr(self.transport, "protocol", None) or self.protocol
        target.dataReceived(data)

    def sent(self):
        value = self.transport.value()
        self.transport.clear()
        return value


class Recorder(Protocol):
    built = 0

    def __init__(self):
        self.events = []

    def connectionMade(self):
        self.events.append(("made", self.transport))

    def dataReceived(self, data):
        self.events.append(("data", bytes(data)))

    def connectionLost(self, reason):
        self.events.append(("lost", reason.type))


class RecorderFactory(Factory):
    def __init__(self):
        self.protocols = []

    def buildProtocol(self, addr):
        p = Recorder()
        self.protocols.append(p)
        return p


HTTP_SPEC = ProxySpec("http", "proxy.lan", 3128)


class Adapter(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.line = ProxyLine()
        self.factory = RecorderFactory()

    def connect(self, spec=HTTP_SPEC, timeout=10):
        endpoint = ProxyEndpoint(self.clock, spec, "hub.example", 5555, timeout, proxy_endpoint=self.line)
        self.result = endpoint.connect(self.factory)
        self.outcome = []
        self.result.addBoth(self.outcome.append)

    def failure_text(self):
        self.assertEqual(len(self.outcome), 1)
        self.assertIsInstance(self.outcome[0], Failure)
        self.outcome[0].trap(ProxyError)
        return str(self.outcome[0].value)

    def test_tunnel_then_protocol(self):
        self.connect()
        transport = self.line.answer()
        self.assertEqual(self.line.sent(), b"CONNECT hub.example:5555 HTTP/1.1\r\nHost: hub.example:5555\r\n\r\n")
        self.line.from_proxy(b"HTTP/1.1 200 Connection established\r\n")
        self.assertEqual(self.factory.protocols, [])  # not before the tunnel is up
        self.assertEqual(self.outcome, [])
        self.line.from_proxy(b"\r\nfirst")
        [protocol] = self.factory.protocols
        self.assertEqual(self.outcome, [protocol])
        self.assertEqual(protocol.events, [("made", transport), ("data", b"first")])
        # from now on the transport talks to the protocol itself, both ways
        self.assertIs(transport.protocol, protocol)
        self.line.from_proxy(b"second")
        protocol.transport.write(b"out")
        self.assertEqual(self.line.sent(), b"out")
        self.assertEqual(protocol.events[-1], ("data", b"second"))
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the deadline is gone

    def test_relay_on_other_transports(self):
        self.line = ProxyLine(StringTransport)
        self.connect()
        transport = self.line.answer()
        self.line.from_proxy(b"HTTP/1.1 200 OK\r\n\r\n")
        [protocol] = self.factory.protocols
        self.assertIs(protocol.transport, transport)
        self.line.protocol.dataReceived(b"relayed")
        self.line.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(protocol.events[1:], [("data", b"relayed"), ("lost", ConnectionDone)])

    def test_socks5_replies_are_sent(self):
        self.connect(ProxySpec("socks5", "proxy.lan", 1080, "alice", "pw"))
        self.line.answer()
        self.assertEqual(self.line.sent(), b"\x05\x02\x00\x02")
        self.line.from_proxy(b"\x05\x02")
        self.assertEqual(self.line.sent(), b"\x01\x05alice\x02pw")
        self.line.from_proxy(b"\x01\x00")
        self.assertEqual(self.line.sent(), b"\x05\x01\x00\x03\x0bhub.example\x15\xb3")
        self.line.from_proxy(socks_reply() + b"x")
        [protocol] = self.factory.protocols
        self.assertEqual(self.outcome, [protocol])
        self.assertEqual(protocol.events[1:], [("data", b"x")])

    def test_refusal(self):
        self.connect()
        transport = self.line.answer()
        self.line.from_proxy(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        self.assertEqual(self.failure_text(), "the proxy refused the tunnel to hub.example:5555 (HTTP 403 Forbidden)")
        self.assertTrue(transport.disconnected)  # aborted
        self.assertEqual(self.factory.protocols, [])
        self.line.protocol.connectionLost(Failure(ConnectionDone()))  # then the loss: nothing more happens
        self.assertEqual(len(self.outcome), 1)

    def test_proxy_unreachable(self):
        self.connect()
        self.line.attempt.errback(ConnectionRefusedError())
        self.assertEqual(self.failure_text(),
                         "cannot reach the proxy at proxy.lan:3128 (connection refused; is it running?)")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_proxy_name_does_not_resolve(self):
        self.connect()
        self.line.attempt.errback(DNSLookupError("proxy.lan"))
        self.assertEqual(self.failure_text(), "cannot reach the proxy at proxy.lan:3128 (its name does not resolve)")

    def test_proxy_closes_without_answering(self):
        self.connect()
        self.line.answer()
        self.line.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.failure_text(), "the proxy at proxy.lan:3128 closed the connection without answering")

    def test_proxy_closes_in_the_middle(self):
        self.connect()
        self.line.answer()
        self.line.from_proxy(b"HTTP/1.1 200 ")
        self.line.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.failure_text(),
                         "the proxy at proxy.lan:3128 closed the connection in the middle of its answer")
        self.assertEqual(self.factory.protocols, [])

    def test_handshake_deadline(self):
        self.connect(timeout=7)
        transport = self.line.answer()
        self.line.from_proxy(b"HTTP/1.1 200 ")
        self.clock.advance(6.9)
        self.assertEqual(self.outcome, [])
        self.clock.advance(0.1)
        self.assertEqual(self.failure_text(),
                         "the proxy at proxy.lan:3128 did not open the tunnel to hub.example:5555 within 7 s")
        self.assertTrue(transport.disconnected)
        self.line.from_proxy(b"OK\r\n\r\n")  # too late: ignored
        self.assertEqual(self.factory.protocols, [])

    def test_connect_deadline(self):
        self.connect(timeout=7)
        self.clock.advance(7)
        self.assertEqual(self.failure_text(), "cannot reach the proxy at proxy.lan:3128 (no connection within 7 s)")
        self.assertTrue(self.line.cancelled)

    def test_cancel_while_connecting(self):
        self.connect()
        self.result.cancel()
        self.assertTrue(self.line.cancelled)
        self.outcome[0].trap(CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_during_the_handshake(self):
        self.connect()
        transport = self.line.answer()
        self.result.cancel()
        self.assertTrue(transport.disconnected)
        self.outcome[0].trap(CancelledError)
        self.line.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.outcome), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_after_the_tunnel_is_up_changes_nothing(self):
        self.connect()
        transport = self.line.answer()
        self.line.from_proxy(b"HTTP/1.1 200 OK\r\n\r\n")
        self.result.cancel()
        self.assertFalse(transport.disconnected)

    def test_factory_without_protocol(self):
        self.factory.buildProtocol = lambda addr: None
        self.connect()
        transport = self.line.answer()
        self.line.from_proxy(b"HTTP/1.1 200 OK\r\n\r\n")
        self.outcome[0].trap(NoProtocol)
        self.assertTrue(transport.disconnected)

    def test_bad_target_is_refused_at_once(self):
        self.assertRaises(ValueError, ProxyEndpoint, self.clock, HTTP_SPEC, "hub\r\n", 5555)


class EndpointFor(SynchronousTestCase):
    def test_direct(self):
        endpoint = endpoint_for(Clock(), None, "hub.example", 5555, 10)
        self.assertIsInstance(endpoint, HostnameEndpoint)

    def test_through_a_proxy(self):
        endpoint = endpoint_for(Clock(), "socks5://u:p@proxy:1080", "hub.example", 5555, 10)
        self.assertIsInstance(endpoint, ProxyEndpoint)
        self.assertEqual(endpoint.spec, ProxySpec("socks5", "proxy", 1080, "u", "p"))
        self.assertEqual((endpoint.target_host, endpoint.target_port), ("hub.example", 5555))
        self.assertNotIn("p@", repr(endpoint))

    def test_bad_url(self):
        self.assertRaises(ValueError, endpoint_for, Clock(), "ftp://proxy:21", "hub", 5555)


# -- real sockets, real proxies, real TLS -----------------------------------


class Client(Protocol):
    """Sends C{payload} once connected; collects what comes back."""

    def __init__(self, payload=b"", expect=0):
        self.payload, self.expect = payload, expect
        self.received = bytearray()
        self.done = Deferred()
        self.lost = Deferred()
        self.reason = None

    def connectionMade(self):
        if self.payload:
            self.transport.write(self.payload)

    def dataReceived(self, data):
        self.received += data
        if len(self.received) >= self.expect and not self.done.called:
            self.done.callback(bytes(self.received))

    def connectionLost(self, reason):
        self.reason = reason
        if not self.done.called:
            self.done.errback(reason)
        self.lost.callback(None)


class RealReactorTestCase(TestCase):
    timeout = 90

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="pxtest-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def connect(self, endpoint, client):
        """Connect C{client}; it is closed at the end of the test whatever happens."""

        def close():
            if client.reason is None and client.transport is not None:
                client.transport.abortConnection()
                return client.lost

        self.addCleanup(close)
        return endpoint.connect(Factory.forProtocol(lambda: client))

    @inlineCallbacks
    def refusal(self, endpoint):
        """The sentence a failed connect() gives."""
        with self.assertRaises(ProxyError) as caught:
            yield endpoint.connect(Factory.forProtocol(Client))
        return str(caught.exception)


class ProxyNotThere(RealReactorTestCase):
    @inlineCallbacks
    def test_proxy_not_running(self):
        port = proxy_servers.free_port()
        message = yield self.refusal(endpoint_for(reactor, f"http://127.0.0.1:{port}", "127.0.0.1", 5555))
        self.assertEqual(message, f"cannot reach the proxy at 127.0.0.1:{port} (connection refused; is it running?)")

    @inlineCallbacks
    def test_proxy_that_never_answers(self):
        silent = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
        self.addCleanup(silent.stopListening)
        port = silent.getHost().port
        endpoint = endpoint_for(reactor, f"socks5://127.0.0.1:{port}", "127.0.0.1", 5555, timeout=0.5)
        message = yield self.refusal(endpoint)
        self.assertEqual(
            message, f"the proxy at 127.0.0.1:{port} did not open the tunnel to 127.0.0.1:5555 within 0.5 s")

    test_proxy_that_never_answers.timeout = 20


class _ThroughARealProxy:
    """What every proxy must do; subclasses start one and say what it answers."""

    #: what C{self.url()} puts before the host (credentials, if the proxy wants them)
    userinfo = ""
    scheme = "http"
    #: the sentence for a target port where nothing listens
    refused_target = None
    #: the programs the tests run
    programs = ()

    @inlineCallbacks
    def setUp(self):
        RealReactorTestCase.setUp(self)
        for name in self.programs:
            proxy_servers.program(name)  # skips the test, saying why, without it or without root
        self.echo_port, self.ca, self.echo = yield proxy_servers.start_tls_echo(self, self.dir)
        self.closed_port = proxy_servers.free_port()
        self.blocked_port = proxy_servers.free_port()
        self.proxy = yield self.start_proxy()

    def url(self, userinfo=None):
        userinfo = self.userinfo if userinfo is None else userinfo
        return f"{self.scheme}://{userinfo}127.0.0.1:{self.proxy.port}"

    def tls_endpoint(self, host="127.0.0.1", port=None, server_name="127.0.0.1", url=None):
        return TLSClientEndpoint(client_tls_options(self.ca, server_name),
                                 endpoint_for(reactor, url or self.url(), host, port or self.echo_port))

    @inlineCallbacks
    def transfer(self, endpoint, size=4 << 20):
        payload = os.urandom(size)
        client = Client(payload, expect=len(payload))
        yield self.connect(endpoint, client)
        echoed = yield client.done
        self.assertEqual(len(echoed), len(payload))
        self.assertTrue(echoed == payload, "the echo differs from what was sent")
        return client

    @inlineCallbacks
    def test_bytes_cross_intact_both_ways(self):
        client = yield self.transfer(self.tls_endpoint())
        # TLS sits on the TCP connection to the proxy itself (sevpn.tls's fast path)
        tls_protocol = client.transport
        self.assertIsInstance(tls_protocol.transport, tcp.Client)
        self.assertIs(tls_protocol.transport.protocol, tls_protocol)
        self.assertEqual(tls_protocol.transport.getPeer().port, self.proxy.port)
        client.transport.loseConnection()
        yield client.lost

    @inlineCallbacks
    def test_server_certificate_checked_end_to_end(self):
        client = Client(b"secret hello", expect=1)
        yield self.connect(self.tls_endpoint(server_name="impostor.example"), client)
        yield self.assertFailure(client.done, VerificationError)
        yield client.lost
        self.assertEqual(describe_failure(client.reason),
                         "the hub's certificate is not valid for impostor.example (check --server-name / the "
                         "hub's --hostname)")
        self.assertEqual(self.echo.received, 0)

    @inlineCallbacks
    def test_refused_target(self):
        message = yield self.refusal(self.tls_endpoint(port=self.closed_port))
        self.assertEqual(message, self.refused_target.format(port=self.closed_port))


class Tinyproxy(_ThroughARealProxy, RealReactorTestCase):
    programs = ("tinyproxy",)
    userinfo = "alice:s3cr3t-pw@"
    refused_target = "the proxy could not open the tunnel to 127.0.0.1:{port} (HTTP 500 Unable to connect)"

    def start_proxy(self):
        return proxy_servers.start_tinyproxy(self, self.dir, [self.echo_port, self.closed_port],
                                             auth=("alice", "s3cr3t-pw"))

    @inlineCallbacks
    def test_credentials_wanted(self):
        message = yield self.refusal(self.tls_endpoint(url=self.url(userinfo="")))
        self.assertEqual(message, "the proxy wants credentials (give them in the proxy URL: "
                                  "http://user:pass@host:port) (HTTP 407 Proxy Authentication Required)")

    @inlineCallbacks
    def test_wrong_credentials(self):
        message = yield self.refusal(self.tls_endpoint(url=self.url(userinfo="alice:guess@")))
        # tinyproxy says 401 here (and 407 without credentials)
        self.assertEqual(message, "the proxy did not accept the credentials of user 'alice' (check the user name "
                                  "and password in the proxy URL) (HTTP 401 Unauthorized)")

    @inlineCallbacks
    def test_port_not_allowed(self):
        message = yield self.refusal(self.tls_endpoint(port=self.blocked_port))
        self.assertEqual(message, f"the proxy refused the tunnel to 127.0.0.1:{self.blocked_port} "
                                  "(HTTP 403 Access violation)")


class TinyproxyWithoutCredentials(_ThroughARealProxy, RealReactorTestCase):
    programs = ("tinyproxy",)
    refused_target = Tinyproxy.refused_target

    def start_proxy(self):
        return proxy_servers.start_tinyproxy(self, self.dir, [self.echo_port, self.closed_port])

    @inlineCallbacks
    def test_proxy_by_host_name(self):
        # "localhost" resolves here, to ::1 and 127.0.0.1; the proxy listens on the latter only
        client = yield self.transfer(self.tls_endpoint(url=f"http://localhost:{self.proxy.port}"), size=1 << 16)
        self.assertEqual(client.transport.transport.getPeer().host, "127.0.0.1")
        client.transport.loseConnection()
        yield client.lost


class Squid(_ThroughARealProxy, RealReactorTestCase):
    programs = ("squid", "openssl")
    userinfo = "bob:pw%3A%40x@"
    refused_target = "the proxy could not open the tunnel to 127.0.0.1:{port} (HTTP 503 Service Unavailable)"

    def start_proxy(self):
        return proxy_servers.start_squid(self, self.dir, [self.echo_port, self.closed_port], auth=("bob", "pw:@x"))

    @inlineCallbacks
    def test_credentials_wanted(self):
        message = yield self.refusal(self.tls_endpoint(url=self.url(userinfo="")))
        self.assertEqual(message, "the proxy wants credentials (give them in the proxy URL: "
                                  "http://user:pass@host:port) (HTTP 407 Proxy Authentication Required)")

    @inlineCallbacks
    def test_wrong_credentials(self):
        message = yield self.refusal(self.tls_endpoint(url=self.url(userinfo="bob:pw:x@")))
        self.assertEqual(message, "the proxy did not accept the credentials of user 'bob' (check the user name "
                                  "and password in the proxy URL) (HTTP 407 Proxy Authentication Required)")

    @inlineCallbacks
    def test_port_not_allowed(self):
        message = yield self.refusal(self.tls_endpoint(port=self.blocked_port))
        self.assertEqual(message, f"the proxy refused the tunnel to 127.0.0.1:{self.blocked_port} (HTTP 403 Forbidden)")


class Dante(_ThroughARealProxy, RealReactorTestCase):
    programs = ("danted",)
    scheme = "socks5"
    refused_target = "the SOCKS proxy could not open the tunnel to 127.0.0.1:{port} (connection refused)"

    def start_proxy(self):
        return proxy_servers.start_danted(self, self.dir, blocked_ports=[self.blocked_port])

    @inlineCallbacks
    def test_host_name_resolves_at_the_proxy(self):
        # "localhost" crosses as a name: the hub's name is checked against it as usual
        client = yield self.transfer(self.tls_endpoint(host="localhost", server_name="localhost"), size=1 << 16)
        client.transport.loseConnection()
        yield client.lost

    @inlineCallbacks
    def test_port_not_allowed(self):
        message = yield self.refusal(self.tls_endpoint(port=self.blocked_port))
        self.assertEqual(message, f"the SOCKS proxy could not open the tunnel to 127.0.0.1:{self.blocked_port} "
                                  "(connection not allowed by the proxy's rules)")

    @inlineCallbacks
    def test_proxy_at_an_ipv6_address(self):
        proxy = yield proxy_servers.start_danted(self, self.dir, internal="::1")
        client = yield self.transfer(self.tls_endpoint(url=f"socks5://[::1]:{proxy.port}"), size=1 << 16)
        self.assertEqual(client.transport.transport.getPeer().host, "::1")
        client.transport.loseConnection()
        yield client.lost


class DanteWithUsers(_ThroughARealProxy, RealReactorTestCase):
    programs = ("danted", "useradd", "userdel", "chpasswd")
    scheme = "socks5"
    refused_target = "the SOCKS proxy could not open the tunnel to 127.0.0.1:{port} (connection refused)"

    def start_proxy(self):
        password = "pw:" + os.urandom(6).hex()
        self.user = proxy_servers.system_user(self, password)
        self.userinfo = f"{self.user}:{password.replace(':', '%3A')}@"
        return proxy_servers.start_danted(self, self.dir, method="username")

    @inlineCallbacks
    def test_credentials_wanted(self):
        message = yield self.refusal(self.tls_endpoint(url=self.url(userinfo="")))
        self.assertEqual(message, "the SOCKS proxy accepts none of our authentication methods (it may want a user "
                                  "name and password: socks5://user:pass@host:port)")

    @inlineCallbacks
    def test_wrong_password(self):
        message = yield self.refusal(self.tls_endpoint(url=self.url(userinfo=f"{self.user}:guess@")))
        self.assertEqual(message, f"the SOCKS proxy did not accept the credentials of user '{self.user}' (check "
                                  "the user name and password in the proxy URL)")


class CardThroughAProxy(RealReactorTestCase):
    """
    What the lead wires in, end to end: real cards reach a real hub (its
    TLS, its verification, the link protocol) through tinyproxy, and a
    refusal by the proxy is the card's last error.
    """

    @inlineCallbacks
    def setUp(self):
        RealReactorTestCase.setUp(self)
        proxy_servers.program("tinyproxy")
        hub_dir = os.path.join(self.dir, "hub")
        HubState(hub_dir).add_user("DEFAULT", "alice", b"pw")
        self.hub = HubService(state_dir=hub_dir, listen=["tcp:0:interface=127.0.0.1"])
        self.hub.startService()
        self.addCleanup(self.hub.stopService)
        self.ca = os.path.join(hub_dir, "ca.pem")
        self.hub_port = self.hub.ports[0].getHost().port
        self.proxy = yield proxy_servers.start_tinyproxy(self, self.dir, [self.hub_port], auth=("carol", "pw2"))

    def card(self, n, proxy_url):
        card = Card(reactor, NicSide(FakeTap(reactor)), mac(n), tls_endpoint_for(reactor))
        card.connect(Account(name="t", hub=f"127.0.0.1:{self.hub_port}", user="alice", password="pw",
                             ca_file=self.ca, proxy=proxy_url))
        self.addCleanup(card.disconnect)
        return card

    @inlineCallbacks
    def eventually(self, predicate, what, timeout=15.0):
        for _ in range(int(timeout / 0.02)):
            if predicate():
                return
            yield deferLater(reactor, 0.02, lambda: None)
        self.fail(f"timed out waiting for {what}")

    @inlineCallbacks
    def test_frames_cross_the_hub_through_the_proxy(self):
        url = f"http://carol:pw2@127.0.0.1:{self.proxy.port}"
        one, two = self.card(1, url), self.card(2, url)
        yield self.eventually(lambda: one.state == two.state == "connected", "both cards to connect")
        self.assertEqual(len(self.hub.hub.sessions), 2)
        sent = frame(BROADCAST, mac(1), os.urandom(1000))
        one.lan.tap.os_sends([sent])
        yield self.eventually(lambda: two.lan.tap.written, "the frame to reach the other card")
        self.assertEqual(two.lan.tap.written, [sent])

    @inlineCallbacks
    def test_proxy_refusal_is_the_cards_last_error(self):
        card = self.card(1, f"http://carol:guess@127.0.0.1:{self.proxy.port}")
        yield self.eventually(lambda: card.last_error, "the card to give up an attempt")
        self.assertEqual(card.last_error, "the proxy did not accept the credentials of user 'carol' (check the "
                                          "user name and password in the proxy URL) (HTTP 401 Unauthorized)")
        self.assertEqual(card.state, "connecting")  # and it keeps trying, as for an unreachable hub
        self.assertFalse(card.lan.tap.carrier)
        self.assertEqual(self.hub.hub.sessions, {})
