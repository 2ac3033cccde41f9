"""
System test of the hub fabric with everything real: three hub nodes in
network namespaces on one underlay, 'sevpn fabric up' and FRR (BGP-EVPN,
a full mesh) on each, a real hub with --fabric DEFAULT=100 on each, and a
real card per node whose account lists its node and then another.
Skipped, with the reason, when not root or without FRR.

Timings are reported on stderr ("[fabric timing]"), never asserted
beyond generous time-outs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from scripts.fabric_hubs import VNI, FabricHubs
from scripts.netns import env, transfer, transfer_result, wait_for
from tests.test_system import SystemTestCase

MARKER = "fabric-hubs-broadcast"


def report(what: str, seconds: float) -> None:
    print(f"\n  [fabric timing] {what}: {seconds:.2f} s", file=sys.stderr, end="")


class Fabric(SystemTestCase):
    """Cards on three nodes, one segment; then node 1 dies and comes back."""

    timeout = 180

    @classmethod
    def make_topology(cls):
        return FabricHubs(3)

    @classmethod
    def start(cls, topo):
        for i in (1, 2, 3):
            topo.add_user(f"u{i}")  # the same users on every node
        start = time.monotonic()
        for n in topo.node_numbers:
            topo.fabric_up(n)
        cls.fabric_up = time.monotonic() - start
        start = time.monotonic()
        for n in topo.node_numbers:
            topo.start_frr(n)
        topo.wait_converged()
        cls.converged = time.monotonic() - start
        start = time.monotonic()
        for n in topo.node_numbers:
            topo.start_node_hub(n)
        # each card dials its own node first, then the next one
        for i, nodes in ((1, [1, 2]), (2, [2, 3]), (3, [3, 1])):
            topo.start_card_on_nodes(i, nodes)
        for i in (1, 2, 3):
            topo.wait_connected(i)
        cls.cards_connected = time.monotonic() - start
        cls.first_ping = None
        if topo.ping(1, 2, count=1, check=False):
            cls.first_ping = time.monotonic() - start
        cls.macs = {i: topo.card_status(i)["mac"] for i in (1, 2, 3)}

    def broadcast_counts(self, sender: int, receivers, count: int = 20) -> dict:
        """Send C{count} broadcasts from card host C{sender}; how many each receiver got."""
        topo = self.topo
        port = str(7100 + sender)
        counters = {}
        for i in receivers:
            counters[i] = subprocess.Popen(
                ["ip", "netns", "exec", topo.host(i), sys.executable, "-m", "scripts.fabric_udp", "count", port, "4",
                 MARKER], stdout=subprocess.PIPE, env=env())
            self.assertEqual(counters[i].stdout.readline().strip(), b"ready")
        sent = subprocess.run(["ip", "netns", "exec", topo.host(sender), sys.executable, "-m", "scripts.fabric_udp",
                               "send", f"192.168.{topo.subnet}.255", port, str(count), MARKER],
                              capture_output=True, text=True, timeout=30, env=env())
        self.assertEqual(sent.returncode, 0, sent.stderr)
        got = {i: int(proc.stdout.readline()) for i, proc in counters.items()}
        for proc in counters.values():
            proc.wait(10)
        return got

    def pings_without_duplicates(self, src: int, dst: int) -> None:
        topo = self.topo
        out = topo.run(topo.host(src), "ping", "-c", "5", "-i", "0.2", "-W", "2", topo.tap_addr(dst), check=False)
        self.assertIn(" 0% packet loss", out, f"ping {src} -> {dst}: {out}")
        self.assertNotIn("DUP!", out)

    def evpn_line(self, node: int, mac: str):
        return next((ln.split() for ln in self.topo.evpn_macs(node).splitlines() if ln.startswith(mac)), None)

    def test_a_convergence_is_reported(self):
        report("'sevpn fabric up' on 3 nodes", self.fabric_up)
        report("FRR started on 3 nodes -> every session up and every flood list full", self.converged)
        report("3 hubs and 3 cards started -> the cards connected", self.cards_connected)
        self.assertIsNotNone(self.first_ping, "the first ping from card 1 to card 2 was not answered")
        report("... and the first ping card 1 (node 1) -> card 2 (node 2) answered", self.first_ping)

    def test_b_ping_and_a_20_mb_transfer_across_nodes(self):
        topo = self.topo
        for src, dst in ((1, 2), (2, 1), (1, 3), (3, 2)):
            self.pings_without_duplicates(src, dst)
        start = time.monotonic()
        result, expected = transfer_result(topo, *transfer(topo, 1, 2, 20))
        report("20 MB over TCP, card 1 -> node 1 -> VXLAN -> node 2 -> card 2", time.monotonic() - start)
        self.assertIsNone(result["error"])
        self.assertEqual(result["bytes"], 20 << 20)
        self.assertEqual(result["sha256"], expected)

    def test_c_each_card_is_an_evpn_route_on_the_other_nodes(self):
        topo = self.topo
        for i in (1, 2, 3):
            for n in topo.node_numbers:
                line = wait_for(lambda: self.evpn_line(n, self.macs[i]), 10, f"card {i}'s MAC in node {n}'s EVPN")
                if n == i:
                    self.assertEqual(line[1:3], ["local", "vt100-0"])
                else:
                    self.assertEqual(line[1:3], ["remote", topo.vtep(i)])
            # the node's own entry is the hub's (static), not one the bridge learned from a frame
            fdb = json.loads(topo.run(topo.node_ns(i), "bridge", "-j", "fdb", "show", "dev", "vt100-0"))
            states = {e["mac"]: e.get("state", "") for e in fdb if e.get("master") == "br-100"}
            self.assertEqual(states.get(self.macs[i]), "static")
            others = {self.macs[j] for j in (1, 2, 3) if j != i}
            self.assertFalse(others & set(states), "another node's card was reflected as local")

    def test_d_broadcast_reaches_every_node_exactly_once(self):
        self.assertEqual(self.broadcast_counts(1, (2, 3)), {2: 20, 3: 20})
        self.assertEqual(self.broadcast_counts(3, (1, 2)), {1: 20, 2: 20})

    def test_e_a_card_that_leaves_is_withdrawn(self):
        topo = self.topo
        mac = self.macs[3]
        topo.stop(topo.cards[3])  # its goodbye ends the session
        start = time.monotonic()
        wait_for(lambda: self.evpn_line(1, mac) is None and self.evpn_line(2, mac) is None, 15,
                 "card 3's MAC to leave nodes 1 and 2")
        report("card 3 left node 3 -> its MAC withdrawn on nodes 1 and 2", time.monotonic() - start)
        topo.start_card_on_nodes(3, [3, 1])
        topo.wait_connected(3)
        wait_for(lambda: self.evpn_line(1, mac), 15, "card 3's MAC back on node 1")
        self.pings_without_duplicates(1, 3)

    def test_f_sevpn_hub_fabric(self):
        topo = self.topo
        args = ("hub", "fabric", "--state-dir", topo.node_state(3), "--frr-pathspace", topo.node_ns(3))
        view = json.loads(topo.node_command(3, *args, "--json"))
        self.assertEqual(view["problems"], [])
        self.assertEqual([(s["peer"], s["state"]) for s in view["sessions"]],
                         [(topo.vtep(1), "Established"), (topo.vtep(2), "Established")])
        [seg] = view["segments"]
        self.assertEqual((seg["vni"], seg["vtep"], seg["in_frr"], seg["local_macs"]), (VNI, topo.vtep(3), True, 1))
        self.assertEqual([(r["vtep"], r["macs"], r["fdb"], r["flood"]) for r in seg["remote_vteps"]],
                         [(topo.vtep(1), 1, 1, True), (topo.vtep(2), 1, 1, True)])
        worker = seg["hub_worker"]
        self.assertEqual((worker["tap"], worker["local_macs"], worker["reflection"]["entries"],
                          worker["reflection"]["failed"]), ("vt100-0", 1, 1, 0))
        text = topo.node_command(3, *args)
        self.assertIn(f"{topo.vtep(1)} ({topo.node_ns(1)})  Established", text)
        self.assertIn("hub worker 0: TAP vt100-0 (MTU 1500), 1 local MACs, 1 reflected into the bridge", text)

    def test_z_node_1_dies_and_comes_back(self):
        topo = self.topo
        pinger = subprocess.Popen(
            ["ip", "netns", "exec", topo.host(1), "ping", "-D", "-i", "0.1", "-W", "1", topo.tap_addr(2)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            time.sleep(1)
            killed = time.time()
            topo.kill_node(1)
            status = wait_for(lambda: (lambda s: s if s["state"] == "connected" and s["hub"].startswith(
                topo.node_addr(2)) else None)(topo.card_status(1)), 60, "card 1 to move to node 2")
            moved = time.time() - killed
            time.sleep(2)
        finally:
            pinger.terminate()
        replies = [float(line[1:line.index("]")]) for line in pinger.communicate()[0].splitlines()
                   if line.startswith("[") and "bytes from" in line]
        after = [t for t in replies if t > killed]
        self.assertTrue(after, "card 1 never heard from card 2 again")
        report("node 1 killed -> 'sevpn nic status' shows card 1 on node 2", moved)
        report("node 1 killed -> card 1's ping to card 2 answered again", after[0] - killed)
        self.assertEqual(status["hub"], f"{topo.node_addr(2)}:5555")
        # card 1 is node 2's now: node 3 learns that from node 2
        wait_for(lambda: (self.evpn_line(3, self.macs[1]) or [None] * 3)[1:3] == ["remote", topo.vtep(2)], 30,
                 "node 3 to find card 1 behind node 2")
        self.pings_without_duplicates(1, 3)
        self.pings_without_duplicates(3, 1)

        start = time.monotonic()
        topo.revive_node(1)
        topo.wait_converged()
        report("node 1 restarted -> every session and flood list back", time.monotonic() - start)
        for src, dst in ((1, 2), (2, 1), (1, 3), (3, 1), (2, 3)):
            self.pings_without_duplicates(src, dst)
        self.assertEqual(self.broadcast_counts(3, (1, 2)), {1: 20, 2: 20})
        self.assertEqual(self.broadcast_counts(2, (1, 3)), {1: 20, 3: 20})
        self.assertTrue(topo.card_status(1)["hub"].startswith(topo.node_addr(2)))  # it stays where it went
        line = wait_for(lambda: self.evpn_line(1, self.macs[1]), 15, "node 1 to learn where card 1 is")
        self.assertEqual(line[1:3], ["remote", topo.vtep(2)])
        view = json.loads(topo.node_command(1, "hub", "fabric", "--json", "--state-dir", topo.node_state(1),
                                            "--frr-pathspace", topo.node_ns(1)))
        self.assertEqual(view["problems"], [])
        self.assertEqual(view["segments"][0]["hub_worker"]["local_macs"], 0)
