"""
System test of a cascade: two real hubs (twistd) in their own network
namespaces, joined by a veth (the WAN) and a cascade from hub A to hub B,
a real card (TAP) on each.  Skipped, with the reason, when not root or
without /dev/net/tun.
"""

from __future__ import annotations

import json
import os
import time

from scripts.netns import BIN, Topology, sevpn, wait_for
from scripts.netns import transfer, transfer_result
from tests.test_system import SystemTestCase


class CascadeTopology(Topology):
    """
    Hub A (the base class's hub) with card host 1, hub B with card host 2,
    and a veth between the two hubs' namespaces: A is 10.S.100.1, B is
    10.S.100.2.
    """

    prefix = "cs"

    def __init__(self) -> None:
        super().__init__(0)
        self.hub_b_ns = f"{self.tag}-b"
        self.hub_b_proc = None
        try:
            self._ns(self.hub_b_ns)
            self.wan_a, self.wan_b = f"{self.tag}wa", f"{self.tag}wb"
            self.ip("link", "add", self.wan_a, "netns", self.hub_ns, "type", "veth",
                    "peer", "name", self.wan_b, "netns", self.hub_b_ns)
            self.ip("-n", self.hub_ns, "addr", "add", f"{self.wan_addr('a')}/24", "dev", self.wan_a)
            self.ip("-n", self.hub_b_ns, "addr", "add", f"{self.wan_addr('b')}/24", "dev", self.wan_b)
            self.ip("-n", self.hub_ns, "link", "set", self.wan_a, "up")
            self.ip("-n", self.hub_b_ns, "link", "set", self.wan_b, "up")
            self.add_host(1)
            self.add_host(2)
        except Exception:
            self.close()
            raise

    def wan_addr(self, side: str) -> str:
        return f"10.{self.subnet}.100.{1 if side == 'a' else 2}"

    def hub_of(self, i: int) -> str:
        return self.hub_ns if i == 1 else self.hub_b_ns

    @property
    def hub_b_state(self) -> str:
        return os.path.join(self.dir, "hub-b")

    def ca_file(self, i: int) -> str:
        return os.path.join(self.hub_state if i == 1 else self.hub_b_state, "ca.pem")

    def start_hub_b(self):
        stale = os.path.join(self.hub_b_state, "control.sock")
        if os.path.exists(stale):
            os.unlink(stale)
        self.hub_b_proc = self.spawn(
            self.hub_b_ns, "hub-b", os.path.join(BIN, "twistd"), "-n",
            "--pidfile=", "sevpn-hub", "--state-dir", self.hub_b_state, "--listen", "tcp:5555",
            "--hostname", self.hub_addr(2), "--hostname", self.wan_addr("b"),
        )
        wait_for(lambda: os.path.exists(os.path.join(self.hub_b_state, "control.sock")), 30, "hub B to start")

    def add_user_b(self, user: str) -> None:
        sevpn("hub", "user", "add", user, "--state-dir", self.hub_b_state,
              "--password-file", os.path.join(self.dir, "password"))

    def cascades(self) -> list:
        return json.loads(sevpn("hub", "cascade", "list", "--json", "--state-dir", self.hub_state).stdout)

    def sessions(self, state: str) -> list:
        return json.loads(sevpn("hub", "sessions", "--json", "--state-dir", state).stdout)

    def wait_forwarding(self, timeout: float = 30) -> dict:
        def ready():
            [cascade] = self.cascades()
            return cascade if cascade["state"] == "connected" and cascade["loop_state"] == "forwarding" else None

        return wait_for(ready, timeout, f"the cascade to forward (hub A: {self.log('hub')[-1500:]})")


class Cascade(SystemTestCase):
    """Two sites, one Ethernet segment."""

    @classmethod
    def make_topology(cls):
        return CascadeTopology()

    @classmethod
    def start(cls, topo):
        topo.add_user("u1")
        topo.add_user_b("u2")
        topo.add_user_b("site-a")
        sevpn("hub", "cascade", "allow", "site-a", "--state-dir", topo.hub_b_state)
        topo.start_hub()
        topo.start_hub_b()
        sevpn("hub", "cascade", "add", "to-b", "--state-dir", topo.hub_state, "--hub-name", "DEFAULT",
              "--to", f"{topo.wan_addr('b')}:5555", "--remote-hub", "DEFAULT", "--user", "site-a",
              "--password-file", os.path.join(topo.dir, "password"), "--ca-file", topo.ca_file(2))
        for i in (1, 2):
            topo.start_card(i)
            topo.wait_connected(i)
        topo.wait_forwarding()

    def test_a_ping_across_the_cascade(self):
        topo = self.topo
        topo.ping(1, 2)
        topo.ping(2, 1)
        [mine] = [s for s in topo.sessions(topo.hub_state) if s["kind"] == "cascade"]
        self.assertEqual((mine["cascade"], mine["state"], mine["loop_state"]), ("to-b", "connected", "forwarding"))
        self.assertEqual(mine["remote"], f"DEFAULT at {topo.wan_addr('b')}:5555")
        self.assertGreater(mine["frames_out"], 0)
        [theirs] = [s for s in topo.sessions(topo.hub_b_state) if s["kind"] == "cascade"]
        self.assertEqual((theirs["user"], theirs["id"]), ("site-a", mine["id"]))
        # hub B learned card 1's MAC on the cascade's session
        macs = json.loads(sevpn("hub", "macs", "--json", "--state-dir", topo.hub_b_state).stdout)["DEFAULT"]["macs"]
        card1 = topo.card_status(1)["mac"]
        self.assertIn({"mac": card1, "port": theirs["id"]}, [{"mac": m["mac"], "port": m["port"]} for m in macs])
        human = sevpn("hub", "sessions", "--state-dir", topo.hub_state).stdout
        self.assertTrue(any("cascade" in line and topo.wan_addr("b") in line for line in human.splitlines()), human)
        self.assertNotIn("LOOP", topo.log("hub") + topo.log("hub-b"))

    def test_b_transfer_survives_a_cut_of_the_cascade(self):
        topo = self.topo
        topo.ping(1, 2)
        [before] = topo.cascades()
        run = transfer(topo, 1, 2, 20, rate=2 << 20)  # ~10 s: still flowing when the cut comes
        time.sleep(3)
        topo.run(topo.hub_ns, "ip", "link", "set", topo.wan_a, "down")
        topo.run(topo.hub_ns, "ss", "-K", "dst", topo.wan_addr("b"), check=False)
        topo.run(topo.hub_b_ns, "ss", "-K", "dst", topo.wan_addr("a"), check=False)
        time.sleep(3)
        topo.run(topo.hub_ns, "ip", "link", "set", topo.wan_a, "up")
        wait_for(lambda: topo.cascades()[0]["resumes"] >= 1, 30, "the cascade to resume")
        result, expected = transfer_result(topo, *run)
        self.assertIsNone(result["error"])  # the TCP connection inside was never reset
        self.assertEqual(result["bytes"], 20 << 20)
        self.assertEqual(result["sha256"], expected)
        [after] = topo.cascades()
        self.assertEqual((after["id"], after["resumes"], after["state"]), (before["id"], 1, "connected"))
        self.assertEqual(after["frames_dropped"], 0)
        [theirs] = [s for s in topo.sessions(topo.hub_b_state) if s["kind"] == "cascade"]
        self.assertEqual((theirs["resumes"], theirs["frames_dropped"]), (1, 0))
        self.assertIn("lost the link to hub", topo.log("hub"))
        self.assertIn("resumed session with hub DEFAULT", topo.log("hub"))
