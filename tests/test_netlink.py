"""
The rtnetlink FDB codec, L{FdbReflector} against a fake kernel on a
L{Clock}, and the real kernel's bridge in a namespace (skipped when not root).
"""

from __future__ import annotations

import errno
import json
import socket
import sys

from hypothesis import given, strategies as st
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SkipTest, TestCase

from sevpn import netlink
from sevpn.netlink import (
    Ack, FdbReflector, Message, NetlinkError, encode_ack, encode_fdb_add, encode_fdb_delete, parse_ack,
    parse_messages, parse_neigh,
)
from scripts.fabric_topology import FabricTopology, run

MAC = bytes.fromhex("0200000000aa")


class CodecTests(TestCase):
    def setUp(self):
        if sys.byteorder != "little":
            raise SkipTest("the byte strings below are little-endian, as netlink is on this machine")

    def test_add_is_what_bridge_fdb_replace_static_sends(self):
        # strace of 'bridge fdb replace 02:00:00:00:aa:05 dev fbc1 master static' (iproute2 6.1):
        # RTM_NEWNEIGH, NLM_F_REQUEST|NLM_F_ACK|NLM_F_REPLACE|NLM_F_CREATE; AF_BRIDGE,
        # NUD_REACHABLE|NUD_NOARP, NTF_MASTER; NDA_LLADDR.  (seq 7, ifindex 5 here.)
        expected = bytes.fromhex(
            "28000000" "1c00" "0505" "07000000" "00000000"
            "07" "000000" "05000000" "4200" "04" "00"
            "0a00" "0200" "0200000000aa" "0000"
        )
        self.assertEqual(encode_fdb_add(7, 5, bytes.fromhex("0200000000aa")), expected)

    def test_delete_is_what_bridge_fdb_del_sends(self):
        expected = bytes.fromhex(
            "28000000" "1d00" "0500" "08000000" "00000000"
            "07" "000000" "05000000" "c000" "04" "00"
            "0a00" "0200" "0200000000aa" "0000"
        )
        self.assertEqual(encode_fdb_delete(8, 5, bytes.fromhex("0200000000aa")), expected)

    def test_a_mac_is_six_bytes(self):
        self.assertRaises(ValueError, encode_fdb_add, 1, 5, b"\x02" * 5)

    def test_batch_splits_into_messages(self):
        data = encode_fdb_add(1, 5, MAC) + encode_fdb_delete(2, 5, MAC)
        messages = parse_messages(data)
        self.assertEqual([(m.type, m.seq) for m in messages], [(netlink.RTM_NEWNEIGH, 1), (netlink.RTM_DELNEIGH, 2)])
        n = parse_neigh(messages[0])
        self.assertEqual((n.family, n.ifindex, n.state, n.flags, n.lladdr),
                         (netlink.AF_BRIDGE, 5, netlink.NUD_NOARP | netlink.NUD_REACHABLE, netlink.NTF_MASTER, MAC))

    def test_acks(self):
        request = encode_fdb_add(9, 5, MAC)
        self.assertEqual(parse_ack(parse_messages(encode_ack(9, 0, request))[0]), Ack(9, 0, ""))
        ack = parse_ack(parse_messages(encode_ack(9, -errno.EOPNOTSUPP, request, "FDB add only supported"))[0])
        self.assertEqual(ack, Ack(9, errno.EOPNOTSUPP, "FDB add only supported"))
        self.assertEqual(ack.sentence(), "Operation not supported (FDB add only supported)")

    def test_malformed_answers_are_errors(self):
        self.assertRaises(NetlinkError, parse_messages, b"\x28\x00\x00\x00\x02\x00")
        self.assertRaises(NetlinkError, parse_messages, encode_ack(1, 0)[:-4])
        self.assertRaises(NetlinkError, parse_messages, b"\x08\x00\x00\x00" + b"\x00" * 12)
        self.assertRaises(NetlinkError, parse_ack, Message(netlink.NLMSG_ERROR, 0, 1, 0, b"\x00" * 8))
        self.assertRaises(NetlinkError, parse_ack, Message(netlink.RTM_NEWNEIGH, 0, 1, 0, b"\x00" * 20))

    @given(st.binary(max_size=200))
    def test_garbage_never_escapes_as_another_exception(self, data):
        try:
            for message in parse_messages(data):
                if message.type == netlink.NLMSG_ERROR:
                    parse_ack(message)
                else:
                    parse_neigh(message)
        except NetlinkError:
            pass


class FakeReactor(Clock):
    """A clock that also takes readers."""

    def __init__(self):
        super().__init__()
        self.readers = set()

    def addReader(self, reader):
        self.readers.add(reader)

    def removeReader(self, reader):
        self.readers.discard(reader)


