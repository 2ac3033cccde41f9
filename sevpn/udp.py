"""
UDP sockets for the channels (L{sevpn.channel}): the hub's one port that
every session's channel shares, and a card's socket toward its hub.

L{DatagramSocket} is a reactor reader, as L{sevpn.tapdevice.TapPort} is:
each wakeup reads every waiting datagram (within a budget) into one
buffer, hands each to its receiver at once (the channel opens it into a
fresh plaintext, so the buffer is free again), and then tells the
receiver the read is done, so the frames of one wakeup are switched and
flushed together.  Sending is one C{send}/C{sendto} per datagram; a full
socket buffer drops the datagram (counted by the channel), as a full NIC
queue would.  IPv4 datagrams are sent without DF: what does not fit the
path is fragmented by IP rather than lost.

A hub's UDP address is written C{udp:PORT[:interface=ADDRESS]}, as
Twisted's endpoint strings are; by default it follows the first TCP
C{--listen} (L{default_spec}).
"""

from __future__ import annotations

import errno
import re
import socket
from typing import Optional, Tuple

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from sevpn import busypoll, datagram
from sevpn.channel import IDatagramTransport

#: Datagrams read per wakeup at most, so a flood cannot starve the rest.
READ_BUDGET = 256
#: Socket buffers asked for (the kernel may give less): a card sends a
#: TAP read of up to 256 frames back to back.
SEND_BUFFER = 1 << 20
RECEIVE_BUFFER = 4 << 20
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
_IP_PMTUDISC_DONT = getattr(socket, "IP_PMTUDISC_DONT", 0)
#: Errors of a send that say the socket lost its peer (C{ss -K} destroys
#: UDP sockets too): it is connected again, and the datagram sent once more.
_DISCONNECTED = {errno.EDESTADDRREQ, errno.ENOTCONN}


class SpecError(ValueError):
    """A UDP address that cannot be used; the message says why."""


def parse_spec(spec: str) -> Tuple[str, int]:
    """C{udp:PORT[:interface=ADDRESS]} (or C{udp:port=PORT:...}) as (interface, port)."""
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", spec)]
    if parts[0] != "udp":
        raise SpecError(f"{spec!r} is not a UDP address (udp:PORT[:interface=ADDRESS])")
    interface, port = "", None
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if not eq:
            key, value = "port", key
        if key == "port" and port is None:
            try:
                port = int(value)
            except ValueError:
                port = -1
            if not 0 <= port < 65536:
                raise SpecError(f"{spec!r}: {value!r} is not a port number")
        elif key == "interface":
            interface = value
        else:
            raise SpecError(f"{spec!r}: unknown or repeated parameter {key!r}")
    if port is None:
        raise SpecError(f"{spec!r} names no port")
    return interface, port


def default_spec(listen: str) -> Optional[str]:
    """The UDP address beside a TCP C{--listen} endpoint (same port and interface), or None."""
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", listen)]
    if parts[0] not in ("tcp", "tcp6"):
        return None
    interface = "::" if parts[0] == "tcp6" else ""
    port = None
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if not eq:
            key, value = "port", key
        if key == "port" and port is None:
            port = value
        elif key == "interface":
            interface = value
    if port is None or not port.isdigit():
        return None
    spec = f"udp:{port}"
    if interface:
        spec += ":interface=" + interface.replace(":", "\\:")
    return spec


def _tune(sock: socket.socket) -> None:
    for force, plain, size in ((_SO_SNDBUFFORCE, socket.SO_SNDBUF, SEND_BUFFER),
                               (_SO_RCVBUFFORCE, socket.SO_RCVBUF, RECEIVE_BUFFER)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:  # not root (the hub's unit): what the system allows
            try:
                sock.setsockopt(socket.SOL_SOCKET, plain, size)
            except OSError:
                pass
    if sock.family == socket.AF_INET:
        try:
            sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DONT)
        except OSError:
            pass
    sock.setblocking(False)


