"""
Test doubles for the link layer: an in-memory network the tests can cut,
and a TAP that records what the card writes to it.  Everything runs on a
L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

from twisted.internet import address
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from sevpn.accounts import Account
from sevpn.card import Card, NicSide
from sevpn.channel import HubChannels, IDatagramTransport
from sevpn.hub import Hub
from sevpn.hublink import HubLinkFactory
from sevpn.port import Port
from sevpn.timing import Keepalive
from sevpn.users import HubState


def frame(dst: bytes, src: bytes, payload: bytes = b"x" * 50, ethertype: bytes = b"\x08\x00") -> bytes:
    return dst + src + ethertype + payload


def mac(n: int) -> bytes:
    return bytes([0x02, 0, 0, 0, 0, n])


BROADCAST = b"\xff" * 6


def payloads(tap, dst=None):
    """The payloads a TAP received (the test frames number themselves)."""
    return [f[14:] for f in tap.written if dst is None or f[:6] == dst]



def run_pumped(clock, pump, seconds: float, step: float) -> None:
    """Let C{seconds} pass on C{clock} in steps of C{step}, calling C{pump} between them."""
    end = clock.seconds() + seconds
    while clock.seconds() < end:
        pump()
        clock.advance(min(step, end - clock.seconds()))
    pump()

class MemoryTransport:
    """One end of an in-memory TCP connection."""

    disconnecting = False

    def __init__(self, network: "MemoryNetwork", port: int, host: str = "192.0.2.1",
                 tls: Optional["MemoryTLS"] = None, peer: Optional[Tuple[str, int]] = None) -> None:
        self.host = host
        self.tls = tls
        self.peer = peer
        self.network = network
        self.buffer: List[bytes] = []
        self.peer_transport: Optional["MemoryTransport"] = None
        self.protocol = None
        self.producer = None
        self.closed = False
        self.port = port
        #: The protocol asked not to be given data for now.
        self.reading_paused = False

    def write(self, data: bytes) -> None:
        if not self.disconnecting and not self.closed:
            self.buffer.append(bytes(data))

    def writeSequence(self, seq) -> None:
        self.write(b"".join(bytes(s) for s in seq))

    def loseConnection(self) -> None:
        self.disconnecting = True

    abortConnection = loseConnection

    def pauseProducing(self) -> None:
        self.reading_paused = True

    def resumeProducing(self) -> None:
        self.reading_paused = False

    def registerProducer(self, producer, streaming) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def getPeer(self):
        if self.peer is not None:
            return address.IPv4Address("TCP", *self.peer)
        return address.IPv4Address("TCP", self.host, self.port)

    def getHandle(self):
        """The connection's TLS session, as L{sevpn.tls.keying_material} asks for it."""
        return self.tls

    def getHost(self):
        return address.IPv4Address("TCP", "192.0.2.2", 5555)


class Connection:
    def __init__(self, client, server, ct: MemoryTransport, st: MemoryTransport) -> None:
        self.client, self.server, self.ct, self.st = client, server, ct, st
        self.network = ct.network
        self.alive = True

    def pump(self) -> bool:
        moved = False
        for src, dst, dst_transport in ((self.ct, self.server, self.st), (self.st, self.client, self.ct)):
            if src.buffer and self.alive and not dst_transport.reading_paused:
                data, src.buffer = b"".join(src.buffer), []
                self.network.carried += len(data)
                dst.dataReceived(data)
                moved = True
        if self.alive and not moved and (self.ct.disconnecting or self.st.disconnecting):
            self.close(Failure(ConnectionDone()))
            moved = True
        return moved

    def close(self, reason: Failure) -> None:
        if not self.alive:
            return
        self.alive = False
        self.ct.closed = self.st.closed = True
        self.ct.buffer, self.st.buffer = [], []
        self.server.connectionLost(reason)
        self.client.connectionLost(reason)


