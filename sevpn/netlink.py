"""
Bridge FDB entries over rtnetlink: the hub's MACs, reflected into the
node bridge so that FRR advertises them (EVPN type-2) at once.

The codec half is pure: it encodes the two requests the hub needs, as
C{bridge(8)} encodes them, and decodes what the kernel answers.

 - add: C{bridge fdb replace MAC dev TAP master static} --
   C{RTM_NEWNEIGH}, C{NLM_F_REQUEST|NLM_F_ACK|NLM_F_REPLACE|NLM_F_CREATE},
   C{AF_BRIDGE}, state C{NUD_NOARP|NUD_REACHABLE}, flags C{NTF_MASTER},
   C{NDA_LLADDR}.  I{replace}, not I{add}, so that an entry the bridge
   learned by itself (or another worker's entry for a card that moved) is
   taken over instead of failing with "File exists".  The kernel stores the
   same entry for either (C{bridge fdb show}: C{... master BR static}).
   Not C{NUD_PERMANENT}: that makes a I{local} entry (frames to it are
   delivered to the bridge itself) which zebra ignores.
 - remove: C{bridge fdb del MAC dev TAP master} -- C{RTM_DELNEIGH}.  The
   kernel deletes the entry only while it points at this TAP, so a worker
   can never remove the entry of a card that moved to another worker.

L{FdbReflector} is the reactor adapter: one non-blocking C{NETLINK_ROUTE}
socket, changes batched into one C{sendmsg} per reactor turn (the kernel
handles each message of a batch in turn and acknowledges each), at most
L{WINDOW} unacknowledged, the acknowledgements read when the socket is
readable.  No subprocess, no thread.  The kernel runs a request inside the
C{sendmsg} call under its routing lock; that is microseconds unless another
program holds the lock.
"""

from __future__ import annotations

import errno as errnos
import os
import socket
import struct
from collections import OrderedDict
from typing import Dict, List, NamedTuple, Optional, Tuple

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from sevpn.mac import format_mac

# linux/netlink.h
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLM_F_DUMP = 0x300
#: In an acknowledgement: the request is not echoed / extended-ack TLVs follow.
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK = 270
NETLINK_CAP_ACK, NETLINK_EXT_ACK = 10, 11
# linux/rtnetlink.h, linux/neighbour.h
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
NDA_DST, NDA_LLADDR, NDA_VLAN, NDA_MASTER = 1, 2, 5, 9
NTF_SELF, NTF_MASTER, NTF_EXT_LEARNED, NTF_STICKY = 0x02, 0x04, 0x10, 0x40
NUD_REACHABLE, NUD_STALE, NUD_NOARP, NUD_PERMANENT = 0x02, 0x04, 0x40, 0x80
AF_BRIDGE = 7

_NLMSGHDR = struct.Struct("=IHHII")
_NDMSG = struct.Struct("=BxxxiHBB")
_RTATTR = struct.Struct("=HH")
_ERROR = struct.Struct("=i")

#: Requests sent and not yet acknowledged, at most.  Each acknowledgement
#: takes about 1 KiB of the socket's receive buffer until it is read.
WINDOW = 64
#: Changes waiting to be sent, at most (MACs); past that they are dropped
#: and counted.  Four virtual hubs' worth of the switch's default table.
MAX_PENDING = 16384
RCVBUF = 1 << 20
#: Seconds between two log lines about the same kind of failure.
LOG_INTERVAL = 10.0


class NetlinkError(Exception):
    """Bytes that are not a well-formed netlink message; the message says why."""


class Message(NamedTuple):
    """One netlink message: its header's type, flags, sequence number and port id, and its body."""

    type: int
    flags: int
    seq: int
    pid: int
    body: bytes


