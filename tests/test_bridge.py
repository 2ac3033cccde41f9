"""
Local bridges (L{sevpn.bridge}): the option, VLAN tags, the listening
check, and L{RawBridgePort} on real veths: two bridge ports of one virtual
hub join two namespaces' hosts, so everything a LAN does crosses the port
(ARP, full-size frames with DF, TCP super-frames, UDP segmentation, 802.1Q
tags) and what the switch learns is checked.  The veth tests need root and
are skipped with the reason without it.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import sys
import time

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from scripts.netns import REPO, env, in_netns, skip_reason
from sevpn import offload as vnet
from sevpn.bridge import (
    PACKET_AUXDATA, PACKET_BROADCAST, PACKET_HOST, PACKET_OTHERHOST, PACKET_OUTGOING, SOL_PACKET,
    TP_STATUS_VLAN_TPID_VALID, TP_STATUS_VLAN_VALID, BridgeError, RawBridgePort, insert_tag,
    listening_conflict, parse_bridge_option, vlan_tag,
)
from sevpn.switch import VirtualHub
from tests.support import mac
from tests.test_offload import HDR, ipv4_tcp, verify_tcp4


def auxdata(status: int, tci: int = 0, tpid: int = 0) -> bytes:
    return struct.pack("=IIIHHHH", status, 60, 60, 0, 14, tci, tpid)


class BridgeOptionTests(SynchronousTestCase):
    def test_hub_and_interface(self):
        self.assertEqual(parse_bridge_option("DEFAULT=eth1"), ("DEFAULT", "eth1"))

    def test_malformed_options_are_sentences(self):
        for text, words in [
            ("eth1", "expected HUB=INTERFACE"),
            ("DEFAULT=", "expected HUB=INTERFACE"),
            ("bad name!=eth1", "not a virtual hub name"),
            ("DEFAULT=" + "e" * 16, "1 to 15 characters"),
            ("DEFAULT=a/b", "may not contain"),
        ]:
            with self.assertRaises(BridgeError) as caught:
                parse_bridge_option(text, "--bridge-tap")
            self.assertIn(words, str(caught.exception))
            self.assertIn("--bridge-tap", str(caught.exception))


class VlanTagTests(SynchronousTestCase):
    def test_tag_from_auxdata(self):
        self.assertEqual(vlan_tag(auxdata(TP_STATUS_VLAN_VALID | TP_STATUS_VLAN_TPID_VALID, 0xA007, 0x88A8)),
                         b"\x88\xa8\xa0\x07")

    def test_tpid_defaults_to_8021q(self):
        self.assertEqual(vlan_tag(auxdata(TP_STATUS_VLAN_VALID, 0x0064)), b"\x81\x00\x00\x64")

    def test_priority_tag_with_vlan_zero_is_a_tag(self):
        self.assertEqual(vlan_tag(auxdata(TP_STATUS_VLAN_VALID, 0x0000)), b"\x81\x00\x00\x00")

    def test_untagged(self):
        self.assertIsNone(vlan_tag(auxdata(0, 0x0064)))
        self.assertIsNone(vlan_tag(b"short"))

    def test_tag_goes_after_the_addresses(self):
        frame = mac(2) + mac(1) + b"\x08\x00" + b"payload"
        self.assertEqual(insert_tag(frame, 0, b"\x81\x00\x00\x07"),
                         mac(2) + mac(1) + b"\x81\x00\x00\x07\x08\x00payload")

    def test_offload_header_follows_the_tag(self):
        """A tagged TCP super-frame still segments into right, tagged segments."""
        eth = ipv4_tcp(bytes(range(256)) * 12)
        frame = struct.pack(HDR, vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1000, 34, 16) + eth
        tagged = insert_tag(frame, vnet.HEADER_SIZE, b"\x81\x00\x00\x07")
        flags, gso, hdr_len, mss, start, offset = struct.unpack_from(HDR, tagged)
        self.assertEqual((flags, gso, hdr_len, mss, start, offset), (vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 58, 1000, 38, 16))
        segments = vnet.to_plain(tagged)
        self.assertEqual(len(segments), 4)
        for seg in segments:
            self.assertEqual(seg[12:16], b"\x81\x00\x00\x07")
            verify_tcp4(seg[:12] + seg[16:])


class ListeningConflictTests(SynchronousTestCase):
    def test_an_address_the_hub_listens_on(self):
        why = listening_conflict("eth1", ["192.0.2.5", "fe80::1"], ["192.0.2.5"])
        self.assertIn("eth1 carries 192.0.2.5", why)
        self.assertIn("--bridge-force", why)

    def test_wildcard_covers_every_ipv4_address(self):
        self.assertIsNotNone(listening_conflict("eth1", ["10.1.2.3"], ["0.0.0.0"]))
        self.assertIsNone(listening_conflict("eth1", ["2001:db8::5"], ["0.0.0.0"]))

    def test_ipv6_wildcard_covers_every_address_but_link_local(self):
        self.assertIsNotNone(listening_conflict("eth1", ["10.1.2.3"], ["::"]))
        self.assertIsNotNone(listening_conflict("eth1", ["2001:db8::5"], ["::"]))
        self.assertIsNone(listening_conflict("eth1", ["fe80::1%eth1"], ["::"]))

    def test_no_address_or_another_one(self):
        self.assertIsNone(listening_conflict("eth1", [], ["0.0.0.0", "::"]))
        self.assertIsNone(listening_conflict("eth1", ["192.0.2.6"], ["192.0.2.5", "127.0.0.1"]))


# real veths ---------------------------------------------------------------------------


class RecordingHub(VirtualHub):
    """A virtual hub that remembers the largest frame each port brought."""

    def __init__(self) -> None:
        super().__init__("LAN", reactor.seconds)
        self.largest = {}

    def forward(self, source, frames):
        self.largest[source.name] = max([self.largest.get(source.name, 0)] + [len(f) for f in frames])
        super().forward(source, frames)


SWITCH, LEFT, RIGHT = "s", "l", "r"


class RawBridgePortTests(TestCase):
    """
    Hosts "left" (10.97.0.1) and "right" (10.97.0.2) in their own
    namespaces, each on a veth whose other end is a L{RawBridgePort} (in
    a third namespace) of one virtual hub running in this process.
    """

    timeout = 120

    def setUp(self):
        reason = skip_reason()
        if reason:
            raise SkipTest(reason)
        self.tag = f"tb{os.getpid() % 10000}{int(time.time() * 1000) % 100}"
        self.namespaces = []
        self.addCleanup(self._remove_namespaces)
        for role in (SWITCH, LEFT, RIGHT):
            self._ip("netns", "add", self.ns(role))
            self.namespaces.append(self.ns(role))
            self._ip("-n", self.ns(role), "link", "set", "lo", "up")
        self.addresses = {LEFT: "10.97.0.1", RIGHT: "10.97.0.2"}
        for side in (LEFT, RIGHT):
            self._ip("link", "add", self.dev(side), "netns", self.ns(SWITCH), "type", "veth",
                     "peer", "name", "eth0", "netns", self.ns(side))
            self._ip("-n", self.ns(side), "addr", "add", f"{self.addresses[side]}/24", "dev", "eth0")
            self._ip("-n", self.ns(side), "link", "set", "eth0", "up")
            self._ip("-n", self.ns(SWITCH), "link", "set", self.dev(side), "up")
        self.hub = RecordingHub()
        self.ports = {}
        with in_netns(self.ns(SWITCH)):
            for side in (LEFT, RIGHT):
                port = self.ports[side] = RawBridgePort(self.dev(side), reactor)
                self.addCleanup(port.close)
                self.hub.add_port(port)
                port.start_reading()

    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def dev(self, side: str) -> str:
        return f"{self.tag}{side}"

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def _remove_namespaces(self):
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def run_in(self, role: str, *cmd: str) -> defer.Deferred:
        """(stdout, stderr, status) of C{cmd} in a namespace, the reactor running meanwhile."""
        return getProcessOutputAndValue("/usr/bin/env", ["ip", "netns", "exec", self.ns(role), *cmd], env=env(),
                                        path=REPO)

    def python_in(self, role: str, code: str) -> defer.Deferred:
        return self.run_in(role, sys.executable, "-c", code)

    def mac_of(self, role: str, dev: str = "eth0") -> bytes:
        out = subprocess.run(["ip", "-n", self.ns(role), "-j", "link", "show", dev], capture_output=True,
                             text=True, check=True).stdout
        return bytes.fromhex(json.loads(out)[0]["address"].replace(":", ""))

    @defer.inlineCallbacks
    def ping(self, src: str, dst: str, *extra: str):
        out, err, code = yield self.run_in(src, "ping", "-c", "3", "-i", "0.2", "-W", "2", *extra, self.addresses[dst])
        self.assertEqual(code, 0, f"ping {src}->{dst} failed: {out.decode()[-400:]}{err.decode()[-300:]}")

    @defer.inlineCallbacks
    def capture(self, role: str, marker: str, seconds: float, count: int = 0):
        """Start capturing in C{role}; a Deferred for the list of frames, once it is listening."""
        lines = []
        ready = defer.Deferred()
        done = defer.Deferred()

        from twisted.internet.protocol import ProcessProtocol

        class Capture(ProcessProtocol):
            buffer = b""

            def outReceived(self, data):
                self.buffer += data
                while b"\n" in self.buffer:
                    line, self.buffer = self.buffer.split(b"\n", 1)
                    if line == b"ready" and not ready.called:
                        ready.callback(None)
                    else:
                        lines.append(line)

            def processEnded(self, reason):
                if not ready.called:
                    ready.callback(None)
                done.callback([bytes.fromhex(h) for h in json.loads(lines[-1])] if lines else [])

        reactor.spawnProcess(
            Capture(), "/usr/bin/env",
            ["env", "ip", "netns", "exec", self.ns(role), sys.executable, "-m", "scripts.rawframe", "capture", "eth0",
             marker, str(seconds), str(count)], env=env(), path=REPO,
        )
        yield ready
        return done

    def send_raw(self, role: str, *frames: bytes) -> defer.Deferred:
        return self.run_in(role, sys.executable, "-m", "scripts.rawframe", "send", "eth0", *[f.hex() for f in frames])

    # the tests -----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_full_size_frames_with_df_pass(self):
        yield self.ping(LEFT, RIGHT, "-M", "do", "-s", "1472")
        yield self.ping(RIGHT, LEFT, "-M", "do", "-s", "1472")

    @defer.inlineCallbacks
    def test_each_port_learns_its_own_side_only(self):
        """The hub's own frames are not read back in: no port learns the other side's MAC."""
        yield self.ping(LEFT, RIGHT)
        self.assertEqual(self.ports[LEFT].macs, {self.mac_of(LEFT)})
        self.assertEqual(self.ports[RIGHT].macs, {self.mac_of(RIGHT)})
        self.assertEqual(self.hub.mac_conflicts, 0)
        self.assertEqual(self.ports[LEFT].max_macs, 4096)

    @defer.inlineCallbacks
    def test_tcp_super_frames_cross_whole(self):
        """A TCP transfer between the hosts arrives intact; the veth's TSO frames crossed the hub whole."""
        receive = self.python_in(RIGHT, (
            "import socket,hashlib\n"
            "s=socket.socket();s.bind(('10.97.0.2',7000));s.listen();s.settimeout(60);c,_=s.accept();h=hashlib.sha256()\n"
            "while True:\n d=c.recv(1<<20)\n if not d: break\n h.update(d)\n"
            "print(h.hexdigest())"))
        yield self.ping(LEFT, RIGHT)
        out, err, code = yield self.python_in(LEFT, (
            "import socket,hashlib,os\n"
            "d=os.urandom(20<<20);s=socket.create_connection(('10.97.0.2',7000),timeout=60);s.sendall(d);s.close()\n"
            "print(hashlib.sha256(d).hexdigest())"))
        self.assertEqual(code, 0, err.decode()[-500:])
        got, err2, code2 = yield receive
        self.assertEqual(code2, 0, err2.decode()[-500:])
        self.assertEqual(got.strip(), out.strip())
        self.assertGreater(self.hub.largest[f"bridge:{self.dev(LEFT)}"], 1514 + vnet.HEADER_SIZE)
        self.assertEqual(self.ports[RIGHT].oversized_drops, 0)

    @defer.inlineCallbacks
    def test_udp_segmentation_frames_arrive_as_datagrams(self):
        """A host's UDP_SEGMENT send (one super-frame on the veth) reaches the other as every datagram, intact."""
        yield self.ping(LEFT, RIGHT)
        receive = self.python_in(RIGHT, (
            "import socket\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('10.97.0.2',9000));s.settimeout(3);got=[]\n"
            "try:\n while True: got.append(s.recv(65536))\nexcept socket.timeout: pass\n"
            "print(len(got), sum(map(len,got)), all(g==bytes([i%251])*1000 for i,g in enumerate(got)))"))
        yield self.python_in(LEFT, "import time; time.sleep(0.5)")
        out, err, code = yield self.python_in(LEFT, (
            "import socket\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.setsockopt(socket.SOL_UDP,103,1000)\n"
            "s.sendto(b''.join(bytes([i%251])*1000 for i in range(20)),('10.97.0.2',9000))"))
        self.assertEqual(code, 0, err.decode()[-500:])
        got, err, code = yield receive
        self.assertEqual(got.decode().split(), ["20", "20000", "True"])
        self.assertEqual(self.ports[LEFT].bad_frames, 0)

    @defer.inlineCallbacks
    def test_vlan_tagged_frames_cross_unchanged_both_ways(self):
        for src, dst, tag, n in ((LEFT, RIGHT, b"\x81\x00\x20\x07", 0x31), (RIGHT, LEFT, b"\x81\x00\xe0\x64", 0x32)):
            marker = f"tagged-{src}-{dst}"
            frame = b"\xff" * 6 + mac(n) + tag + b"\x08\x00" + marker.encode() + b"." * 40
            seen = yield self.capture(dst, marker, 5, 1)
            yield self.send_raw(src, frame)
            self.assertEqual((yield seen), [frame])

    @defer.inlineCallbacks
    def test_the_hosts_own_frames_are_not_the_lans(self):
        """
        What the switch namespace itself sends out of a bridged interface,
        and what comes back to its own MAC, never reaches the other side.
        """
        self._ip("-n", self.ns(SWITCH), "addr", "add", "10.97.0.99/24", "dev", self.dev(LEFT))
        own = self.mac_of(SWITCH, self.dev(LEFT))
        everything = yield self.capture(RIGHT, "", 3)
        out, err, code = yield self.run_in(SWITCH, "ping", "-c", "2", "-i", "0.2", "-W", "1", self.addresses[LEFT])
        self.assertEqual(code, 0, out.decode()[-300:])
        frames = yield everything
        self.assertEqual([f.hex() for f in frames if own in f[:12]], [])
        self.assertGreater(self.ports[LEFT].host_frames, 0)
        self.assertNotIn(own, self.ports[LEFT].macs)