class FakeKernel:
    """The far end of a socket pair: reads request batches, answers with acks."""

    def __init__(self):
        self.sock, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.theirs.setblocking(False)
        self.sock.setblocking(False)

    def batches(self):
        out = []
        while True:
            try:
                out.append(parse_messages(self.sock.recv(1 << 20)))
            except BlockingIOError:
                return out

    def answer(self, messages, error=lambda m: 0):
        for m in messages:
            self.sock.send(encode_ack(m.seq, -error(m)))


class ReflectorTests(TestCase):
    def setUp(self):
        self.reactor = FakeReactor()
        self.kernel = FakeKernel()
        self.addCleanup(self.kernel.sock.close)
        self.events = []
        self.reflector = FdbReflector("lo", self.reactor, sock=self.kernel.theirs, window=4, max_pending=6)
        self.reflector.log = Logger(observer=self.events.append)
        self.addCleanup(self.reflector.close)

    def logged(self):
        return [formatEvent(e) for e in self.events]

    def roundtrip(self, error=lambda m: 0):
        self.reactor.advance(0)
        sent = self.kernel.batches()
        for batch in sent:
            self.kernel.answer(batch, error)
        self.reflector.doRead()
        return sent

    def test_one_batch_per_turn_and_a_later_change_wins(self):
        self.assertIn(self.reflector, self.reactor.readers)
        for n in (1, 2, 3):
            self.reflector.add(bytes([2, 0, 0, 0, 0, n]))
        self.reflector.remove(bytes([2, 0, 0, 0, 0, 2]))
        sent = self.roundtrip()
        self.assertEqual(len(sent), 1)  # one sendmsg
        self.assertEqual([(m.type, parse_neigh(m).lladdr[-1]) for m in sent[0]],
                         [(netlink.RTM_NEWNEIGH, 1), (netlink.RTM_DELNEIGH, 2), (netlink.RTM_NEWNEIGH, 3)])
        self.assertEqual(parse_neigh(sent[0][0]).ifindex, socket.if_nametoindex("lo"))
        stats = self.reflector.stats()
        self.assertEqual((stats["entries"], stats["added"], stats["removed"], stats["in_flight"]), (2, 2, 1, 0))

    def test_window_bounds_what_is_unacknowledged(self):
        for n in range(6):
            self.reflector.add(bytes([2, 0, 0, 0, 0, n]))
        self.reactor.advance(0)
        first = self.kernel.batches()
        self.assertEqual([len(b) for b in first], [4])
        self.assertEqual(self.reflector.stats()["pending"], 2)
        self.kernel.answer(first[0])
        self.reflector.doRead()
        self.assertEqual(len(self.roundtrip()[0]), 2)
        self.assertEqual(self.reflector.stats()["added"], 6)

    def test_too_many_pending_changes_are_dropped_and_counted(self):
        for n in range(8):
            self.reflector.add(bytes([2, 0, 0, 0, 0, n]))
        self.assertEqual(self.reflector.stats()["dropped"], 2)
        self.assertEqual(len(self.logged()), 1)  # one line, not one per drop
        self.assertIn("6 changes already wait for the kernel", self.logged()[0])

    def test_errors_are_sentences_and_logged_once_per_interval(self):
        for n in (1, 2):
            self.reflector.add(bytes([2, 0, 0, 0, 0, n]))
        self.roundtrip(error=lambda m: errno.EOPNOTSUPP)
        self.assertEqual(self.reflector.stats()["failed"], 2)
        self.assertEqual(self.logged(), ["cannot add FDB entry 02:00:00:00:00:01 on lo: Operation not supported"])
        self.reactor.advance(netlink.LOG_INTERVAL + 1)
        self.reflector.add(bytes([2, 0, 0, 0, 0, 3]))
        self.roundtrip(error=lambda m: errno.EOPNOTSUPP)
        self.assertEqual(self.logged()[1], "cannot add FDB entry 02:00:00:00:00:03 on lo: Operation not supported "
                                           "(1 more like it since the last report)")

    def test_removing_what_is_not_there_is_no_failure(self):
        self.reflector.remove(MAC)
        self.roundtrip(error=lambda m: errno.ENOENT)
        self.assertEqual((self.reflector.stats()["failed"], self.reflector.stats()["removed"]), (0, 1))
        self.assertEqual(self.logged(), [])

    def test_lost_acknowledgements_are_resent(self):
        self.reflector.add(MAC)
        self.reactor.advance(0)
        self.assertEqual(len(self.kernel.batches()), 1)
        real = self.reflector.sock

        class Overrun:
            calls = 0

            def recv(self, n):
                Overrun.calls += 1
                if Overrun.calls == 1:
                    raise OSError(errno.ENOBUFS, "No buffer space available")
                return real.recv(n)

            def __getattr__(self, name):
                return getattr(real, name)

        self.reflector.sock = Overrun()
        self.reflector.doRead()
        self.reflector.sock = real
        sent = self.roundtrip()
        self.assertEqual([parse_neigh(m).lladdr for m in sent[0]], [MAC])
        self.assertEqual(self.reflector.stats()["resyncs"], 1)
        self.assertEqual(self.reflector.stats()["entries"], 1)

    def test_a_missing_tap_keeps_changes_waiting(self):
        reflector = FdbReflector("fbnosuchtap0", self.reactor, sock=socket.socketpair(socket.AF_UNIX,
                                                                                      socket.SOCK_SEQPACKET)[0])
        reflector.log = Logger(observer=self.events.append)
        self.addCleanup(reflector.close)
        reflector.add(MAC)
        self.reactor.advance(0)
        self.assertEqual(reflector.stats()["pending"], 1)
        self.assertIn("fbnosuchtap0: there is no such device (yet)", self.logged()[0])

    def test_close_stops_reading(self):
        self.reflector.close()
        self.assertNotIn(self.reflector, self.reactor.readers)
        self.reflector.add(MAC)
        self.reactor.advance(0)  # nothing scheduled on a closed socket