class Ack(NamedTuple):
    """The kernel's answer to one request: errno 0 is success."""

    seq: int
    errno: int
    #: The kernel's own explanation (extended ack), or "".
    text: str

    def sentence(self) -> str:
        """The error as words: C{"No such device"}, with the kernel's detail when it gave one."""
        words = os.strerror(self.errno) if self.errno else "success"
        return f"{words} ({self.text})" if self.text else words


class Neighbour(NamedTuple):
    """
    A bridge FDB entry as an C{RTM_*NEIGH} message carries it: the interface,
    state and flags, the MAC (C{NDA_LLADDR}) and the bridge's ifindex
    (C{NDA_MASTER}), None when absent.
    """

    family: int
    ifindex: int
    state: int
    flags: int
    lladdr: Optional[bytes]
    master: Optional[int]


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    size = _RTATTR.size + len(payload)
    return _RTATTR.pack(size, kind) + payload + b"\0" * (_align(size) - size)


def encode_neigh(kind: int, flags: int, seq: int, ifindex: int, state: int, ntf: int, mac: bytes) -> bytes:
    """One C{RTM_*NEIGH} request for an C{AF_BRIDGE} entry with C{NDA_LLADDR}."""
    if len(mac) != 6:
        raise ValueError(f"a MAC is 6 bytes, not {len(mac)}")
    body = _NDMSG.pack(AF_BRIDGE, ifindex, state, ntf, 0) + _attr(NDA_LLADDR, mac)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def encode_fdb_add(seq: int, ifindex: int, mac: bytes) -> bytes:
    """What C{bridge fdb replace MAC dev TAP master static} sends."""
    return encode_neigh(
        RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE, seq, ifindex,
        NUD_NOARP | NUD_REACHABLE, NTF_MASTER, mac,
    )


def encode_fdb_delete(seq: int, ifindex: int, mac: bytes) -> bytes:
    """What C{bridge fdb del MAC dev TAP master} sends."""
    return encode_neigh(
        RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, seq, ifindex, NUD_NOARP | NUD_PERMANENT, NTF_MASTER, mac,
    )


def encode_ack(seq: int, error: int, request_header: bytes = b"", text: str = "") -> bytes:
    """
    An acknowledgement as the kernel sends it to a socket with
    C{NETLINK_CAP_ACK} and C{NETLINK_EXT_ACK}: C{error} is 0 or a negative
    errno.  (For tests and fake kernels.)
    """
    header = request_header[: _NLMSGHDR.size].ljust(_NLMSGHDR.size, b"\0")
    flags = NLM_F_CAPPED
    tlvs = b""
    if text:
        flags |= NLM_F_ACK_TLVS
        tlvs = _attr(NLMSGERR_ATTR_MSG, text.encode() + b"\0")
    body = _ERROR.pack(error) + header + tlvs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), NLMSG_ERROR, flags, seq, 0) + body


def parse_messages(data: bytes) -> List[Message]:
    """Split one datagram from a netlink socket into its messages."""
    messages = []
    offset = 0
    view = memoryview(data)
    while offset < len(data):
        if len(data) - offset < _NLMSGHDR.size:
            raise NetlinkError(f"{len(data) - offset} bytes after the last message, too few for a header")
        length, kind, flags, seq, pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise NetlinkError(f"a message claims {length} bytes with {len(data) - offset} left")
        messages.append(Message(kind, flags, seq, pid, bytes(view[offset + _NLMSGHDR.size: offset + length])))
        offset += _align(length)
    return messages


def _attributes(data: bytes, offset: int) -> Dict[int, bytes]:
    attrs: Dict[int, bytes] = {}
    while offset + _RTATTR.size <= len(data):
        size, kind = _RTATTR.unpack_from(data, offset)
        if size < _RTATTR.size or offset + size > len(data):
            raise NetlinkError(f"an attribute claims {size} bytes with {len(data) - offset} left")
        attrs[kind & 0x3FFF] = data[offset + _RTATTR.size: offset + size]
        offset += _align(size)
    return attrs