@implementer(IStreamClientEndpoint)
class MemoryNetwork:
    """Carries card-to-hub connections; tests may take the line down."""

    def __init__(self, clock: Clock, server_factory) -> None:
        self.clock = clock
        self.server_factory = server_factory
        self.up = True
        self.connections: List[Connection] = []
        self._ports = iter(range(40000, 60000))
        #: Bytes the TCP connections carried (both ways).
        self.carried = 0
        #: Whether connections have a TLS session to export keys from (L{MemoryTLS}).
        self.tls = True

    def connect(self, factory, host: str = "192.0.2.1"):
        if not self.up:
            return fail(ConnectionRefusedError("the line is down"))
        port = next(self._ports)
        tls = MemoryTLS() if self.tls else None
        ct = MemoryTransport(self, port, host, tls, peer=HUB_ADDRESS)
        st = MemoryTransport(self, port, host, tls)
        client = factory.buildProtocol(None)
        server = self.server_factory.buildProtocol(None)
        conn = Connection(client, server, ct, st)
        self.connections.append(conn)
        server.makeConnection(st)
        client.makeConnection(ct)
        return succeed(client)

    #: The in-memory UDP network beside it, if the lab has one.
    datagrams: Optional["MemoryDatagrams"] = None

    def pump(self, rounds: int = 200) -> None:
        for _ in range(rounds):
            self.clock.advance(0)
            moved = False
            if self.datagrams is not None:
                moved = self.datagrams.pump()
            for conn in list(self.connections):
                moved = conn.pump() or moved
            self.connections = [c for c in self.connections if c.alive]
            if not moved:
                return

    def run(self, seconds: float, step: float = 0.05) -> None:
        """Let C{seconds} pass on the clock, pumping as we go."""
        run_pumped(self.clock, self.pump, seconds, step)

    def cut(self) -> None:
        """Break every connection without a goodbye; data in flight is lost."""
        self.up = False
        for conn in list(self.connections):
            conn.close(Failure(ConnectionLost("the line was cut")))
        self.connections = []

    def restore(self) -> None:
        self.up = True


#: Where the hub of the in-memory network is.
HUB_ADDRESS = ("192.0.2.2", 5555)


class MemoryTLS:
    """
    What a link's TLS session offers the UDP channel: RFC 5705 exporting,
    here from a secret both ends of one in-memory connection share (a
    test double of pyOpenSSL's C{Connection}).
    """

    def __init__(self) -> None:
        self.secret = os.urandom(32)

    def export_keying_material(self, label: bytes, olen: int, context: Optional[bytes] = None) -> bytes:
        out = b""
        block = 0
        while len(out) < olen:
            out += hashlib.sha256(self.secret + label + (context or b"") + bytes([block])).digest()
            block += 1
        return out[:olen]


@implementer(IDatagramTransport)
class MemorySocket:
    """One UDP socket on the in-memory datagram network."""

    def __init__(self, network: "MemoryDatagrams", address: Tuple[str, int], receiver,
                 remote: Optional[Tuple[str, int]] = None) -> None:
        self.network = network
        self.address = address
        self.receiver = receiver
        self.remote = remote
        self.closed = False

    def send(self, data, address=None) -> bool:
        if self.closed:
            return False
        to = self.remote or address
        if to is None:
            return False
        self.network.carry(self.address, to, bytes(data))
        return True

    def close(self) -> None:
        self.closed = True
        self.network.sockets.pop(self.address, None)