class KernelTests(TestCase):
    """The real bridge, in a namespace of its own, with a stand-in hub port."""

    timeout = 60

    def setUp(self):
        self.topo = FabricTopology(1, frr=False)
        self.addCleanup(self.topo.close)
        self.ns = self.topo.node_ns(1)
        self.port = self.topo.add_hub_port(1, "unused-marker")
        self.tap = self.topo.nodes[1].segment(100).tap_name(0)

    def fdb(self, dev):
        return {e["mac"]: e for e in json.loads(run(self.ns, "bridge", "-j", "fdb", "show", "dev", dev))}

    def test_entries_are_those_of_bridge_fdb_add_static(self):
        self.port.command("add 02:fb:00:00:00:01")
        self.assertEqual(self.port.command("sync")["added"], 1)
        run(self.ns, "bridge", "fdb", "add", "02:fb:00:00:00:02", "dev", self.tap, "master", "static")
        entries = self.fdb(self.tap)
        ours, theirs = dict(entries["02:fb:00:00:00:01"]), dict(entries["02:fb:00:00:00:02"])
        self.assertEqual(ours.pop("mac"), "02:fb:00:00:00:01")
        theirs.pop("mac")
        self.assertEqual(ours, theirs)
        self.assertEqual((ours["state"], ours["master"]), ("static", "br-100"))
        self.port.command("remove 02:fb:00:00:00:01")
        self.assertEqual(self.port.command("sync")["removed"], 1)
        self.assertNotIn("02:fb:00:00:00:01", self.fdb(self.tap))

    def test_takes_over_an_entry_the_bridge_learned_but_never_removes_another_ports(self):
        run(self.ns, "ip", "link", "add", "fbl", "type", "veth", "peer", "name", "fbm")
        run(self.ns, "ip", "link", "set", "fbl", "master", "br-100", "up")
        # fbm stays down: a frame from it would teach the bridge the MAC again (a static entry is
        # not sticky), which is right for a card that moves, but not in this test.
        # A learned (dynamic) entry on another port; the hub's card moved here.
        run(self.ns, "bridge", "fdb", "add", "02:fb:00:00:00:03", "dev", "fbl", "master")
        self.port.command("add 02:fb:00:00:00:03")
        stats = self.port.command("sync")
        self.assertEqual((stats["added"], stats["failed"]), (1, 0))
        self.assertEqual(self.fdb(self.tap)["02:fb:00:00:00:03"]["state"], "static")
        # An entry on another port is not this port's to remove.
        run(self.ns, "bridge", "fdb", "replace", "02:fb:00:00:00:04", "dev", "fbl", "master", "static")
        self.port.command("remove 02:fb:00:00:00:04")
        stats = self.port.command("sync")
        self.assertEqual(stats["failed"], 0)
        self.assertIn("02:fb:00:00:00:04", self.fdb("fbl"))

    def test_a_tap_outside_the_bridge_is_reported(self):
        run(self.ns, "ip", "link", "set", self.tap, "nomaster")
        self.port.command("add 02:fb:00:00:00:05")
        self.assertEqual(self.port.command("sync")["failed"], 1)
        self.port.close()
        self.assertIn(f"cannot add FDB entry 02:fb:00:00:00:05 on {self.tap}: Operation not supported",
                      self.port.log())
        self.assertNotIn("Traceback", self.port.log())