def parse_ack(message: Message) -> Ack:
    """An C{NLMSG_ERROR} message: which request it answers, and how."""
    if message.type != NLMSG_ERROR:
        raise NetlinkError(f"message type {message.type} is not an acknowledgement")
    body = message.body
    if len(body) < _ERROR.size + _NLMSGHDR.size:
        raise NetlinkError(f"an acknowledgement of {len(body)} bytes is truncated")
    (error,) = _ERROR.unpack_from(body)
    request_length = _NLMSGHDR.unpack_from(body, _ERROR.size)[0]
    text = ""
    if message.flags & NLM_F_ACK_TLVS:
        echoed = _NLMSGHDR.size if message.flags & NLM_F_CAPPED else _align(request_length)
        raw = _attributes(body, _ERROR.size + echoed).get(NLMSGERR_ATTR_MSG, b"")
        text = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    return Ack(message.seq, -error, text)


def parse_neigh(message: Message) -> Neighbour:
    """An C{RTM_NEWNEIGH}/C{RTM_DELNEIGH} message."""
    if len(message.body) < _NDMSG.size:
        raise NetlinkError(f"a neighbour message of {len(message.body)} bytes is truncated")
    family, ifindex, state, flags, _ = _NDMSG.unpack_from(message.body)
    attrs = _attributes(message.body, _NDMSG.size)
    master = attrs.get(NDA_MASTER)
    return Neighbour(
        family, ifindex, state, flags, attrs.get(NDA_LLADDR),
        struct.unpack("=I", master)[0] if master is not None and len(master) == 4 else None,
    )


# the reactor adapter --------------------------------------------------------

ADD, REMOVE = True, False