@implementer(IReadDescriptor, IDatagramTransport)
class DatagramSocket:
    """
    A UDP socket in the reactor (see the module docstring).

    @param receiver: has C{datagram_received(data, address)} (C{data} is
        valid during the call only) and C{read_done()}.
    """

    log = Logger()

    def __init__(self, reactor, sock: socket.socket, receiver) -> None:
        self.reactor = reactor
        self.socket = sock
        self.receiver = receiver
        #: A card's socket: the hub's address it is connected to.
        self.remote: Optional[tuple] = None
        self.reading = False
        self.receive_errors = 0
        self.send_errors = 0
        self._errors_seen: set = set()
        self._buffer = bytearray(datagram.MAX_UDP_PAYLOAD + 1)
        self._view = memoryview(self._buffer)

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1]

    def start_reading(self) -> None:
        if not self.reading and self.socket.fileno() >= 0:
            self.reading = True
            self.reactor.addReader(self)

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return "udp"

    def connectionLost(self, reason) -> None:
        self.reading = False

    def doRead(self) -> None:
        """
        Hand up to L{READ_BUDGET} datagrams to the receiver, then tell it the
        read is done (so it delivers and acknowledges once per read).  Each
        datagram is a view of one reused buffer: the receiver uses it before the
        next.  An error for an earlier send (ICMP) is counted; reading goes on.
        """
        receive, view, receiver = self.socket.recvfrom_into, self._view, self.receiver
        got = False
        for _ in range(READ_BUDGET):
            try:
                n, address = receive(view)
            except BlockingIOError:
                break
            except OSError:
                # an ICMP error for an earlier send (port unreachable, ...):
                # liveness notices; the socket goes on
                self.receive_errors += 1
                continue
            receiver.datagram_received(view[:n], address)
            got = True
        if got:
            busypoll.activity()
            receiver.read_done()

    def send(self, data, address=None) -> bool:
        """
        Send one datagram; False if it was dropped.  No error of a send
        ever leaves here: whatever the kernel says (a full buffer, no
        route, a refusal, a destroyed socket) costs this datagram, and the
        channel's liveness notices what lasts.
        """
        try:
            if self.remote is not None or address is None:
                self.socket.send(data)
            else:
                self.socket.sendto(data, address)
        except OSError as e:
            if e.errno in _DISCONNECTED and self.remote is not None:
                return self._reconnect_and_send(data)
            self.send_errors += 1
            if e.errno not in self._errors_seen and len(self._errors_seen) < 16:
                self._errors_seen.add(e.errno)
                self.log.info("UDP send: {why} (datagrams are dropped while it lasts)",
                              why=e.strerror or str(e))
            return False
        return True

    def _reconnect_and_send(self, data) -> bool:
        try:
            self.socket.connect(self.remote)
            self.socket.send(data)
        except OSError:
            self.send_errors += 1
            return False
        return True

    def close(self) -> None:
        if self.reading:
            self.reading = False
            self.reactor.removeReader(self)
        self.socket.close()


def listen(reactor, spec: str, receiver) -> DatagramSocket:
    """
    Bind the hub's UDP port; raises L{SpecError} or OSError with a
    sentence.  An interface of C{::} takes IPv4 too (as C{tcp6} does not,
    but a UDP port beside it should).
    """
    interface, port = parse_spec(spec)
    v6 = ":" in interface
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if v6 and interface == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((interface or "0.0.0.0", port))
    except OSError:
        sock.close()
        raise
    return adopt(reactor, sock, receiver)


def adopt(reactor, sock: socket.socket, receiver) -> DatagramSocket:
    """A bound UDP socket made elsewhere (a hub worker's, of a C{SO_REUSEPORT} group) read in the reactor."""
    try:
        _tune(sock)
    except OSError:
        sock.close()
        raise
    reader = DatagramSocket(reactor, sock, receiver)
    reader.start_reading()
    return reader


def connect(reactor, host: str, port: int, receiver) -> DatagramSocket:
    """A card's socket, connected to the hub's UDP port (fewer syscalls, and only the hub's datagrams)."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    sock = socket.socket(info[0], socket.SOCK_DGRAM)
    try:
        _tune(sock)
        sock.connect(info[4])
    except OSError:
        sock.close()
        raise
    reader = DatagramSocket(reactor, sock, receiver)
    reader.remote = info[4]
    reader.start_reading()
    return reader