class MemoryDatagrams:
    """
    UDP in memory: datagrams wait until the lab pumps, then reach the
    socket bound to their address.  Tests make the line lossy (C{loss}, a
    seeded draw), block it (C{blocked}: all, or C{"to-hub"} / C{"to-card"}),
    look at what crossed (C{log}) and inject datagrams of their own.
    """

    def __init__(self, seed: int = 1) -> None:
        self.random = random.Random(seed)
        self.loss = 0.0
        self.blocked: object = False
        self.sockets: Dict[Tuple[str, int], MemorySocket] = {}
        self.queue: List[Tuple[Tuple[str, int], Tuple[str, int], bytes]] = []
        #: Everything sent: (source, destination, datagram).
        self.log: List[Tuple[Tuple[str, int], Tuple[str, int], bytes]] = []
        self.lost = 0
        self._ports = iter(range(30000, 40000))

    def bind(self, address: Tuple[str, int], receiver) -> MemorySocket:
        sock = self.sockets[address] = MemorySocket(self, address, receiver)
        return sock

    def connect(self, host: str, remote: Tuple[str, int], receiver) -> MemorySocket:
        address = (host, next(self._ports))
        sock = self.sockets[address] = MemorySocket(self, address, receiver, remote)
        return sock

    def carry(self, source, destination, data: bytes) -> None:
        self.log.append((source, destination, data))
        to_hub = destination == HUB_ADDRESS
        if self.blocked is True or self.blocked == ("to-hub" if to_hub else "to-card"):
            self.lost += 1
            return
        if self.loss and self.random.random() < self.loss:
            self.lost += 1
            return
        self.queue.append((source, destination, data))

    def inject(self, source, destination, data: bytes) -> None:
        """A datagram from anyone (a forger, a replay), delivered at the next pump."""
        self.queue.append((source, destination, data))

    def pump(self) -> bool:
        if not self.queue:
            return False
        queue, self.queue = self.queue, []
        read = []
        for source, destination, data in queue:
            sock = self.sockets.get(destination)
            if sock is None or sock.closed:
                continue
            sock.receiver.datagram_received(memoryview(data), source)
            if sock not in read:
                read.append(sock)
        for sock in read:
            sock.receiver.read_done()
        return True


@implementer(IStreamClientEndpoint)
class FromHost:
    """The in-memory network, dialled from a given address."""

    def __init__(self, network: "MemoryNetwork", host: str) -> None:
        self.network = network
        self.host = host

    def connect(self, factory):
        return self.network.connect(factory, self.host)


class FakeTap(Port):
    """The card's TAP, as the card sees it: a port that records what the card writes."""

    name = "tap-test"

    def __init__(self, clock, offload: bool = False) -> None:
        super().__init__("tap-test", clock, mac_offset=10 if offload else 0)
        self.offload = offload
        self.written: List[bytes] = []
        self.carrier = False
        self.carrier_changes: List[bool] = []

    def transmit(self, frames) -> None:
        self.written.extend(bytes(f) for f in frames)

    def set_carrier(self, on: bool) -> None:
        self.carrier = on
        self.carrier_changes.append(on)

    #: Whether the kernel would cut super-frames now (L{sevpn.tapdevice.TapPort.segment_in_kernel}).
    segmenting = False

    def segment_in_kernel(self, on: bool) -> None:
        self.segmenting = on

    def os_sends(self, frames) -> None:
        """The OS sends C{frames} through the card, as one read of the TAP."""
        self.sink.forward(self, frames)
        self.sink.flush(self)