def route_socket() -> socket.socket:
    """A non-blocking C{NETLINK_ROUTE} socket aimed at the kernel, with short, explained acks."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                         socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
            try:
                sock.setsockopt(SOL_NETLINK, option, 1)
            except OSError:  # older kernels: full echoes, no explanations; still correct
                pass
        sock.bind((0, 0))
        sock.connect((0, 0))
    except OSError:
        sock.close()
        raise
    return sock


@implementer(IReadDescriptor)
class FdbReflector:
    """
    Keeps static bridge FDB entries for the MACs behind one TAP port.

    The hub calls L{add} when it learns a MAC from one of its cards (also
    again when it moves back to this port) and L{remove} when the MAC ages
    out or its session ends.  Never for MACs learned from the fabric port
    itself: those belong to other nodes, and advertising them as local
    would loop.  Changes made in one reactor turn go to the kernel in one
    batch; a later change to the same MAC replaces a pending one.

    Failures are logged as sentences (one line per kind of failure per
    L{LOG_INTERVAL}) and counted in L{stats}.  When the TAP disappears the
    pending changes wait, bounded, until a TAP of that name is back.

    @param tap: the TAP device's name, in this process's network namespace.
    @param reactor: provides C{callLater}, C{seconds}, C{addReader} and C{removeReader}.
    @param sock: a connected socket that speaks rtnetlink; L{route_socket} by default.
    """

    log = Logger()

    def __init__(self, tap: str, reactor=None, sock: Optional[socket.socket] = None,
                 window: int = WINDOW, max_pending: int = MAX_PENDING) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.tap = tap
        self.reactor = reactor
        self.sock = sock if sock is not None else route_socket()
        self.window = window
        self.max_pending = max_pending
        self._ifindex: Optional[int] = None
        self._pending: "OrderedDict[bytes, bool]" = OrderedDict()
        self._in_flight: Dict[int, Tuple[bytes, bool]] = {}
        self._installed: set = set()
        self._seq = 0
        self._flush_call = None
        self._last_logged: Dict[Tuple[str, int], float] = {}
        self._suppressed: Dict[Tuple[str, int], int] = {}
        self.added = self.removed = self.failed = self.dropped = self.resyncs = 0
        self.reactor.addReader(self)

    # the hub's side ----------------------------------------------------------

    def add(self, mac: bytes) -> None:
        """Point C{mac} at this TAP with a static entry (idempotent)."""
        self._change(mac, ADD)

    def remove(self, mac: bytes) -> None:
        """Remove this TAP's entry for C{mac}, if it still has one."""
        self._change(mac, REMOVE)

    def stats(self) -> dict:
        return {
            "tap": self.tap, "entries": len(self._installed), "pending": len(self._pending),
            "in_flight": len(self._in_flight), "added": self.added, "removed": self.removed,
            "failed": self.failed, "dropped": self.dropped, "resyncs": self.resyncs,
        }

    def close(self) -> None:
        """Stop; entries stay (they vanish with the TAP)."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self.sock.fileno() >= 0:
            self.reactor.removeReader(self)
            self.sock.close()

    def _change(self, mac: bytes, op: bool) -> None:
        if len(mac) != 6:
            raise ValueError(f"a MAC is 6 bytes, not {len(mac)}")
        if mac in self._pending:
            self._pending[mac] = op
            self._schedule()
            return
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            self._complain(("dropped", 0), f"FDB reflection on {self.tap}: {self.max_pending} changes already "
                                           f"wait for the kernel; dropped the one for {format_mac(mac)}")
            return
        self._pending[mac] = op
        self._schedule()

    def _schedule(self) -> None:
        if self._flush_call is None and self.sock.fileno() >= 0:
            self._flush_call = self.reactor.callLater(0, self._flush)

    # the kernel's side -------------------------------------------------------

    def _resolve(self) -> Optional[int]:
        if self._ifindex is None:
            try:
                self._ifindex = socket.if_nametoindex(self.tap)
            except OSError:
                return None
        return self._ifindex

    def _flush(self) -> None:
        self._flush_call = None
        room = self.window - len(self._in_flight)
        if room <= 0 or not self._pending:
            return
        ifindex = self._resolve()
        if ifindex is None:
            self._complain(("absent", 0), f"FDB reflection on {self.tap}: there is no such device (yet); "
                                          f"{len(self._pending)} changes wait")
            return
        batch = []
        while self._pending and len(batch) < room:
            mac, op = self._pending.popitem(last=False)
            self._seq = (self._seq % 0xFFFFFFFF) + 1
            encode = encode_fdb_add if op is ADD else encode_fdb_delete
            batch.append(encode(self._seq, ifindex, mac))
            self._in_flight[self._seq] = (mac, op)
        try:
            self.sock.send(b"".join(batch))
        except OSError as e:
            # Nothing of the batch was taken: put it back in front, unless newer.
            for seq in reversed(list(self._in_flight)[-len(batch):]):
                mac, op = self._in_flight.pop(seq)
                self._pending.setdefault(mac, op)
                self._pending.move_to_end(mac, last=False)
            self._complain(("send", e.errno or 0), f"FDB reflection on {self.tap}: cannot send to the kernel: "
                                                   f"{e.strerror}; {len(self._pending)} changes wait")
            if e.errno in (errnos.EAGAIN, errnos.ENOBUFS, errnos.EINTR):
                self._flush_call = self.reactor.callLater(0.1, self._flush)

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errnos.ENOBUFS:
                    self._resync()
                    continue
                raise
            if not data:
                break
            try:
                messages = parse_messages(data)
            except NetlinkError as e:
                self.log.warn("FDB reflection on {tap}: a malformed netlink answer ({why}); resending",
                              tap=self.tap, why=str(e))
                self._resync()
                continue
            for message in messages:
                if message.type == NLMSG_ERROR:
                    self._acknowledged(parse_ack(message))
        if self._pending:
            self._schedule()

    def _resync(self) -> None:
        """Acknowledgements were lost (receive buffer full): resend what is unconfirmed."""
        self.resyncs += 1
        for mac, op in reversed(list(self._in_flight.values())):
            if mac not in self._pending:
                self._pending[mac] = op
                self._pending.move_to_end(mac, last=False)
        self._in_flight.clear()
        self._schedule()

    def _acknowledged(self, ack: Ack) -> None:
        request = self._in_flight.pop(ack.seq, None)
        if request is None:
            return
        mac, op = request
        if ack.errno == 0 or (op is REMOVE and ack.errno == errnos.ENOENT):
            if op is ADD:
                self.added += 1
                self._installed.add(mac)
            else:
                self.removed += 1
                self._installed.discard(mac)
            return
        self.failed += 1
        if ack.errno in (errnos.ENODEV, errnos.EINVAL) and op is ADD:
            self._ifindex = None  # the TAP may have been made anew; look it up again
        if op is REMOVE:
            self._installed.discard(mac)
        what = "add" if op is ADD else "remove"
        self._complain((what, ack.errno), f"cannot {what} FDB entry {format_mac(mac)} on {self.tap}: {ack.sentence()}")

    def _complain(self, key: Tuple[str, int], sentence: str) -> None:
        """Log C{sentence}, or count it when its kind was logged less than L{LOG_INTERVAL} ago."""
        now = self.reactor.seconds()
        last = self._last_logged.get(key)
        if last is not None and now - last < LOG_INTERVAL:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last_logged[key] = now
        more = self._suppressed.pop(key, 0)
        self.log.warn("{sentence}{more}", sentence=sentence,
                      more=f" ({more} more like it since the last report)" if more else "")

    def connectionLost(self, reason) -> None:
        pass

    def logPrefix(self) -> str:
        return f"fdb {self.tap}"


# interface addresses (what C{ip addr show dev IFACE} lists) -------------------

RTM_GETADDR, RTM_NEWADDR = 22, 20
IFA_ADDRESS, IFA_LOCAL = 1, 2
_IFADDRMSG = struct.Struct("=BBBBI")


def encode_addr_dump(seq: int, family: int = socket.AF_UNSPEC) -> bytes:
    """An C{RTM_GETADDR} dump request: every address of every interface."""
    body = _IFADDRMSG.pack(family, 0, 0, 0, 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def parse_ifaddr(message: Message) -> Tuple[int, str]:
    """An C{RTM_NEWADDR} message: (interface index, the address as text)."""
    if len(message.body) < _IFADDRMSG.size:
        raise NetlinkError(f"an address message of {len(message.body)} bytes is truncated")
    family, _prefixlen, _flags, _scope, ifindex = _IFADDRMSG.unpack_from(message.body)
    attrs = _attributes(message.body, _IFADDRMSG.size)
    raw = attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS))
    if family not in (socket.AF_INET, socket.AF_INET6) or raw is None:
        raise NetlinkError(f"an address message of family {family} without an address")
    return ifindex, socket.inet_ntop(family, raw)


def interface_addresses(ifindex: int, timeout: float = 5.0) -> List[str]:
    """
    The IPv4 and IPv6 addresses of interface C{ifindex}, asked of the
    kernel in one blocking dump (for start-up checks, not the data path).
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    found: List[str] = []
    try:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.send(encode_addr_dump(1))
        while True:
            for message in parse_messages(sock.recv(1 << 16)):
                if message.type == NLMSG_DONE:
                    return found
                if message.type == NLMSG_ERROR:
                    ack = parse_ack(message)
                    if ack.errno:
                        raise OSError(ack.errno, ack.sentence())
                elif message.type == RTM_NEWADDR:
                    index, address = parse_ifaddr(message)
                    if index == ifindex:
                        found.append(address)
    finally:
        sock.close()


# the codec's pieces, for other rtnetlink requests (sevpn.backplane's links) --------

#: One attribute (type, payload) with its padding; the attributes of a message body from an offset.
attribute = _attr
attributes = _attributes
NLMSGHDR = _NLMSGHDR
