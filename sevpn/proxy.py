"""
Reaching a hub through a proxy: HTTP CONNECT or SOCKS5.

A card (and, later, a hub cascading to another hub) in a network whose
only way out is a proxy dials the hub through it.  The proxy is a URL:

 - C{http://[user:pass@]host:port}: HTTP CONNECT (RFC 9110 section 9.3.6),
   with Basic credentials when the URL has them;
 - C{socks5://[user:pass@]host:port}: SOCKS5 (RFC 1928), with the
   user/password method (RFC 1929) when the URL has credentials.  The hub's
   host name goes to the proxy as a name (as curl's C{socks5h}), so it
   resolves at the proxy; IPv4 and IPv6 literals go as addresses.

Three layers, each usable alone:

 - L{parse_proxy_url} and L{ProxySpec}: the URL, checked, with a
   C{describe()} that leaves the password out (for logs and status);
 - L{HttpConnectHandshake} and L{Socks5Handshake}: the handshakes, pure
   (bytes in, bytes out, no I/O), failing with a L{ProxyError} whose text
   is a sentence for the user;
 - L{ProxyEndpoint}: the Twisted adapter, an C{IStreamClientEndpoint}.  It
   reaches the proxy with L{HostnameEndpoint}, runs the handshake, and only
   then builds the caller's protocol and connects it to the proxy's TCP
   transport itself, so TLS on top (L{sevpn.tls.TLSClientEndpoint}) runs
   and verifies end to end, and keeps its fast path.  Each attempt is a
   small state machine (connecting, handshaking, tunnel up, failed) with
   one deadline for all of it.

Not public API, fenced here: once the tunnel is up, the TCP transport's
C{protocol} attribute (Twisted's C{tcp.Connection} delivers reads,
half-close and loss through it) is pointed at the caller's protocol, so
the handshake adapter leaves the data path.  A transport without that
attribute (not a reactor TCP connection) keeps the adapter as a relay of
reads and loss instead; writes and producers go to the transport either way.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import struct
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union
from urllib.parse import unquote

from automat import MethodicalMachine
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

HTTP = "http"
SOCKS5 = "socks5"

#: The longest HTTP answer head (status line and headers) taken from a proxy.
MAX_HTTP_ANSWER = 16 * 1024
#: Seconds from C{connect()} until the tunnel must be up.
DEFAULT_TIMEOUT = 10.0

_EXPECTED = "expected http://[user:pass@]host:port or socks5://[user:pass@]host:port"
_HOST_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
_STATUS_LINE = re.compile(rb"HTTP/\d\.\d +(\d{3})(?: +(.*))?")


class ProxyError(Exception):
    """The proxy did not open the tunnel; C{str()} is a sentence saying why."""


def _shown(text: str, limit: int = 80) -> str:
    """Untrusted or secret-bearing text for a message: password hidden, printable, cut, quoted."""
    text = re.sub(r"(://[^:/@]*:).*@", r"\1***@", text)
    text = "".join(c if c.isprintable() else "?" for c in text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return repr(text)


def _printable(data: bytes, limit: int = 60) -> str:
    """Bytes from the network as plain text for a sentence (no quotes), cut."""
    text = "".join(chr(b) if 32 <= b < 127 else "?" for b in data[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Credentials:
    """A user name and password for the proxy (from the proxy URL); the password never shows in a repr."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class ProxySpec:
    """
    A proxy to dial through.  Build it with L{parse_proxy_url}.

    @ivar scheme: C{"http"} (CONNECT) or C{"socks5"}.
    @ivar host: a host name or an IP literal (IPv6 without brackets).
    """

    scheme: str
    host: str
    port: int
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)

    @property
    def credentials(self) -> Optional[Credentials]:
        if self.username is None:
            return None
        return Credentials(self.username, self.password or "")

    @property
    def address(self) -> str:
        """C{host:port}, with an IPv6 host in brackets."""
        return _authority(self.host, self.port)

    def describe(self) -> str:
        """The URL without the password: for logs and status."""
        user = f"{self.username}@" if self.username is not None else ""
        return f"{self.scheme}://{user}{self.address}"

    def handshake(self, target_host: str, target_port: int) -> Union["HttpConnectHandshake", "Socks5Handshake"]:
        """A fresh handshake asking this proxy for a tunnel to the target."""
        kind = HttpConnectHandshake if self.scheme == HTTP else Socks5Handshake
        return kind(target_host, target_port, self.credentials)


