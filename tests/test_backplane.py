"""
The backplane of C{--workers} (L{sevpn.backplane}): the names, the
rtnetlink requests, and two workers' switches joined by a real Linux
bridge in a namespace of the test's own, in one process: unicast reaches
the other worker's card, a broadcast reaches every other card once.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from scripts.netns import in_netns, skip_reason
from sevpn.backplane import (
    GROUP_FWD_MASK, TAP_MTU, BackplaneError, Links, WorkerBackplane, backplane_for, bridge_attributes,
    ensure_bridge, netfilter_warning, remove_bridge,
)
from sevpn.fabric import Segment
from sevpn.switch import VirtualHub
from tests.support import BROADCAST, FakeTap, frame, mac


class NameTests(SynchronousTestCase):
    def test_short_hub_names_read_as_they_are(self):
        backplane = backplane_for("DEFAULT")
        self.assertEqual(backplane.bridge, "br-DEFAULT")
        self.assertEqual([backplane.tap_name(w) for w in (0, 1, 999)], ["vs-DEFAULT-0", "vs-DEFAULT-1",
                                                                       "vs-DEFAULT-999"])
        self.assertTrue(backplane.managed)
        self.assertEqual(backplane.mtu, TAP_MTU)

    def test_long_hub_names_are_hashed_and_fit(self):
        for hub in ("engineering", "a" * 64, "x.y_z-w"):
            backplane = backplane_for(hub)
            self.assertLessEqual(len(backplane.bridge), 15)
            for worker in (0, 9, 1023):
                self.assertLessEqual(len(backplane.tap_name(worker)), 15)
        # a name is a function of the hub alone, and two hubs do not share one
        self.assertEqual(backplane_for("engineering").bridge, backplane_for("engineering").bridge)
        self.assertNotEqual(backplane_for("engineering").bridge, backplane_for("engineerinG").bridge)
        self.assertNotEqual(backplane_for("engineering").tap_name(1), backplane_for("engineerinG").tap_name(1))
        # every worker of one hub has the same kind of name, whatever its index
        self.assertEqual(backplane_for("ninechars").tap_name(0)[:10], backplane_for("ninechars").tap_name(500)[:10])

    def test_a_fabric_hub_uses_its_segment(self):
        segment = Segment("DEFAULT", 100, mtu=1450)
        backplane = backplane_for("DEFAULT", [segment])
        self.assertEqual((backplane.bridge, backplane.tap_name(3), backplane.mtu), ("br-100", "vt100-3", 1450))
        self.assertFalse(backplane.managed)
        self.assertEqual(backplane_for("OTHER", [segment]).bridge, "br-OTHER")

    def test_a_hub_whose_bridge_is_a_segments_is_refused(self):
        with self.assertRaises(BackplaneError) as caught:
            backplane_for("100", [Segment("DEFAULT", 100)])
        self.assertIn("bridge of VNI 100", str(caught.exception))

    def test_the_bridge_request(self):
        data = bridge_attributes("br-X")
        self.assertIn(b"br-X\0", data)
        self.assertIn(b"bridge", data)
        self.assertIn(GROUP_FWD_MASK.to_bytes(2, "little"), data)


class KernelTests(TestCase):
    """Two workers' switches in one process, joined by a real bridge."""

    timeout = 60

    def setUp(self):
        reason = skip_reason()
        if reason:
            raise SkipTest(reason)
        self.ns = f"wk-bp{os.getpid() % 100000}"
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", self.ns])
        self.links = Links()
        self.backplane = backplane_for("DEFAULT")

    def ip(self, *args) -> str:
        return subprocess.run(["ip", "-n", self.ns, *args], check=True, capture_output=True, text=True).stdout

    def link(self, name) -> dict:
        return json.loads(self.ip("-j", "-d", "link", "show", name))[0]

    def worker(self, index):
        vhub = VirtualHub("DEFAULT", time.monotonic, max_entries=1024)
        workers = WorkerBackplane(index, reactor, backplane_for, self.links)
        with in_netns(self.ns):
            workers.attach(vhub)
        self.addCleanup(workers.close)
        return vhub, workers

    def frame(self, dst, src, text: bytes) -> bytes:
        # not IPv4: where br_netfilter is active the bridge would check an IPv4 header (see the module)
        return frame(dst, src, text + bytes(54 - len(text)), ethertype=b"\x88\xb5")

    def card(self, vhub, n):
        card = FakeTap(reactor)
        vhub.add_port(card)
        card.claim = vhub.claim(mac(n), card)
        return card

    def test_the_bridge_is_made_as_the_segments_switch(self):
        with in_netns(self.ns):
            self.assertTrue(ensure_bridge(self.backplane, self.links))
            self.assertFalse(ensure_bridge(self.backplane, self.links))  # there already: reused
        info = self.link("br-DEFAULT")
        data = info["linkinfo"]["info_data"]
        self.assertEqual(info["linkinfo"]["info_kind"], "bridge")
        self.assertEqual((data["stp_state"], data["mcast_snooping"], data["group_fwd_mask"]), (0, 0, "0xfff8"))
        self.assertEqual(info.get("inet6_addr_gen_mode"), "none")
        self.assertIn("UP", info["flags"])

    def test_a_device_of_another_kind_is_not_taken(self):
        self.ip("link", "add", "br-DEFAULT", "type", "veth", "peer", "name", "wk-peer")
        with in_netns(self.ns), self.assertRaises(BackplaneError) as caught:
            ensure_bridge(self.backplane, self.links)
        self.assertIn("br-DEFAULT exists but is a veth device", str(caught.exception))

    def test_a_fabric_hub_gets_no_second_port(self):
        # its fabric port (sevpn.fabricport) is its backplane port: nothing is made here
        segments = [Segment("DEFAULT", 100)]
        workers = WorkerBackplane(0, reactor, lambda hub: backplane_for(hub, segments), self.links)
        vhub = VirtualHub("DEFAULT", time.monotonic)
        with in_netns(self.ns):
            workers.attach(vhub)
        self.assertEqual((workers.ports, vhub.ports), ({}, []))
        self.assertIsNone(workers.port("DEFAULT"))
        self.assertEqual(self.ip("-o", "link", "show", "type", "bridge"), "")
        self.assertEqual(self.ip("-o", "link", "show", "type", "tun"), "")

    def test_worker_ports_join_the_bridge(self):
        vhub, workers = self.worker(0)
        info = self.link("vs-DEFAULT-0")
        self.assertEqual(info["master"], "br-DEFAULT")
        self.assertEqual(info["mtu"], TAP_MTU)
        self.assertEqual(info.get("inet6_addr_gen_mode"), "none")
        self.assertNotIn("NO-CARRIER", info["flags"])
        self.assertEqual([p.name for p in vhub.ports], ["backplane:vs-DEFAULT-0"])
        self.assertEqual(vhub.ports[0].max_macs, 1024)
        self.assertEqual(workers.describe()[0]["bridge"], "br-DEFAULT")
        # no address of its own: it says nothing into the tenants' LAN
        self.assertEqual(json.loads(self.ip("-j", "addr", "show", "vs-DEFAULT-0"))[0]["addr_info"], [])

    def test_the_tap_of_a_running_worker_is_not_taken(self):
        self.worker(1)
        other = WorkerBackplane(1, reactor, backplane_for, self.links)
        with in_netns(self.ns), self.assertRaises(BackplaneError) as caught:
            other.attach(VirtualHub("DEFAULT", time.monotonic))
        self.assertIn("vs-DEFAULT-1", str(caught.exception))
        self.assertIn("already uses it", str(caught.exception))

    def test_a_virtual_hub_made_while_running_that_cannot_join_is_said(self):
        self.worker(1)
        other = WorkerBackplane(1, reactor, backplane_for, self.links)
        with in_netns(self.ns), capturedLogs() as events:
            other.vhub_added(VirtualHub("DEFAULT", time.monotonic))  # the hub's hook: it must not raise
        [event] = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertIn("its cards on this worker do not reach those on other workers", formatEvent(event))
        self.assertEqual(other.ports, {})

    def test_the_bridge_goes_when_its_last_port_does(self):
        vhub, workers = self.worker(0)
        with in_netns(self.ns):
            self.assertEqual(remove_bridge(self.backplane, self.links), "kept bridge br-DEFAULT: vs-DEFAULT-0 still in it")
            workers.close()
            self.assertEqual(remove_bridge(self.backplane, self.links), "removed bridge br-DEFAULT")
            self.assertIsNone(remove_bridge(self.backplane, self.links))
        self.assertEqual(vhub.ports, [])

    def forwarding(self) -> set:
        ports = json.loads(subprocess.run(["bridge", "-n", self.ns, "-j", "link", "show"], capture_output=True,
                                          text=True, check=True).stdout)
        return {p["ifname"] for p in ports if p.get("master") == "br-DEFAULT" and p.get("state") == "forwarding"}

    async def wait(self, predicate, what, seconds=5.0):
        deadline = time.monotonic() + seconds
        while not predicate():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            await deferLater(reactor, 0.02, lambda: None)

    async def test_cards_on_two_workers_meet_in_the_bridge(self):
        vhub0, _ = self.worker(0)
        vhub1, _ = self.worker(1)
        a = self.card(vhub0, 1)
        b = self.card(vhub1, 2)
        c = self.card(vhub1, 3)
        d = self.card(vhub0, 4)
        # the kernel turns a new port to forwarding when it sees its carrier (linkwatch: up to a second later)
        await self.wait(lambda: self.forwarding() == {"vs-DEFAULT-0", "vs-DEFAULT-1"}, "both ports to forward", 10)
        # a broadcast from a card of worker 0: every other card once, the sender never
        a.os_sends([self.frame(BROADCAST, mac(1), b"hello everyone")])
        await self.wait(lambda: b.written and c.written and d.written, "the broadcast")
        await deferLater(reactor, 0.3, lambda: None)  # anything doubled would be here by now
        for card in (b, c, d):
            self.assertEqual([f[14:28] for f in card.written], [b"hello everyone"])
        self.assertEqual(a.written, [])
        # unicast back across the bridge: only its card
        for card in (b, c, d):
            card.written.clear()
        b.os_sends([self.frame(mac(1), mac(2), b"just for a")])
        await self.wait(lambda: a.written, "the unicast frame")
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual([f[14:24] for f in a.written], [b"just for a"])
        self.assertEqual((c.written, d.written), ([], []))
        # the bridge learned each card behind its worker's port, from the frames alone
        fdb = {(e["mac"], e["ifname"]) for e in json.loads(subprocess.run(
            ["bridge", "-n", self.ns, "-j", "fdb", "show", "br", "br-DEFAULT"], capture_output=True, text=True,
            check=True).stdout) if not e.get("flags") or "self" not in e.get("flags", [])}
        self.assertIn(("02:00:00:00:00:01", "vs-DEFAULT-0"), fdb)
        self.assertIn(("02:00:00:00:00:02", "vs-DEFAULT-1"), fdb)
        # and each worker's switch has the other's cards behind its backplane port
        self.assertEqual(vhub1.lookup(mac(1)).name, "backplane:vs-DEFAULT-1")
        self.assertEqual(vhub0.lookup(mac(2)).name, "backplane:vs-DEFAULT-0")


class NetfilterTests(SynchronousTestCase):
    def sysctls(self, **values) -> str:
        path = self.mktemp()
        os.mkdir(path)
        for family, value in values.items():
            with open(os.path.join(path, f"bridge-nf-call-{family}"), "w") as f:
                f.write(f"{value}\n")
        return path

    def test_bridged_frames_meeting_iptables_are_named(self):
        why = netfilter_warning(self.sysctls(iptables=1, ip6tables=1, arptables=0))
        self.assertIn("net.bridge.bridge-nf-call-iptables, net.bridge.bridge-nf-call-ip6tables are 1", why)
        self.assertIn("FORWARD policy of DROP", why)

    def test_quiet_without_br_netfilter_or_with_it_off(self):
        self.assertIsNone(netfilter_warning(self.sysctls(iptables=0, ip6tables=0, arptables=0)))
        self.assertIsNone(netfilter_warning(self.mktemp()))