class Lab:
    """A hub and cards on one clock and one in-memory network."""

    def __init__(self, testcase, resume_window: float = 60.0, buffer_limit: int = 1 << 20, clock=None,
                 udp: bool = False) -> None:
        self.clock = clock or Clock()
        self.state_dir = tempfile.mkdtemp(prefix="sevpn-test-")
        testcase.addCleanup(shutil.rmtree, self.state_dir, True)
        self.state = HubState(self.state_dir)
        self.state.ensure_default()
        self.keepalive = Keepalive(random=lambda: 0.5)
        self.hub = Hub(self.state, self.clock, resume_window=resume_window, buffer_limit=buffer_limit)
        #: With C{udp}: the UDP network, and the hub's UDP port on it.
        self.datagrams: Optional[MemoryDatagrams] = None
        self.channels: Optional[HubChannels] = None
        if udp:
            self.datagrams = MemoryDatagrams()
            # the in-memory lines have no TCP counters: channels carry whenever UDP works
            self.channels = HubChannels(self.clock, HUB_ADDRESS[1], mode="always")
            self.channels.transport = self.datagrams.bind(HUB_ADDRESS, self.channels)
        self.network = MemoryNetwork(self.clock, HubLinkFactory(self.hub, self.clock, self.keepalive,
                                                                udp=self.channels))
        self.network.datagrams = self.datagrams
        self.resume_window = resume_window
        self.buffer_limit = buffer_limit
        self._users = set()

    def user(self, name: str, password: str = "secret", hub: str = "DEFAULT") -> None:
        if not self.state.exists(hub):
            self.state.create_hub(hub)
        # A cheap hash keeps the unit tests fast; the cost is tested apart.
        from sevpn import users

        users_ = dict(self.state.users(hub))
        users_[name] = {"password": users.hash_password(password.encode(), n=2)}
        from sevpn.files import write_json

        write_json(os.path.join(self.state_dir, "hubs", hub, "users.json"), {"users": users_})

    def card(self, n: int, user: Optional[str] = None, password: str = "secret", hub: str = "DEFAULT",
             connect: bool = True, host: str = "192.0.2.1", **kw) -> Card:
        user = user or f"u{n}"
        if (user, hub) not in self._users and password == "secret":
            self.user(user, hub=hub)
            self._users.add((user, hub))
        if self.datagrams is not None and "udp" not in kw:
            kw["udp"] = lambda hub, port, receiver: self.datagrams.connect(host, (hub, port), receiver)
            kw.setdefault("udp_mode", "always")  # no TCP counters in memory: carry whenever UDP works
        card = Card(
            self.clock, NicSide(FakeTap(self.clock, kw.pop("offload", False))), mac(n),
            lambda account: FromHost(self.network, host),
            keepalive=self.keepalive, resume_window=kw.pop("resume_window", self.resume_window),
            buffer_limit=self.buffer_limit, **kw,
        )
        card.test_account = Account(
            name=f"acct{n}", hub="192.0.2.2:5555", user=user, password=password, ca_file="/nonexistent",
            hub_name=hub,
        )
        if connect:
            card.connect(card.test_account)
            self.network.pump()
        return card


class Sites:
    """
    Several hubs (each a L{Lab}: its hub, its network, its cards) on one
    clock, and cascades between them: a cascade from site C{a} to site
    C{b} dials C{b}'s network.
    """

    def __init__(self, testcase, names=("A", "B"), **kw) -> None:
        from sevpn.cascade import CascadeManager

        self.clock = Clock()
        self.labs = {name: Lab(testcase, clock=self.clock, **kw) for name in names}
        self.managers = {
            name: CascadeManager(lab.hub, lab.state_dir, self.endpoint_for, lab.keepalive)
            for name, lab in self.labs.items()
        }

    def __getitem__(self, name: str) -> Lab:
        return self.labs[name]

    def endpoint_for(self, account: Account):
        return self.labs[account.host].network

    def cascade_user(self, site: str, user: str, hub: str = "DEFAULT", allowed: bool = True, **policy) -> None:
        lab = self.labs[site]
        lab.user(user, hub=hub)
        if allowed:
            lab.state.set_cascade_user(hub, user, True, **policy)

    def cascade(self, name: str, frm: str, to: str, hub: str = "DEFAULT", remote_hub: str = "DEFAULT",
                user: Optional[str] = None, allowed: bool = True, **policy):
        """Configure cascade C{name} from site C{frm} to site C{to}, as the CLI would, and poke the hub."""
        from sevpn.cascade import CascadeConfig

        user = user or f"from-{frm}-{name}"
        self.cascade_user(to, user, remote_hub, allowed, **policy)
        manager = self.managers[frm]
        manager.store.save(CascadeConfig(
            name=name, hub_name=hub, to=f"{to}:5555", remote_hub=remote_hub, user=user, password="secret",
            ca_file="/nonexistent",
        ))
        manager.reload()
        self.pump()
        return manager.cascades[name]

    def pump(self, rounds: int = 500) -> None:
        for _ in range(rounds):
            self.clock.advance(0)
            moved = False
            for lab in self.labs.values():
                network = lab.network
                for conn in list(network.connections):
                    moved = conn.pump() or moved
                network.connections = [c for c in network.connections if c.alive]
            if not moved:
                return

    def run(self, seconds: float, step: float = 0.05) -> None:
        """Let C{seconds} pass on the clock, pumping as we go."""
        run_pumped(self.clock, self.pump, seconds, step)