# the port's reading and writing, on a scripted socket --------------------------------


class ScriptedSocket:
    """What recvmsg returns, in turn (an exception is raised); what send is given, or the errno it fails with."""

    def __init__(self, reads=(), send_errors=()):
        self.reads = list(reads)
        self.sent = []
        self.send_errors = list(send_errors)
        self.closed = False

    def fileno(self):
        return 99

    def recvmsg(self, size, ancillary_size):
        if not self.reads:
            raise BlockingIOError(errno.EAGAIN, "again")
        item = self.reads.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def send(self, frame):
        code = self.send_errors.pop(0) if self.send_errors else 0
        if code:
            raise OSError(code, os.strerror(code))
        self.sent.append(frame)
        return len(frame)

    def close(self):
        self.closed = True


class Sink:
    def __init__(self):
        self.batches = []
        self.flushes = 0

    def forward(self, source, frames):
        self.batches.append(list(frames))

    def flush(self, source):
        self.flushes += 1


def read(frame, pkttype=PACKET_OTHERHOST, aux=None, flags=0):
    ancillary = [(SOL_PACKET, PACKET_AUXDATA, aux)] if aux is not None else []
    return frame, ancillary, flags, ("eth1", 0x0800, pkttype, 1, b"\0" * 6)


class ScriptedPortTests(SynchronousTestCase):
    def port(self, reads=(), send_errors=(), offload=True):
        self.sock = ScriptedSocket(reads, send_errors)
        port = RawBridgePort("eth1", Clock(), offload=offload, sock=self.sock)
        port.sink = self.sink = Sink()
        return port

    def plain(self, n, size=60):
        return vnet.from_plain(mac(1) + mac(n) + b"\x08\x00" + bytes([n]) * (size - 14))

    def test_a_wakeup_is_one_batch(self):
        frames = [self.plain(n) for n in range(2, 6)]
        port = self.port([read(f) for f in frames])
        port.doRead()
        self.assertEqual(self.sink.batches, [frames])
        self.assertEqual(self.sink.flushes, 1)
        self.assertEqual(port.counters()["frames_in"], 4)

    def test_the_hosts_own_frames_are_skipped(self):
        mine = self.plain(2)
        port = self.port([read(mine, PACKET_OUTGOING), read(mine, PACKET_HOST), read(self.plain(3), PACKET_BROADCAST)])
        port.doRead()
        self.assertEqual(self.sink.batches, [[self.plain(3)]])
        self.assertEqual(port.counters()["host_frames"], 2)

    def test_tags_are_put_back(self):
        aux = auxdata(TP_STATUS_VLAN_VALID, 0x0005)
        port = self.port([read(self.plain(2), aux=aux)])
        port.doRead()
        [[frame]] = self.sink.batches
        self.assertEqual(frame[10 + 12 : 10 + 16], b"\x81\x00\x00\x05")

    def test_truncated_short_and_bad_frames_are_dropped_and_counted(self):
        bad_gso = struct.pack(HDR, 0, vnet.GSO_TCPV4, 54, 1000, 34, 16) + ipv4_tcp(b"x" * 3000)
        port = self.port([read(self.plain(2, 2000), flags=socket.MSG_TRUNC), read(b"\0" * 20), read(bad_gso),
                          read(self.plain(3))])
        port.doRead()
        self.assertEqual(self.sink.batches, [[self.plain(3)]])
        counters = port.counters()
        self.assertEqual((counters["truncated"], counters["bad_frames"]), (1, 2))

    def test_an_interface_that_went_down_is_said_once_and_reading_goes_on(self):
        down = OSError(errno.ENETDOWN, "Network is down")
        port = self.port([down, read(self.plain(2)), down])
        with _Logged() as logged:
            port.doRead()
            port.doRead()
        self.assertEqual(self.sink.batches, [[self.plain(2)]])
        self.assertEqual(logged.lines, ["bridge eth1: the interface is down; frames flow again once it is up"])

    def test_the_read_budget(self):
        port = self.port([read(self.plain(2)) for _ in range(300)])
        port.doRead()
        self.assertEqual(sum(map(len, self.sink.batches)), 256)

    def test_what_the_interface_cannot_take_is_dropped_and_counted(self):
        port = self.port(send_errors=[errno.ENOBUFS, errno.EAGAIN, errno.EMSGSIZE, errno.ENETDOWN, 0])
        frames = [self.plain(n) for n in range(2, 7)]
        port.deliver(frames, vnet.HEADER_SIZE)
        self.assertEqual(self.sock.sent, frames[4:])
        counters = port.counters()
        self.assertEqual((counters["write_drops"], counters["oversized_drops"], counters["down_drops"],
                          counters["frames_out"]), (2, 1, 1, 1))
        self.assertTrue(port.accepting())  # it never pauses: a LAN has no flow control

    def test_frames_with_a_bad_header_never_reach_the_socket(self):
        port = self.port()
        port.deliver([struct.pack(HDR, 0x40, 0, 0, 0, 0, 0) + ipv4_tcp(b"x")], vnet.HEADER_SIZE)
        self.assertEqual(self.sock.sent, [])
        self.assertEqual(port.counters()["bad_frames"], 1)

    def test_without_offload_frames_go_plain(self):
        port = self.port(offload=False)
        port.deliver([self.plain(2)], vnet.HEADER_SIZE)
        self.assertEqual(self.sock.sent, [self.plain(2)[vnet.HEADER_SIZE:]])

    def test_a_lans_worth_of_macs_is_learned(self):
        """More MACs than a card may have (the virtual hub's per-port default) are all learned on a bridge."""
        port = self.port([read(self.plain(n)) for n in range(2, 202)])
        vhub = VirtualHub("LAN", Clock().seconds)
        vhub.add_port(port)
        port.doRead()
        self.assertEqual(len(port.macs), 200)
        self.assertGreater(200, vhub.max_macs_per_port)
        self.assertEqual(vhub.mac_limit_drops, 0)

    def test_close(self):
        port = self.port()
        port.close()
        self.assertTrue(self.sock.closed)
        port.deliver([self.plain(2)], vnet.HEADER_SIZE)
        self.assertEqual(self.sock.sent, [])


class _Logged:
    """Collects sevpn.bridge's log lines."""

    def __enter__(self):
        from twisted.logger import globalLogPublisher

        self.lines = []
        self.observer = lambda e: self.lines.append(formatEvent(e)) if e.get("log_namespace", "").startswith(
            "sevpn.bridge") else None
        globalLogPublisher.addObserver(self.observer)
        return self

    def __exit__(self, *exc):
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(self.observer)
