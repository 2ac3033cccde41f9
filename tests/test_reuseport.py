"""
The listening group of C{--workers} (L{sevpn.reuseport}): the BPF
program, assembled and run (by a small classic-BPF interpreter here, and
by the kernel on real sockets in a namespace of the test's own), agrees
with L{worker_for}; connections from one address all reach one socket,
and addresses spread over the sockets.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import subprocess
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from scripts.netns import in_netns, skip_reason
from sevpn import reuseport
from sevpn.reuseport import (
    BPF_A, BPF_ABS, BPF_ALU, BPF_B, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_MISC, BPF_MOD, BPF_RET, BPF_RSH, BPF_TAX,
    BPF_W, BPF_X, BPF_XOR, INSTRUCTION, SKF_NET_OFF, ListenError, assemble, listening_group, parse_endpoint,
    program, worker_for,
)


def run_cbpf(instructions, network_header: bytes) -> int:
    """
    Run a classic BPF program as the kernel's reuseport hook does, on a
    packet whose network header is C{network_header}: only what the
    program uses (absolute loads past C{SKF_NET_OFF}, RSH/MOD/XOR, JEQ,
    TAX, RET).  A load past the end ends the program with 0, as in the
    kernel.
    """
    a = x = 0
    pc = 0
    for _ in range(4096):
        code, jt, jf, k = instructions[pc]
        pc += 1
        kind = code & 0x07
        if kind == BPF_LD:
            assert code & 0xE0 == BPF_ABS, f"load mode {code:#x}"
            size = {BPF_W: 4, 0x08: 2, BPF_B: 1}[code & 0x18]
            offset = k - (SKF_NET_OFF & 0xFFFFFFFF)
            assert 0 <= offset < 0x1000, f"a load outside the network header: {k:#x}"
            if offset + size > len(network_header):
                return 0
            a = int.from_bytes(network_header[offset:offset + size], "big")
        elif kind == BPF_ALU:
            operand = x if code & BPF_X else k
            op = code & 0xF0
            if op == BPF_RSH:
                a >>= operand
            elif op == BPF_MOD:
                if operand == 0:
                    return 0
                a %= operand
            elif op == BPF_XOR:
                a ^= operand
            else:
                raise AssertionError(f"ALU operation {op:#x}")
            a &= 0xFFFFFFFF
        elif kind == BPF_JMP:
            assert code & 0xF0 == BPF_JEQ and not code & BPF_X
            pc += jt if a == k else jf
        elif kind == BPF_RET:
            return a if code & 0x18 == BPF_A else k
        elif kind == BPF_MISC:
            assert code & 0xF8 == BPF_TAX
            x = a
        else:
            raise AssertionError(f"instruction class {kind}")
    raise AssertionError("the program did not end")


def ipv4_header(source: str) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 60, 1, 0x4000, 64, 6, 0,
                       ipaddress.IPv4Address(source).packed, bytes([10, 0, 0, 1]))


def ipv6_header(source: str) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, 40, 6, 64, ipaddress.IPv6Address(source).packed,
                       ipaddress.IPv6Address("fd00::1").packed)


class ProgramTests(SynchronousTestCase):
    def test_assembled_as_the_kernel_reads_it(self):
        code = assemble(program(3))
        self.assertEqual(len(code), 18 * INSTRUCTION.size)
        # ldb [SKF_NET_OFF]: class LD, size B, mode ABS; k is the negative offset as a u32
        self.assertEqual(INSTRUCTION.unpack_from(code, 0), (BPF_LD | BPF_B | BPF_ABS, 0, 0, 0xFFF00000))
        self.assertEqual(INSTRUCTION.unpack_from(code, 8), (BPF_ALU | BPF_RSH | BPF_K, 0, 0, 4))
        # IPv6 jumps over the three IPv4 instructions
        self.assertEqual(INSTRUCTION.unpack_from(code, 16), (BPF_JMP | BPF_JEQ | BPF_K, 3, 0, 6))
        self.assertEqual(INSTRUCTION.unpack_from(code, 24), (BPF_LD | BPF_W | BPF_ABS, 0, 0, 0xFFF0000C))
        self.assertEqual(INSTRUCTION.unpack_from(code, 32), (BPF_ALU | BPF_MOD | BPF_K, 0, 0, 3))
        self.assertEqual(INSTRUCTION.unpack_from(code, 40), (BPF_RET | BPF_A, 0, 0, 0))
        self.assertEqual(INSTRUCTION.unpack_from(code, 56), (BPF_MISC | BPF_TAX, 0, 0, 0))

    def test_worker_counts_out_of_range_are_refused(self):
        for bad in (0, -1, reuseport.MAX_WORKERS + 1, 2.0):
            self.assertRaises(ValueError, program, bad)

    @settings(max_examples=300)
    @given(st.integers(0, 2**32 - 1), st.integers(1, 64))
    def test_ipv4_runs_as_worker_for_says(self, number, workers):
        address = str(ipaddress.IPv4Address(number))
        self.assertEqual(run_cbpf(program(workers), ipv4_header(address)), worker_for(address, workers))

    @settings(max_examples=300)
    @given(st.integers(0, 2**128 - 1), st.integers(1, 64))
    def test_ipv6_runs_as_worker_for_says(self, number, workers):
        address = str(ipaddress.IPv6Address(number))
        self.assertEqual(run_cbpf(program(workers), ipv6_header(address)), worker_for(address, workers))

    def test_ipv4_mapped_addresses_count_as_ipv4(self):
        # an IPv4 card on a dual-stack socket: its packets are IPv4 on the wire
        for n in (2, 3, 7):
            self.assertEqual(worker_for("::ffff:10.1.2.3", n), worker_for("10.1.2.3", n))
            self.assertEqual(worker_for("::ffff:10.1.2.3", n), run_cbpf(program(n), ipv4_header("10.1.2.3")))

    def test_ipv6_fold_uses_every_word(self):
        # addresses that differ only in the prefix, or only in the last word, spread
        self.assertNotEqual(worker_for("2001:db8:0:1::1", 2), worker_for("2001:db8::1", 2))
        self.assertNotEqual(worker_for("2001:db8::1", 2), worker_for("2001:db8::2", 2))

    def test_a_short_packet_picks_socket_zero(self):
        self.assertEqual(run_cbpf(program(5), ipv4_header("10.0.0.9")[:13]), 0)

    def test_one_address_one_worker(self):
        self.assertEqual({worker_for("192.0.2.7", 4) for _ in range(10)}, {3})


class EndpointTests(SynchronousTestCase):
    def test_tcp_endpoints(self):
        e = parse_endpoint("tcp:5555")
        self.assertEqual((e.family, e.host, e.port), (socket.AF_INET, "0.0.0.0", 5555))
        e = parse_endpoint("tcp6:5555")
        self.assertEqual((e.family, e.host, e.port), (socket.AF_INET6, "::", 5555))
        e = parse_endpoint("tcp:port=443:interface=192.0.2.1:backlog=200")
        self.assertEqual((e.family, e.host, e.port, e.backlog), (socket.AF_INET, "192.0.2.1", 443, 200))
        e = parse_endpoint(r"tcp6:5555:interface=fd00\:\:1")
        self.assertEqual((e.family, e.host), (socket.AF_INET6, "fd00::1"))

    def test_what_workers_cannot_share_is_a_sentence(self):
        for text, words in [
            ("unix:/run/hub.sock", "tcp: or tcp6: endpoints only"),
            ("ssl:443", "tcp: or tcp6: endpoints only"),
            ("tcp", "give a port"),
            ("tcp:70000", "give a port"),
            ("tcp:x", "must be numbers"),
            ("tcp:5555:interface=eth0", "not an IP address"),
            ("tcp6:5555:interface=10.0.0.1", "not an IPv6 address"),
            ("tcp:5555:reuse=1", "not a TCP listening parameter"),
        ]:
            with self.assertRaises(ListenError) as caught:
                parse_endpoint(text)
            self.assertIn(words, str(caught.exception))
            self.assertIn(text, str(caught.exception))


class KernelTests(SynchronousTestCase):
    """The kernel takes the program and picks sockets as L{worker_for} says (a namespace of the test's own)."""

    def setUp(self):
        reason = skip_reason()
        if reason:
            raise SkipTest(reason)
        self.ns = f"wk-rp{os.getpid() % 100000}"
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", self.ns])
        ip = lambda *a: subprocess.run(["ip", "-n", self.ns, *a], check=True, capture_output=True)  # noqa: E731
        ip("link", "set", "lo", "up")
        ip("-6", "addr", "add", "fd00::1/64", "dev", "lo", "nodad")
        for i in range(2, 10):
            ip("-6", "addr", "add", f"fd00::{i:x}/128", "dev", "lo", "nodad")

    def accepted(self, group, sources, destination, connections=4):
        """Connect C{connections} times from each source; which socket accepted each: {source: [index, ...]}."""
        port = group[0].getsockname()[1]
        clients = []
        try:
            for source in sources:
                for _ in range(connections):
                    family = socket.AF_INET6 if ":" in source else socket.AF_INET
                    client = socket.socket(family, socket.SOCK_STREAM)
                    clients.append(client)
                    client.bind((source, 0))  # a new source port each time, as a reconnecting card has
                    client.connect((destination or source, port))
            seen = {}
            deadline = time.monotonic() + 5
            while sum(map(len, seen.values())) < len(clients) and time.monotonic() < deadline:
                for index, sock in enumerate(group):
                    try:
                        conn, peer = sock.accept()
                    except BlockingIOError:
                        continue
                    conn.close()
                    host = peer[0][7:] if peer[0].startswith("::ffff:") else peer[0]
                    seen.setdefault(host, []).append(index)
            return seen
        finally:
            for client in clients:
                client.close()

    def group(self, description, workers):
        with in_netns(self.ns):
            group = listening_group(parse_endpoint(description), workers)
        self.addCleanup(lambda: [s.close() for s in group])
        return group

    def test_ipv4_each_address_on_its_worker(self):
        for workers in (2, 3):
            group = self.group("tcp:0:interface=127.0.0.1", workers)
            sources = [f"127.0.0.{i}" for i in range(1, 10)]
            with in_netns(self.ns):
                seen = self.accepted(group, sources, "127.0.0.1")
            for source in sources:
                self.assertEqual(seen[source], [worker_for(source, workers)] * 4, source)
            self.assertEqual({i for indices in seen.values() for i in indices}, set(range(workers)))
            for sock in group:
                sock.close()

    def test_ipv4_cards_on_a_dual_stack_socket(self):
        group = self.group("tcp6:0", 3)
        sources = [f"127.0.0.{i}" for i in range(1, 7)]
        with in_netns(self.ns):
            seen = self.accepted(group, sources, "127.0.0.1")
        for source in sources:
            self.assertEqual(seen[source], [worker_for(source, 3)] * 4, source)

    def test_ipv6_each_address_on_its_worker(self):
        group = self.group("tcp6:0", 2)
        sources = ["fd00::1"] + [f"fd00::{i:x}" for i in range(2, 10)]
        with in_netns(self.ns):
            seen = self.accepted(group, sources, "fd00::1")
        for source in sources:
            self.assertEqual(seen[source], [worker_for(source, 2)] * 4, source)
        self.assertEqual({i for indices in seen.values() for i in indices}, {0, 1})

    def test_udp_datagrams_go_where_the_cards_tcp_goes(self):
        with in_netns(self.ns):
            group = listening_group(parse_endpoint("tcp:0:interface=127.0.0.1"), 3, kind=socket.SOCK_DGRAM)
            self.addCleanup(lambda: [s.close() for s in group])
            port = group[0].getsockname()[1]
            sources = [f"127.0.0.{i}" for i in range(1, 8)]
            for source in sources:
                for n in range(3):
                    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    client.bind((source, 0))  # a new source port each time
                    client.sendto(b"x", ("127.0.0.1", port))
                    client.close()
            time.sleep(0.1)
            seen = {}
            for index, sock in enumerate(group):
                while True:
                    try:
                        _, peer = sock.recvfrom(100)
                    except BlockingIOError:
                        break
                    seen.setdefault(peer[0], []).append(index)
        for source in sources:
            self.assertEqual(seen[source], [worker_for(source, 3)] * 3, source)

    def test_a_port_in_use_is_refused_with_a_sentence(self):
        with in_netns(self.ns):
            taken = socket.socket()
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            try:
                with self.assertRaises(ListenError) as caught:
                    listening_group(parse_endpoint(f"tcp:{port}:interface=127.0.0.1"), 2)
                # nor may it join a group of someone else's
                other = socket.socket()
                other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                other.bind(("127.0.0.1", 0))
                other.listen()
                with self.assertRaises(ListenError):
                    listening_group(parse_endpoint(f"tcp:{other.getsockname()[1]}:interface=127.0.0.1"), 2)
                other.close()
            finally:
                taken.close()
        self.assertIn(f"cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use", str(caught.exception))