class Raw(Protocol):
    def __init__(self):
        self.received = b""
        self.lost = None

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost = reason


class RawFactory:
    def __init__(self):
        self.protocols = []

    def buildProtocol(self, addr):
        p = Raw()
        self.protocols.append(p)
        return p


class BlockingCard:
    """
    A card reduced to the wire protocol over a blocking TLS socket: for
    tests that drive a real hub process step by step (no reactor in the
    test), such as the hostile suite over loopback TLS.
    """

    def __init__(self, host: str, port: int, ca_file: str, user: str, password: str, mac_: bytes,
                 hub: str = "DEFAULT", timeout: float = 5.0, source: Optional[str] = None) -> None:
        import socket
        import ssl

        from sevpn import wire
        from sevpn.mac import format_mac

        self.wire = wire
        context = ssl.create_default_context(cafile=ca_file)
        raw = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0) if source else None)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.decoder = wire.Decoder()
        self._queue: List = []
        self.next_seq = 1
        self.received: List[bytes] = []
        self.delivered = 0
        self.sock.sendall(wire.Hello(hub, user, password, format_mac(mac_), frozenset()).encode())
        while not self._queue:
            self._read(timeout)
        kind, body = self._queue.pop(0)
        if kind != wire.WELCOME:
            raise AssertionError(f"the hub answered {wire.NAMES[kind]}: {body!r}")
        self.welcome = wire.Welcome.decode(body)

    def _read(self, timeout: float) -> bool:
        """Read once (up to C{timeout}); False if nothing came."""
        import socket

        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(1 << 16)
        except (socket.timeout, TimeoutError):
            return False
        if not data:
            raise ConnectionError("the hub closed the connection")
        self._queue.extend((k, bytes(b)) for k, b in self.decoder.feed(data))
        return True

    def send(self, frames) -> None:
        payload = self.wire.encode_frames(frames)
        self.sock.sendall(self.wire.encode_data(self.next_seq, self.delivered, payload))
        self.next_seq += len(frames)

    def receive(self, seconds: float) -> None:
        """Read what arrives for C{seconds}; frames go to C{received}, acknowledged."""
        import time

        end = time.monotonic() + seconds
        while self._queue or self._read(end - time.monotonic()):
            while self._queue:
                kind, body = self._queue.pop(0)
                if kind != self.wire.DATA:
                    continue
                first, _, frames = self.wire.decode_data(memoryview(body))
                for i, f in enumerate(frames):
                    if first + i > self.delivered:
                        self.received.append(bytes(f))
                        self.delivered = first + i
                self.sock.sendall(self.wire.encode_ack(self.delivered))
            if time.monotonic() >= end:
                return

    def close(self) -> None:
        try:
            self.sock.sendall(self.wire.Goodbye("the test is over").encode())
        except OSError:
            pass
        self.sock.close()


def overflow_during_outage(lab, a, b, count: int = 40) -> None:
    """
    Card C{b} (of MAC C{mac(2)}) is learned, the line is cut, C{a} (of
    C{mac(1)}) sends C{count} numbered frames of 500 bytes to C{b} (more
    than a small resume buffer holds), and the line comes back for three
    seconds.
    """
    b.lan.tap.os_sends([frame(BROADCAST, mac(2))])
    lab.network.pump()
    lab.network.cut()
    for i in range(count):
        a.lan.tap.os_sends([frame(mac(2), mac(1), b"%05d" % i + b"x" * 500)])
    lab.network.restore()
    lab.network.run(3)