def parse_proxy_url(text: str) -> ProxySpec:
    """
    C{http://[user:pass@]host:port} or C{socks5://[user:pass@]host:port};
    an IPv6 host in brackets; user and password percent-encoded where they
    hold C{:}, C{@}, C{/} or C{%}.

    @raise ValueError: with one sentence naming the problem and the form.
    """
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a proxy URL ({_EXPECTED})")
    text = text.strip()
    shown = _shown(text)
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if scheme == "socks5h":
        raise ValueError(f"{shown} is not a proxy URL: write socks5:// (the hub's name always resolves at the proxy)")
    if not sep or scheme not in (HTTP, SOCKS5):
        raise ValueError(f"{shown} is not a proxy URL ({_EXPECTED})")
    userinfo, at, hostport = rest.rpartition("@")
    if hostport.endswith("/"):
        hostport = hostport[:-1]
    if not hostport:
        raise ValueError(f"the proxy URL {shown} has no host ({_EXPECTED})")
    if any(c in hostport for c in "/?#"):
        raise ValueError(f"the proxy URL {shown} has a path or query; it must end after the port ({_EXPECTED})")
    host, port = _host_and_port(hostport, shown)
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        try:
            username = unquote(user, errors="strict")
            password = unquote(secret, errors="strict") if colon else ""
        except UnicodeDecodeError:
            raise ValueError(f"the user name or password in the proxy URL {shown} is not UTF-8 once percent-decoded")
        if not username:
            raise ValueError(f"the proxy URL {shown} has credentials without a user name ({_EXPECTED})")
        if scheme == HTTP and ":" in username:
            raise ValueError(f"the user name in the proxy URL {shown} holds a ':', "
                             "which HTTP Basic credentials cannot carry")
        if scheme == SOCKS5:
            for what, value in (("user name", username), ("password", password)):
                if len(value.encode("utf-8")) > 255:
                    raise ValueError(f"the {what} in the proxy URL {shown} is longer than the 255 bytes SOCKS5 allows")
    return ProxySpec(scheme, host, port, username, password)


def _host_and_port(hostport: str, shown: str) -> Tuple[str, int]:
    if hostport.startswith("["):
        end = hostport.find("]")
        host, rest = hostport[1:end], hostport[end + 1 :]
        if end < 0 or not _is_ipv6(host):
            raise ValueError(f"the proxy URL {shown} has no valid IPv6 address in brackets ({_EXPECTED})")
        if not rest.startswith(":"):
            raise ValueError(f"the proxy URL {shown} has no port ({_EXPECTED})")
        port = rest[1:]
    else:
        host, colon, port = hostport.rpartition(":")
        if not colon:
            raise ValueError(f"the proxy URL {shown} has no port ({_EXPECTED})")
        if ":" in host:
            raise ValueError(f"the proxy URL {shown} has an IPv6 address without brackets "
                             "(write http://[2001:db8::1]:3128)")
        if not host:
            raise ValueError(f"the proxy URL {shown} has no host ({_EXPECTED})")
        if not _HOST_NAME.fullmatch(host):
            raise ValueError(f"the proxy URL {shown} has no valid host name ({_EXPECTED})")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"the port in the proxy URL {shown} is not a number from 1 to 65535")
    return host, int(port)


