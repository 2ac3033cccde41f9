"""
System tests of the UDP channel: the real hub and cards (twistd, TAP
devices, TLS over TCP and UDP beside it) in network namespaces these tests
make.  UDP is blocked without netfilter (the kernel here may have no
iptables modules): a policy-routing rule in the hub's namespace blackholes
UDP to the hub's port, ahead of the local table.
"""

from __future__ import annotations

import json
import time

from scripts.netns import Topology, sevpn, two_cards, wait_for
from tests.test_system import SystemTestCase, transfer, transfer_result


class UdpTopology(Topology):
    prefix = "ud"

    def block_udp(self) -> None:
        """Drop every UDP datagram to the hub's port 5555 as it arrives (nothing answers)."""
        self.run(self.hub_ns, "ip", "rule", "add", "pref", "100", "ipproto", "udp", "dport", "5555", "blackhole")
        if "200:" not in self.run(self.hub_ns, "ip", "rule"):
            self.run(self.hub_ns, "ip", "rule", "add", "pref", "200", "lookup", "local")
            self.run(self.hub_ns, "ip", "rule", "del", "pref", "0")

    def unblock_udp(self) -> None:
        self.run(self.hub_ns, "ip", "rule", "del", "pref", "100")

    def udp_state(self, i: int) -> str:
        return self.card_status(i).get("udp")


class UdpSystemTestCase(SystemTestCase):
    """Hub and cards with C{--udp-always}: the channel carries whenever UDP works."""

    @classmethod
    def start(cls, topo):
        two_cards(topo, hub_args=("--udp-always",), card_args=("--udp-always",))
        for i in (1, 2):
            wait_for(lambda i=i: topo.udp_state(i) == "up", 15, f"card {i}'s UDP channel to come up")

    @classmethod
    def make_topology(cls) -> Topology:
        return UdpTopology(cls.hosts)


class UdpStandsBy(SystemTestCase):
    """By default (auto) the channel stands by on a clean line: frames go over TCP."""

    @classmethod
    def start(cls, topo):
        two_cards(topo)
        for i in (1, 2):
            wait_for(lambda i=i: topo.udp_state(i) == "ready", 15, f"card {i}'s UDP channel to stand by")

    @classmethod
    def make_topology(cls) -> Topology:
        return UdpTopology(cls.hosts)

    def test_a_clean_line_carries_over_tcp(self):
        topo = self.topo
        before = topo.card_status(2)["udp_datagrams_in"]
        result, expected = transfer_result(topo, *transfer(topo, 1, 2, 20))
        self.assertIsNone(result["error"])
        self.assertEqual(result["sha256"], expected)
        after = topo.card_status(2)
        # probes only: the 20 MiB crossed the TLS link
        self.assertLess(after["udp_datagrams_in"] - before, 1000)
        self.assertEqual(after["udp"], "ready")
        self.assertEqual([s["udp"] for s in topo.hub_sessions()], ["ready", "ready"])
        self.assertRegex(sevpn("nic", "status", "--state-dir", topo.card_state(1)).stdout, r"udp:\s+ready")


class UdpUp(UdpSystemTestCase):
    """Two cards whose frames go over UDP."""

    def test_ping_and_a_transfer_over_udp(self):
        topo = self.topo
        topo.ping(1, 2)
        before = topo.card_status(2)["udp_datagrams_in"]
        result, expected = transfer_result(topo, *transfer(topo, 1, 2, 20))
        self.assertIsNone(result["error"])
        self.assertEqual(result["bytes"], 20 << 20)
        self.assertEqual(result["sha256"], expected)
        after = topo.card_status(2)
        # one datagram a segment at most: the 20 MiB crossed over UDP
        self.assertGreater(after["udp_datagrams_in"] - before, (20 << 20) // 1500)
        self.assertEqual(after["frames_lost_inbound"], 0)
        self.assertEqual(after["udp"], "up")
        sessions = topo.hub_sessions()
        self.assertEqual([s["udp"] for s in sessions], ["up", "up"])
        self.assertEqual(sum(s["udp_bad"] + s["udp_replayed"] for s in sessions), 0)
        human = sevpn("nic", "status", "--state-dir", topo.card_state(1)).stdout
        self.assertRegex(human, r"udp:\s+up")
        self.assertIn("UDP channel up", topo.log("card1"))
        status = json.loads(sevpn("hub", "status", "--json", "--state-dir", topo.hub_state).stdout)
        self.assertEqual(status["udp"], "udp:5555")


class UdpBlocked(UdpSystemTestCase):
    """UDP to the hub stops working: frames go over TCP, and come back to UDP when it works again."""

    def test_a_blocked_before_the_transfer(self):
        topo = self.topo
        topo.block_udp()
        try:
            for i in (1, 2):
                wait_for(lambda i=i: topo.udp_state(i) == "down", 15, f"card {i} to notice UDP is blocked")
            topo.ping(1, 2)
            result, expected = transfer_result(topo, *transfer(topo, 1, 2, 20))
            self.assertIsNone(result["error"])
            self.assertEqual(result["sha256"], expected)
            self.assertIn("UDP channel down", topo.log("card1"))
        finally:
            topo.unblock_udp()
        for i in (1, 2):
            wait_for(lambda i=i: topo.udp_state(i) == "up", 15, f"card {i}'s UDP channel to come back")

    def test_b_blocked_during_a_transfer(self):
        topo = self.topo
        run = transfer(topo, 1, 2, 30, rate=3 << 20)  # ten seconds
        try:
            time.sleep(2)
            topo.block_udp()
            wait_for(lambda: topo.udp_state(1) == "down", 10, "card 1 to fall back to TCP")
            time.sleep(2)
        finally:
            topo.unblock_udp()
        result, expected = transfer_result(topo, *run)
        self.assertIsNone(result["error"])  # the inner TCP lost some frames and recovered
        self.assertEqual(result["sha256"], expected)
        wait_for(lambda: topo.udp_state(1) == "up", 15, "card 1's UDP channel to come back")


class UdpResumption(UdpSystemTestCase):
    """The TCP link is cut while UDP carries the frames: the session resumes, nothing is lost."""

    def test_tcp_cuts_during_udp_traffic(self):
        topo = self.topo
        session = topo.card_status(1)["session"]
        run = transfer(topo, 1, 2, 40, rate=4 << 20)
        for n in (1, 2):
            time.sleep(2)
            self.assertEqual(topo.udp_state(1), "up")
            # only the TLS connections die (-t): the line and UDP stay
            topo.run(topo.host(1), "ss", "-K", "-t", "dst", topo.hub_addr(1), check=False)
            topo.run(topo.hub_ns, "ss", "-K", "-t", "dst", topo.host_addr(2), check=False)
            wait_for(lambda n=n: topo.card_status(1)["resumes"] >= n, 30, f"resume {n} of card 1")
            wait_for(lambda n=n: topo.card_status(2)["resumes"] >= n, 30, f"resume {n} of card 2")
        result, expected = transfer_result(topo, *run)
        self.assertIsNone(result["error"])
        self.assertEqual(result["bytes"], 40 << 20)
        self.assertEqual(result["sha256"], expected)
        for i in (1, 2):
            status = topo.wait_connected(i)
            self.assertEqual(status["frames_dropped"], 0)
            self.assertEqual(status["frames_lost_inbound"], 0)
            self.assertEqual(status["udp"], "up")
        self.assertEqual(topo.card_status(1)["session"], session)
        for s in topo.hub_sessions():
            self.assertEqual(s["frames_dropped"], 0)
            self.assertEqual(s["frames_lost_inbound"], 0)
        self.assertIn("resumed session", topo.log("card1"))
