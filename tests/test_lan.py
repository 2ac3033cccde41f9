"""
System tests of reaching a real LAN: the hub bridged into a LAN that has a
real DHCP server (dnsmasq) and a host behind a Linux bridge; a hub TAP
port in a Linux bridge; persistent TAPs that keep a card's addresses and
bridge membership across restarts.  Real twistd processes, TAP devices,
TLS and programs, in namespaces these tests make.  Skipped with the reason
when not root, or when dnsmasq / dhclient cannot be installed.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys

from twisted.trial.unittest import SkipTest

from scripts.netns import (
    BIN, Lan, addresses, dhclient_unavailable, dnsmasq_unavailable, env, link, sevpn, start_card_on, wait_for,
)
from tests.test_system import SystemTestCase

CARD_TAP = "tb0"


class LanTestCase(SystemTestCase):
    """A system test class whose topology may have a L{Lan} (removed with it)."""

    lan = None
    needs = ()

    def setUp(self):
        for check in self.needs:
            reason = check()
            if reason:
                raise SkipTest(reason)
        super().setUp()

    def _done(self):
        cls = type(self)
        last = cls._remaining == 1
        super()._done()
        if last and cls.lan is not None:
            cls.lan.close()

    @classmethod
    def make_lan(cls, topo, **kw) -> Lan:
        lan = cls.lan = Lan(topo, **kw)
        atexit.register(lan.close)
        return lan

    def ping(self, ns: str, address: str, *extra: str) -> None:
        out = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", *extra, address],
                             capture_output=True, text=True, timeout=60)
        topo = self.topo
        self.assertEqual(out.returncode, 0, f"ping {address} from {ns} failed: {out.stdout[-400:]}\n"
                         f"card1: {topo.log('card1')[-1500:]}\nhub: {topo.log('hub')[-1500:]}")

    def hub_macs(self) -> dict:
        return json.loads(sevpn("hub", "macs", "--json", "--state-dir", self.topo.hub_state).stdout)

    def capture(self, ns: str, dev: str, marker: str, seconds: float = 5, count: int = 1):
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "scripts.rawframe", "capture", dev, marker,
             str(seconds), str(count)], stdout=subprocess.PIPE, text=True, env=env(),
        )
        self.assertEqual(proc.stdout.readline().strip(), "ready")
        return proc

    def captured(self, proc) -> list:
        out, _ = proc.communicate(timeout=30)
        return [bytes.fromhex(h) for h in json.loads(out)]

    def send_raw(self, ns: str, dev: str, frame: bytes) -> None:
        self.topo.run(ns, sys.executable, "-m", "scripts.rawframe", "send", dev, frame.hex())


class BridgedLan(LanTestCase):
    """
    The hub bridges virtual hub DEFAULT into the LAN (--bridge); card 1
    asks for its address by DHCP (--dhcp) and gets it from the LAN's
    dnsmasq through the VPN.
    """

    hosts = 1
    needs = (dnsmasq_unavailable, dhclient_unavailable)

    @classmethod
    def start(cls, topo):
        lan = cls.make_lan(topo)
        lan.own_etc(topo.host(1))
        topo.add_user("u1")
        topo.start_hub("--bridge", f"DEFAULT={lan.hub_if}")
        start_card_on(topo, 1, CARD_TAP, "--dhcp")
        topo.wait_connected(1)
        cls.lease = wait_for(lambda: [a for a in addresses(topo, topo.host(1), CARD_TAP)
                                      if a.startswith(lan.prefix + ".")],
                             60, f"a DHCP lease on card 1 (card: {topo.log('card1')[-1500:]}, "
                                 f"dnsmasq: {topo.log('dnsmasq')[-1500:]})")[0]

    def test_card_gets_its_lease_from_the_lans_dnsmasq(self):
        lan, topo = self.lan, self.topo
        address = self.lease.split("/")[0]
        self.assertTrue(100 <= int(address.rsplit(".", 1)[1]) <= 150, self.lease)
        self.assertTrue(self.lease.endswith("/24"))
        card_mac = topo.card_status(1)["mac"]
        self.assertIn(f"DHCPACK(br0) {address} {card_mac}", topo.log("dnsmasq"))
        status = topo.card_status(1)["interface"]
        self.assertTrue(status["dhcp"])
        self.assertEqual(status["dhcp_client"]["state"], "bound")
        self.assertEqual(status["dhcp_client"]["address"], address)
        self.assertIn(f"card {CARD_TAP}: DHCP lease {address}", topo.log("card1"))
        self.assertTrue(lan.router)

    def test_card_pings_the_lan_host_and_its_router(self):
        self.ping(self.topo.host(1), self.lan.host)
        self.ping(self.topo.host(1), self.lan.router)

    def test_full_size_frames_with_df_pass(self):
        self.ping(self.topo.host(1), self.lan.host, "-M", "do", "-s", "1472")
        self.ping(self.lan.host_ns, self.lease.split("/")[0], "-M", "do", "-s", "1472")

    def test_the_lans_macs_show_in_hub_macs(self):
        lan = self.lan
        self.ping(self.topo.host(1), lan.host)
        table = {m["mac"]: m["port"] for m in self.hub_macs()["DEFAULT"]["macs"]}
        self.assertEqual(table.get(lan.mac(lan.host_ns)), f"bridge:{lan.hub_if}")
        self.assertEqual(table.get(lan.mac(lan.ns, "br0")), f"bridge:{lan.hub_if}")
        status = json.loads(sevpn("hub", "status", "--json", "--state-dir", self.topo.hub_state).stdout)
        [bridge] = status["bridges"]
        self.assertEqual((bridge["port"], bridge["hub"]), (f"bridge:{lan.hub_if}", "DEFAULT"))
        self.assertGreater(bridge["frames_in"], 0)

    def test_the_lease_is_released_when_the_card_stops(self):
        lan, topo = self.lan, self.topo
        address = self.lease.split("/")[0]
        topo.stop(topo.cards[1])
        self.assertIn(f"DHCPRELEASE(br0) {address}", topo.log("dnsmasq"))
        self.assertIn("DHCP lease released", topo.log("card1"))
        self.assertEqual([a for a in addresses(topo, topo.host(1), CARD_TAP) if a.startswith(lan.prefix)], [])
        start_card_on(topo, 1, CARD_TAP, "--dhcp")
        topo.wait_connected(1)
        type(self).lease = wait_for(lambda: [a for a in addresses(topo, topo.host(1), CARD_TAP)
                                             if a.startswith(lan.prefix + ".")], 60, "a new lease")[0]

    def test_vlan_tagged_frames_cross_unchanged_both_ways(self):
        lan, topo = self.lan, self.topo
        card = bytes.fromhex(topo.card_status(1)["mac"].replace(":", ""))
        host = bytes.fromhex(lan.mac(lan.host_ns).replace(":", ""))
        ways = [
            (lan.host_ns, "eth0", topo.host(1), CARD_TAP, card, host, b"\x81\x00\x30\x0a"),  # VLAN 10, priority 1
            (topo.host(1), CARD_TAP, lan.host_ns, "eth0", host, card, b"\x81\x00\x00\x14"),  # VLAN 20
        ]
        for src_ns, src_dev, dst_ns, dst_dev, dst, src, tag in ways:
            marker = f"vlan-{src_dev}-to-{dst_dev}"
            frame = dst + src + tag + b"\x08\x00" + marker.encode() + b"!" * 40
            capture = self.capture(dst_ns, dst_dev, marker)
            self.send_raw(src_ns, src_dev, frame)
            self.assertEqual(self.captured(capture), [frame], f"{src_dev} -> {dst_dev}")

    def test_bridging_an_interface_the_hub_listens_on_is_refused(self):
        """A second hub on its own state dir: refused with a sentence, unless --bridge-force."""
        topo = self.topo
        dev = f"{self.lan.tag}f"
        topo.ip("-n", topo.hub_ns, "link", "add", dev, "type", "veth", "peer", "name", dev + "p")
        topo.ip("-n", topo.hub_ns, "addr", "add", "10.66.0.1/24", "dev", dev)
        state = os.path.join(topo.dir, "hub2")
        base = ["ip", "netns", "exec", topo.hub_ns, os.path.join(BIN, "twistd"), "-n", "--pidfile=", "sevpn-hub",
                "--state-dir", state, "--listen", "tcp:5556", "--bridge", f"DEFAULT={dev}"]
        refused = subprocess.run(base, capture_output=True, text=True, timeout=60)
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn(f"--bridge DEFAULT={dev}: {dev} carries 10.66.0.1, an address the hub listens on (0.0.0.0)",
                      refused.stdout + refused.stderr)
        self.assertNotIn("Traceback", refused.stdout + refused.stderr)
        forced = topo.spawn(topo.hub_ns, "hub2", *base[4:], "--bridge-force")
        try:
            wait_for(lambda: f"virtual hub DEFAULT bridged to {dev}" in topo.log("hub2") or forced.poll() is not None,
                     30, "the forced hub to bridge")
            self.assertIsNone(forced.poll(), topo.log("hub2")[-1500:])
        finally:
            topo.stop(forced)


class BridgeTap(LanTestCase):
    """
    The hub's TAP port (--bridge-tap) is a persistent TAP in a Linux
    bridge of the hub's namespace, with a host behind the bridge; it stays
    in the bridge across a hub restart.
    """

    hosts = 1

    @classmethod
    def start(cls, topo):
        lan = cls.make_lan(topo, prefix="10.78.0", dhcp=False)  # the host behind br0, reached via LAN's bridge
        cls.tap = f"{lan.tag}t"
        hub = topo.hub_ns
        topo.run(hub, sys.executable, "-m", "sevpn.cli", "nic", "create", cls.tap, "--state-dir",
                 os.path.join(topo.dir, "hubtap"))
        # the hub's side of the LAN: its veth and the TAP in one Linux bridge of the hub's namespace
        topo.ip("-n", hub, "link", "add", "tbbr", "type", "bridge")
        topo.ip("-n", hub, "link", "set", "tbbr", "up")
        for port in (lan.hub_if, cls.tap):
            topo.ip("-n", hub, "link", "set", port, "master", "tbbr")
        topo.add_user("u1")
        topo.start_hub("--bridge-tap", f"DEFAULT={cls.tap}")
        start_card_on(topo, 1, CARD_TAP, "--address", "10.78.0.2/24")
        topo.wait_connected(1)

    def test_card_pings_the_host_behind_the_linux_bridge(self):
        self.ping(self.topo.host(1), self.lan.host)
        self.ping(self.topo.host(1), self.lan.host, "-M", "do", "-s", "1472")
        table = {m["mac"]: m["port"] for m in self.hub_macs()["DEFAULT"]["macs"]}
        self.assertEqual(table.get(self.lan.mac(self.lan.host_ns)), f"tap:{self.tap}")

    def test_the_tap_stays_in_its_bridge_across_a_hub_restart(self):
        topo = self.topo
        self.ping(topo.host(1), self.lan.host)
        topo.stop(topo.hub_proc)
        down = link(topo, topo.hub_ns, self.tap)
        self.assertEqual(down.get("master"), "tbbr")
        self.assertIn("NO-CARRIER", down["flags"])  # a disabled bridge port while the hub is away
        topo.start_hub("--bridge-tap", f"DEFAULT={self.tap}")
        topo.wait_connected(1, timeout=60)
        up = link(topo, topo.hub_ns, self.tap)
        self.assertEqual(up.get("master"), "tbbr")
        self.assertNotIn("NO-CARRIER", up["flags"])
        self.assertIn("persistent: it stays in its bridge across hub restarts", topo.log("hub"))
        wait_for(lambda: subprocess.run(["ip", "netns", "exec", topo.host(1), "ping", "-c", "1", "-W", "1",
                                         self.lan.host], capture_output=True).returncode == 0,
                 30, "the host behind the bridge after the hub's restart")


class PersistentCards(LanTestCase):
    """
    Persistent TAPs made with 'sevpn nic create': card 1's addresses (set
    by the card) and card 2's TAP's membership in a Linux bridge of its
    host survive the cards' restarts; without a card the TAPs show
    NO-CARRIER.
    """

    hosts = 2

    @classmethod
    def start(cls, topo):
        for i in (1, 2):
            topo.add_user(f"u{i}")
            topo.run(topo.host(i), sys.executable, "-m", "sevpn.cli", "nic", "create", CARD_TAP,
                     "--state-dir", topo.card_state(i))
        ns2 = topo.host(2)
        topo.ip("-n", ns2, "link", "add", "tbbr", "type", "bridge")
        topo.ip("-n", ns2, "addr", "add", "10.79.0.2/24", "dev", "tbbr")
        topo.ip("-n", ns2, "link", "set", "tbbr", "up")
        topo.ip("-n", ns2, "link", "set", CARD_TAP, "master", "tbbr")
        topo.start_hub()
        cls.card_args = {1: ("--address", "10.79.0.1/24", "--address", "fd00:79::1/64"), 2: ()}
        for i in (1, 2):
            start_card_on(topo, i, CARD_TAP, *cls.card_args[i])
            topo.wait_connected(i)

    def test_addresses_and_bridge_membership_survive_a_card_restart(self):
        topo = self.topo
        ns1, ns2 = topo.host(1), topo.host(2)
        wait_for(lambda: set(addresses(topo, ns1, CARD_TAP)) >= {"10.79.0.1/24", "fd00:79::1/64"}, 15,
                 "card 1's addresses")
        self.ping(ns1, "10.79.0.2")
        macs = {i: topo.card_status(i)["mac"] for i in (1, 2)}
        for i in (1, 2):
            topo.stop(topo.cards[i])
        one, two = link(topo, ns1, CARD_TAP), link(topo, ns2, CARD_TAP)
        self.assertIn("NO-CARRIER", one["flags"])
        self.assertIn("NO-CARRIER", two["flags"])
        self.assertEqual(topo.run(ns1, "cat", f"/sys/class/net/{CARD_TAP}/carrier").strip(), "0")
        self.assertEqual(set(addresses(topo, ns1, CARD_TAP)) & {"10.79.0.1/24", "fd00:79::1/64"},
                         {"10.79.0.1/24", "fd00:79::1/64"})
        self.assertEqual(two.get("master"), "tbbr")
        for i in (1, 2):
            start_card_on(topo, i, CARD_TAP, *self.card_args[i])
            topo.wait_connected(i)
        self.assertEqual({i: topo.card_status(i)["mac"] for i in (1, 2)}, macs)
        self.assertEqual(link(topo, ns2, CARD_TAP).get("master"), "tbbr")
        self.assertTrue(topo.card_status(1)["persistent"])
        wait_for(lambda: subprocess.run(["ip", "netns", "exec", ns1, "ping", "-c", "1", "-W", "1", "10.79.0.2"],
                                        capture_output=True).returncode == 0, 30, "card 2's bridge after the restart")

    def test_a_tap_in_use_cannot_be_deleted(self):
        topo = self.topo
        result = subprocess.run(["ip", "netns", "exec", topo.host(1), sys.executable, "-m", "sevpn.cli", "nic",
                                 "delete", CARD_TAP], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.strip(), f"sevpn: cannot delete TAP device {CARD_TAP}: a program (a card or "
                                                f"a hub) uses it; stop that first")
        self.assertTrue(link(topo, topo.host(1), CARD_TAP))