def _is_ipv6(host: str) -> bool:
    try:
        return "%" not in host and isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_target(host: str, port: int) -> None:
    """The hub's host (a name or an IP literal, IPv6 without brackets) and port."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"{port!r} is not a port for the hub (expected a number from 1 to 65535)")
    if not isinstance(host, str) or not host or len(host) > 255:
        raise ValueError(f"{host!r} is not a host name for the hub")
    if ":" in host:
        if not _is_ipv6(host):
            raise ValueError(f"{_shown(host)} is not a host name or IP address for the hub")
    elif any(not c.isprintable() or c.isspace() or c in "/?#@[]" for c in host):
        raise ValueError(f"{_shown(host)} is not a host name or IP address for the hub")


class HttpConnectHandshake:
    """
    HTTP CONNECT, without I/O: L{start} gives the request; L{feed} takes
    the proxy's answer as it comes and says when the tunnel is up, with the
    bytes that followed the answer (they are the tunnel's).  Interim (1xx)
    answers are skipped; any 2xx opens the tunnel.  At most
    L{MAX_HTTP_ANSWER} bytes of answer heads are read.
    """

    def __init__(self, target_host: str, target_port: int, credentials: Optional[Credentials] = None) -> None:
        _check_target(target_host, target_port)
        self.target = _authority(target_host, target_port)
        self.credentials = credentials
        self._answer = bytearray()
        self._head_bytes = 0  # of answers already read (interim ones)
        self._state = "new"

    def start(self) -> bytes:
        """
        The CONNECT request for the hub's address, with Basic proxy
        authorization when there are credentials; once.
        """
        if self._state != "new":
            raise RuntimeError("the handshake has started already")
        self._state = "waiting"
        lines = [f"CONNECT {self.target} HTTP/1.1", f"Host: {self.target}"]
        if self.credentials is not None:
            pair = f"{self.credentials.username}:{self.credentials.password}".encode("utf-8")
            lines.append("Proxy-Authorization: Basic " + base64.b64encode(pair).decode("ascii"))
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")

    def data_to_send(self) -> bytes:
        """Bytes to send to the proxy after L{feed}: none for CONNECT."""
        return b""

    def feed(self, data: bytes) -> Tuple[bool, bytes]:
        """
        Take bytes from the proxy.

        @return: C{(done, leftover)}: C{done} once the tunnel is up, then
            C{leftover} is what came after the answer (tunnel data).
        @raise ProxyError: the proxy refused, or did not speak HTTP.
        """
        if self._state != "waiting":
            raise RuntimeError(f"feed() while the handshake is {self._state}")
        answer = self._answer
        search_from = max(0, len(answer) - 3)
        answer += data
        while True:
            if len(answer) >= 5 and not answer.startswith(b"HTTP/"):
                self._fail(f"the proxy did not answer in HTTP (it said {_printable(bytes(answer[:20]))!r}); "
                           "if it is a SOCKS proxy, write socks5://host:port")
            end, gap = self._head_end(search_from)
            if end < 0:
                if self._head_bytes + len(answer) > MAX_HTTP_ANSWER:
                    self._fail(f"the proxy's answer is longer than {MAX_HTTP_ANSWER // 1024} KiB; "
                               "it is not a tunnel")
                return False, b""
            self._head_bytes += end + gap
            if self._head_bytes > MAX_HTTP_ANSWER:
                self._fail(f"the proxy's answer is longer than {MAX_HTTP_ANSWER // 1024} KiB; it is not a tunnel")
            status, reason = self._status(bytes(answer[:end]))
            del answer[: end + gap]
            if 100 <= status < 200:
                search_from = 0
                continue
            if 200 <= status < 300:
                self._state = "done"
                leftover = bytes(answer)
                answer.clear()
                return True, leftover
            self._fail(self._refusal(status, reason))

    def _head_end(self, start: int) -> Tuple[int, int]:
        """Where the answer's head ends (a blank line), and the blank line's length."""
        crlf = self._answer.find(b"\r\n\r\n", start)
        lf = self._answer.find(b"\n\n", start)
        if lf >= 0 and (crlf < 0 or lf < crlf):
            return lf, 2
        return crlf, 4 if crlf >= 0 else 0

    def _status(self, head: bytes) -> Tuple[int, str]:
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            self._fail(f"the proxy's answer has no HTTP status line (it said {_printable(line)!r})")
        return int(match.group(1)), _printable(match.group(2) or b"").strip()

    def _refusal(self, status: int, reason: str) -> str:
        said = f"HTTP {status} {reason}".rstrip()
        if status in (401, 407):  # tinyproxy answers wrong credentials with 401
            if self.credentials is None:
                return ("the proxy wants credentials (give them in the proxy URL: "
                        f"http://user:pass@host:port) ({said})")
            return (f"the proxy did not accept the credentials of user {_shown(self.credentials.username, 40)} "
                    f"(check the user name and password in the proxy URL) ({said})")
        if status in (500, 502, 503, 504):
            return f"the proxy could not open the tunnel to {self.target} ({said})"
        return f"the proxy refused the tunnel to {self.target} ({said})"

    def _fail(self, sentence: str) -> None:
        self._state = "failed"
        self._answer.clear()
        raise ProxyError(sentence)


_NO_AUTH = 0x00
_USER_PASS = 0x02
_NO_ACCEPTABLE = 0xFF

#: RFC 1928's reply codes, as the reason in a sentence.
SOCKS5_REPLIES = {
    1: "general SOCKS server failure",
    2: "connection not allowed by the proxy's rules",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "the proxy does not support the CONNECT command",
    8: "address type not supported",
}


class Socks5Handshake:
    """
    SOCKS5 CONNECT (RFC 1928), with user/password authentication (RFC
    1929) offered when credentials are given, without I/O.  L{start} gives
    the greeting; after each L{feed}, L{data_to_send} has the next message
    for the proxy.  The hub's name goes to the proxy as a domain name, so
    it resolves there; IP literals go as IPv4 or IPv6 addresses.  Every
    message is bounded by the protocol (a reply is at most 262 bytes).
    """

    def __init__(self, target_host: str, target_port: int, credentials: Optional[Credentials] = None) -> None:
        _check_target(target_host, target_port)
        self.target = _authority(target_host, target_port)
        self.credentials = credentials
        self._by_name = False
        self._request = b"\x05\x01\x00" + self._address(target_host) + struct.pack("!H", target_port)
        if credentials is not None:
            user, password = credentials.username.encode("utf-8"), credentials.password.encode("utf-8")
            if not 0 < len(user) < 256 or len(password) > 255:
                raise ValueError("a SOCKS5 user name must be 1 to 255 bytes, a password at most 255")
            self._auth = bytes([1, len(user)]) + user + bytes([len(password)]) + password
        self._buffer = bytearray()
        self._out = bytearray()
        self._state = "new"

    def _address(self, host: str) -> bytes:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            try:
                name = host.encode("idna")
            except UnicodeError:
                raise ValueError(f"{_shown(host)} is not a host name the SOCKS proxy can be given")
            if len(name) > 255:
                raise ValueError(f"the host name {_shown(host)} is longer than the 255 bytes SOCKS5 allows")
            self._by_name = True
            return b"\x03" + bytes([len(name)]) + name
        return (b"\x01" if address.version == 4 else b"\x04") + address.packed

    def start(self) -> bytes:
        """
        The greeting: the authentication methods offered (none, and
        user/password when there are credentials); once.
        """
        if self._state != "new":
            raise RuntimeError("the handshake has started already")
        self._state = "method"
        methods = [_NO_AUTH] if self.credentials is None else [_NO_AUTH, _USER_PASS]
        return bytes([5, len(methods)] + methods)

    def data_to_send(self) -> bytes:
        """What to send to the proxy now (the credentials, the CONNECT request), once."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def feed(self, data: bytes) -> Tuple[bool, bytes]:
        """
        Take bytes from the proxy.

        @return: C{(done, leftover)}: C{done} once the tunnel is up, then
            C{leftover} is what came after the proxy's reply (tunnel data).
        @raise ProxyError: the proxy refused, or did not speak SOCKS5.
        """
        if self._state not in ("method", "auth", "reply"):
            raise RuntimeError(f"feed() while the handshake is {self._state}")
        buf = self._buffer
        buf += data
        while len(buf) >= 2:
            if self._state == "method":
                self._check_version(buf[0])
                method = buf[1]
                del buf[:2]
                self._choose(method)
            elif self._state == "auth":
                # RFC 1929's version byte is 1; some servers say 5: only the status counts.
                status = buf[1]
                del buf[:2]
                if status != 0:
                    self._fail(f"the SOCKS proxy did not accept the credentials of user "
                               f"{_shown(self.credentials.username, 40)} (check the user name and password "
                               "in the proxy URL)")
                self._out += self._request
                self._state = "reply"
            else:
                self._check_version(buf[0])
                if buf[1] != 0:
                    self._fail(self._refusal(buf[1]))
                if len(buf) < 5:
                    return False, b""
                kind = buf[3]
                sizes = {1: 4, 4: 16, 3: 1 + buf[4]}
                if kind not in sizes:
                    self._fail(f"the SOCKS proxy's reply has an unknown address type ({kind})")
                size = 4 + sizes[kind] + 2
                if len(buf) < size:
                    return False, b""
                leftover = bytes(buf[size:])
                buf.clear()
                self._state = "done"
                return True, leftover
        return False, b""

    def _check_version(self, version: int) -> None:
        if version != 5:
            hint = "; if it is an HTTP proxy, write http://host:port" if version == ord("H") else ""
            self._fail(f"the proxy did not answer in SOCKS5 (version byte {version}){hint}")

    def _choose(self, method: int) -> None:
        if method == _NO_AUTH:
            self._out += self._request
            self._state = "reply"
        elif method == _USER_PASS and self.credentials is not None:
            self._out += self._auth
            self._state = "auth"
        elif method == _NO_ACCEPTABLE:
            if self.credentials is None:
                self._fail("the SOCKS proxy accepts none of our authentication methods (it may want a user "
                           "name and password: socks5://user:pass@host:port)")
            self._fail("the SOCKS proxy accepts none of our authentication methods (we offer none and "
                       "user name/password)")
        else:
            self._fail(f"the SOCKS proxy chose an authentication method we did not offer ({method})")

    def _refusal(self, code: int) -> str:
        reason = SOCKS5_REPLIES.get(code, f"reply code {code}")
        if code == 8 and self._by_name:
            reason += ": it does not take host names; give the hub as an IP address"
        return f"the SOCKS proxy could not open the tunnel to {self.target} ({reason})"

    def _fail(self, sentence: str) -> None:
        self._state = "failed"
        self._buffer.clear()
        self._out.clear()
        raise ProxyError(sentence)


def _unreachable(proxy: str, failure: Failure) -> str:
    """Why the proxy itself could not be reached, as a sentence."""
    value = failure.value
    if isinstance(value, error.ConnectionRefusedError):
        reason = "connection refused; is it running?"
    elif isinstance(value, error.DNSLookupError):
        reason = "its name does not resolve"
    elif isinstance(value, (error.TimeoutError, error.TCPTimedOutError)):
        reason = "no answer; timed out"
    elif isinstance(value, error.NoRouteError):
        reason = "no route to it"
    else:
        reason = _printable(str(value).strip().encode("utf-8", "replace"), 100) or type(value).__name__
    return f"cannot reach the proxy at {proxy} ({reason})"


class _TunnelAttempt:
    """
    One C{ProxyEndpoint.connect()}: reach the proxy, run the handshake,
    then hand the stream to the caller's protocol.  C{result} fires once,
    with whatever comes first: the tunnel, a failure, the deadline, a cancel.
    """

    _machine = MethodicalMachine()
    log = Logger()

    def __init__(self, clock, spec: ProxySpec, handshake, factory, timeout: float) -> None:
        self.clock = clock
        self.spec = spec
        self.handshake = handshake
        self.factory = factory
        self.timeout = timeout
        self.result = Deferred(lambda _: self.cancelled())
        self.heard = 0  # bytes from the proxy during the handshake
        self._connecting: Optional[Deferred] = None
        self._deadline = None
        self._wire: Optional[_HandshakeProtocol] = None

    def start(self, endpoint) -> Deferred:
        """
        Dial the proxy through C{endpoint} and start the deadline; L{result},
        which fires with the caller's protocol or fails.
        """
        self._deadline = self.clock.callLater(self.timeout, self.deadline_passed)
        factory = Factory.forProtocol(lambda: _HandshakeProtocol(self))
        factory.noisy = False
        self._connecting = endpoint.connect(factory)
        self._connecting.addErrback(self.tcp_failed)
        return self.result

    # the state machine -------------------------------------------------------

    @_machine.state(initial=True)
    def connecting(self):
        """Reaching the proxy over TCP."""

    @_machine.state()
    def handshaking(self):
        """Connected to the proxy; asking it for the tunnel."""

    @_machine.state()
    def tunnel_up(self):
        """The caller's protocol has the connection; this attempt is over."""

    @_machine.state()
    def failed(self):
        """C{result} has failed (or was cancelled); the connection is going."""

    @_machine.input()
    def tcp_connected(self, wire: "_HandshakeProtocol"):
        """The proxy took the TCP connection; C{wire} is our protocol on it."""

    @_machine.input()
    def tcp_failed(self, failure: Failure):
        """The proxy could not be reached."""

    @_machine.input()
    def received(self, data: bytes):
        """Bytes from the proxy, before the tunnel is up."""

    @_machine.input()
    def _tunnel_ready(self, protocol, leftover: bytes):
        """The proxy opened the tunnel; C{protocol} is the caller's, built."""

    @_machine.input()
    def _broken(self, failure: Failure):
        """The proxy refused, or the caller's factory gave no protocol."""

    @_machine.input()
    def lost(self, reason: Failure):
        """The connection to the proxy closed before the tunnel was up."""

    @_machine.input()
    def deadline_passed(self):
        """The tunnel is not up within the timeout."""

    @_machine.input()
    def cancelled(self):
        """The caller cancelled C{result}; it fails with CancelledError."""

    @_machine.output()
    def _send_greeting(self, wire) -> None:
        self._wire = wire
        wire.transport.write(self.handshake.start())

    @_machine.output()
    def _feed(self, data: bytes) -> None:
        self.heard += len(data)
        try:
            done, leftover = self.handshake.feed(data)
        except ProxyError:
            self._broken(Failure())
            return
        reply = self.handshake.data_to_send()
        if reply:
            self._wire.transport.write(reply)
        if not done:
            return
        try:
            protocol = self.factory.buildProtocol(self._wire.transport.getPeer())
        except BaseException:
            self._broken(Failure())
            return
        if protocol is None:
            self._broken(Failure(error.NoProtocol()))
            return
        self._tunnel_ready(protocol, leftover)

    @_machine.output()
    def _hand_over(self, protocol, leftover: bytes) -> None:
        """Give the caller's protocol the proxy's transport itself."""
        transport = self._wire.transport
        if ITCPTransport.providedBy(transport) and hasattr(transport, "protocol"):
            transport.protocol = protocol  # reads now reach it straight from the socket
        else:
            self._wire.relay_to = protocol
        self.log.info("tunnel to {target} through the proxy {proxy} is up",
                      target=self.handshake.target, proxy=self.spec.describe())
        try:
            protocol.makeConnection(transport)
            if leftover:
                protocol.dataReceived(leftover)
        finally:
            self.result.callback(protocol)

    @_machine.output()
    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    @_machine.output()
    def _fail_unreachable(self, failure: Failure) -> None:
        self.result.errback(ProxyError(_unreachable(self.spec.address, failure)))

    @_machine.output()
    def _fail_no_connection(self) -> None:
        self.result.errback(ProxyError(
            f"cannot reach the proxy at {self.spec.address} (no connection within {self.timeout:g} s)"))

    @_machine.output()
    def _fail_slow_handshake(self) -> None:
        self.result.errback(ProxyError(
            f"the proxy at {self.spec.address} did not open the tunnel to {self.handshake.target} "
            f"within {self.timeout:g} s"))

    @_machine.output()
    def _fail_closed(self) -> None:
        how = "in the middle of its answer" if self.heard else "without answering"
        self.result.errback(ProxyError(f"the proxy at {self.spec.address} closed the connection {how}"))

    @_machine.output()
    def _fail_with(self, failure: Failure) -> None:
        self.result.errback(failure)

    @_machine.output()
    def _give_up_connecting(self) -> None:
        self._connecting.cancel()

    @_machine.output()
    def _abort(self) -> None:
        self._wire.transport.abortConnection()

    @_machine.output()
    def _abort_late_connection(self, wire) -> None:
        wire.transport.abortConnection()

    @_machine.output()
    def _ignore(self) -> None:
        pass

    connecting.upon(tcp_connected, enter=handshaking, outputs=[_send_greeting])
    connecting.upon(tcp_failed, enter=failed, outputs=[_stop_deadline, _fail_unreachable])
    connecting.upon(deadline_passed, enter=failed, outputs=[_fail_no_connection, _give_up_connecting])
    connecting.upon(cancelled, enter=failed, outputs=[_stop_deadline, _give_up_connecting])

    handshaking.upon(received, enter=handshaking, outputs=[_feed])
    handshaking.upon(_tunnel_ready, enter=tunnel_up, outputs=[_stop_deadline, _hand_over])
    handshaking.upon(_broken, enter=failed, outputs=[_stop_deadline, _fail_with, _abort])
    handshaking.upon(lost, enter=failed, outputs=[_stop_deadline, _fail_closed])
    handshaking.upon(deadline_passed, enter=failed, outputs=[_fail_slow_handshake, _abort])
    handshaking.upon(cancelled, enter=failed, outputs=[_stop_deadline, _abort])
    # the endpoint's Deferred fires after the connection is made: nothing to do
    handshaking.upon(tcp_failed, enter=handshaking, outputs=[_ignore])

    # what still comes from a connection being given up
    failed.upon(tcp_connected, enter=failed, outputs=[_abort_late_connection])
    failed.upon(tcp_failed, enter=failed, outputs=[_ignore])
    failed.upon(received, enter=failed, outputs=[_ignore])
    failed.upon(lost, enter=failed, outputs=[_ignore])


class _HandshakeProtocol(Protocol):
    """Talks to the proxy until the tunnel is up; then, on transports it cannot hand over, relays."""

    def __init__(self, attempt: _TunnelAttempt) -> None:
        self.attempt = attempt
        self.relay_to: Optional[Protocol] = None

    def connectionMade(self) -> None:
        self.attempt.tcp_connected(self)

    def dataReceived(self, data: bytes) -> None:
        if self.relay_to is not None:
            self.relay_to.dataReceived(data)
        else:
            self.attempt.received(data)

    def connectionLost(self, reason: Failure = None) -> None:
        if self.relay_to is not None:
            self.relay_to.connectionLost(reason)
        else:
            self.attempt.lost(reason)


@implementer(IStreamClientEndpoint)
class ProxyEndpoint:
    """
    Connections to C{target_host:target_port} through a proxy.

    C{connect(factory)} fires with the factory's protocol once the tunnel
    is up (the protocol is built and connected only then; what the proxy
    sent after its answer reaches it first), or fails with a L{ProxyError}
    whose text is a sentence; cancelling it aborts the attempt.  The
    protocol's transport is the TCP connection to the proxy, so its
    C{getPeer()} is the proxy's address.

    @param timeout: seconds for the whole attempt: reaching the proxy and
        the handshake.
    @param proxy_endpoint: how to reach the proxy (default:
        L{HostnameEndpoint} to the spec's host and port, IPv4 and IPv6).
    @raise ValueError: the target cannot be asked of this proxy.
    """

    def __init__(self, reactor, spec: ProxySpec, target_host: str, target_port: int,
                 timeout: float = DEFAULT_TIMEOUT, *, proxy_endpoint=None) -> None:
        spec.handshake(target_host, target_port)  # check the target now
        self.reactor = reactor
        self.spec = spec
        self.target_host = target_host
        self.target_port = target_port
        self.timeout = timeout
        if proxy_endpoint is None:
            proxy_endpoint = HostnameEndpoint(reactor, spec.host, spec.port, timeout=timeout)
        self.proxy_endpoint = proxy_endpoint

    def __repr__(self) -> str:
        return f"<ProxyEndpoint {_authority(self.target_host, self.target_port)} via {self.spec.describe()}>"

    def connect(self, factory) -> Deferred:
        handshake = self.spec.handshake(self.target_host, self.target_port)
        attempt = _TunnelAttempt(self.reactor, self.spec, handshake, factory, self.timeout)
        return attempt.start(self.proxy_endpoint)


def endpoint_for(reactor, proxy_url: Optional[str], host: str, port: int,
                 timeout: float = DEFAULT_TIMEOUT) -> IStreamClientEndpoint:
    """
    How to reach C{host:port}: through the proxy C{proxy_url} when one is
    given (see L{parse_proxy_url}), else directly with L{HostnameEndpoint}.

    @raise ValueError: a bad proxy URL or target, as a sentence.
    """
    if not proxy_url:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    return ProxyEndpoint(reactor, parse_proxy_url(proxy_url), host, port, timeout)


__all__ = [
    "Credentials", "DEFAULT_TIMEOUT", "HttpConnectHandshake", "MAX_HTTP_ANSWER", "ProxyEndpoint",
    "ProxyError", "ProxySpec", "Socks5Handshake", "endpoint_for", "parse_proxy_url",
]
