"""
The fabric: FRR's configuration, the device plans and the status parsers
(pure), then three hub nodes in network namespaces with real FRR, VXLAN and
bridges (skipped, with the reason, when not root or FRR is missing).

The JSON below is what Debian's FRR 8.4.4, iproute2 6.1 and Linux print,
trimmed to a few entries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from twisted.trial.unittest import TestCase

from sevpn.fabric import (
    FabricError, FabricNode, Segment, check_underlay, describe, fabric, fabric_attach, fabric_down, fabric_up,
    format_status, frr_conf, parse_bgp_neighbors, parse_bgp_summary, parse_evpn_macs, parse_evpn_vnis,
    parse_fabric_option, parse_fdb, parse_links, plan_attach, plan_down, plan_up, segment_on_node, zebra_conf,
)
from sevpn.frr import command_runner
from scripts.fabric_topology import FabricTopology, run
from scripts.netns import env, sha256_file, wait_for
from tests.test_system import SystemTestCase

LINKS = json.dumps([
    {"ifindex": 1, "ifname": "lo", "flags": ["LOOPBACK", "UP", "LOWER_UP"], "mtu": 65536, "operstate": "UNKNOWN"},
    {"ifindex": 2, "ifname": "eth0", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"], "mtu": 1500,
     "operstate": "UP", "linkinfo": {"info_kind": "veth"}},
    {"ifindex": 3, "ifname": "br-100", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"], "mtu": 1500,
     "operstate": "UP", "linkinfo": {"info_kind": "bridge"}},
    {"ifindex": 4, "ifname": "vx-100", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"], "mtu": 1500,
     "master": "br-100", "operstate": "UNKNOWN",
     "linkinfo": {"info_kind": "vxlan",
                  "info_data": {"id": 100, "local": "10.77.0.1", "port": 4789, "learning": False, "ttl": 0,
                                "ageing": 300},
                  "info_slave_kind": "bridge",
                  "info_slave_data": {"state": "forwarding", "learning": False, "flood": True,
                                      "neigh_suppress": False}}},
    {"ifindex": 5, "ifname": "fbc1", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"], "mtu": 1500,
     "master": "br-100", "operstate": "UP",
     "linkinfo": {"info_kind": "veth", "info_slave_kind": "bridge",
                  "info_slave_data": {"state": "forwarding", "learning": True, "flood": True,
                                      "neigh_suppress": False}}},
])

EVPN_VNIS = """{
  "100":{
    "vni":100, "type":"L2", "vxlanIf":"vx-100", "numMacs":4, "numArpNd":0, "numRemoteVteps":1,
    "tenantVrf":"default", "remoteVteps":[ "10.77.0.2" ]
  }
}"""

EVPN_VNIS_ALONE = """{
  "100":{ "vni":100, "type":"L2", "vxlanIf":"vx-100", "numMacs":3, "numArpNd":0, "numRemoteVteps":0,
    "tenantVrf":"default" }
}"""

EVPN_MACS = """{
  "100":{
    "numMacs":4,
    "macs":{
      "02:23:e8:44:fc:40":{ "type":"local", "intf":"fbc1", "localSequence":0, "remoteSequence":0,
        "detectionCount":0, "isDuplicate":false },
      "8a:07:a1:62:41:c2":{ "type":"remote", "remoteVtep":"10.77.0.2", "localSequence":0, "remoteSequence":0,
        "detectionCount":0, "isDuplicate":false },
      "02:00:00:00:aa:03":{ "type":"local", "intf":"fbc1", "localSequence":0, "remoteSequence":0,
        "detectionCount":0, "isDuplicate":false },
      "02:00:00:00:aa:01":{ "type":"local", "intf":"fbc1", "localSequence":0, "remoteSequence":0,
        "detectionCount":0, "isDuplicate":false }
    }
  }
}"""

BGP_SUMMARY = """{
  "routerId":"10.77.0.1", "as":65000, "vrfId":0, "vrfName":"default", "tableVersion":0, "ribCount":3,
  "peerCount":1,
  "peers":{
    "10.77.0.2":{ "hostname":"fb2", "remoteAs":65000, "localAs":65000, "version":4, "msgRcvd":4, "msgSent":4,
      "tableVersion":0, "outq":0, "inq":0, "peerUptime":"00:00:02", "peerUptimeMsec":2000,
      "peerUptimeEstablishedEpoch":1795733490, "pfxRcd":1, "pfxSnt":1, "state":"Established", "peerState":"OK",
      "connectionsEstablished":1, "connectionsDropped":0, "idType":"ipv4" }
  },
  "failedPeers":0, "displayedPeers":1, "totalPeers":1, "dynamicPeers":0
}"""

BGP_SUMMARY_DOWN = BGP_SUMMARY.replace('"state":"Established"', '"state":"Active"')

FDB = json.dumps([
    {"mac": "33:33:00:00:00:01", "ifname": "eth0", "flags": ["self"], "state": "permanent"},
    {"mac": "8a:07:a1:62:41:c2", "ifname": "vx-100", "flags": ["extern_learn"], "master": "br-100", "state": ""},
    {"mac": "0e:73:95:b3:5d:10", "ifname": "vx-100", "flags": [], "master": "br-100", "state": "permanent"},
    {"mac": "8a:07:a1:62:41:c2", "ifname": "vx-100", "dst": "10.77.0.2", "flags": ["self", "extern_learn"],
     "state": ""},
    {"mac": "00:00:00:00:00:00", "ifname": "vx-100", "dst": "10.77.0.2", "flags": ["self"], "state": "permanent"},
    {"mac": "02:00:00:00:aa:01", "ifname": "fbc1", "flags": [], "master": "br-100", "state": "static"},
    {"mac": "02:23:e8:44:fc:40", "ifname": "fbc1", "flags": [], "master": "br-100", "state": ""},
])


def two_nodes(**kw):
    return fabric({"fb1": "10.77.0.1", "fb2": "10.77.0.2"}, [Segment("DEFAULT", 100)], **kw)


class SegmentTests(TestCase):
    def test_default_names(self):
        seg = Segment("DEFAULT", 100)
        self.assertEqual((seg.bridge, seg.vxlan), ("br-100", "vx-100"))

    def test_names_of_the_largest_vni_fit_linux(self):
        seg = Segment("DEFAULT", (1 << 24) - 1)
        for name in (seg.bridge, seg.vxlan, seg.tap_name(999)):
            self.assertLessEqual(len(name), 15)

    def test_too_long_a_name_is_refused(self):
        e = self.assertRaises(FabricError, Segment, "DEFAULT", 100, bridge="a-sixteen-chars!")
        self.assertIn("15", str(e))
        self.assertRaises(FabricError, Segment, "DEFAULT", 100, vxlan="vx/100")

    def test_vni_range(self):
        for vni in (0, 1 << 24, -1, True, "100"):
            self.assertRaises(FabricError, Segment, "DEFAULT", vni)

    def test_fabric_option(self):
        self.assertEqual(parse_fabric_option("DEFAULT=100"), ("DEFAULT", 100))
        for bad in ("DEFAULT", "=100", "DEFAULT=x", "DEFAULT=0", "DEFAULT=16777216"):
            e = self.assertRaises(FabricError, parse_fabric_option, bad)
            self.assertTrue("--fabric" in str(e) or "VNI" in str(e), str(e))


class NodeTests(TestCase):
    def test_mesh(self):
        nodes = fabric({"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3"}, [Segment("DEFAULT", 100)])
        self.assertEqual(nodes["a"].peers, ("10.0.0.2", "10.0.0.3"))
        self.assertEqual(nodes["c"].peers, ("10.0.0.1", "10.0.0.2"))
        self.assertFalse(any(n.reflector for n in nodes.values()))

    def test_two_reflectors(self):
        nodes = fabric({"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3", "d": "10.0.0.4"},
                       [Segment("DEFAULT", 100)], reflectors=["a", "b"])
        self.assertEqual(nodes["a"].peers, ("10.0.0.2", "10.0.0.3", "10.0.0.4"))
        self.assertEqual(nodes["a"].clients, ("10.0.0.3", "10.0.0.4"))  # b is a peer, not a client
        self.assertEqual(nodes["c"].peers, ("10.0.0.1", "10.0.0.2"))
        self.assertEqual(nodes["c"].clients, ())

    def test_unknown_reflector_and_shared_vtep(self):
        self.assertRaises(FabricError, fabric, {"a": "10.0.0.1"}, [], reflectors=["z"])
        self.assertRaises(FabricError, fabric, {"a": "10.0.0.1", "b": "10.0.0.1"}, [])

    def test_what_would_break_the_config_is_refused(self):
        for kw in ({"name": "a\nrouter bgp 1"}, {"vtep": "10.0.0.300"}, {"peers": ("10.0.0.1",)},
                   {"clients": ("10.0.0.9",)}, {"password": "two words"}, {"password": "x\ny"}, {"asn": 0},
                   {"segments": (Segment("A", 100), Segment("B", 100))},
                   {"segments": (Segment("A", 100), Segment("B", 200, bridge="br-100"))}):
            args = dict(name="a", vtep="10.0.0.1")
            args.update(kw)
            self.assertRaises(FabricError, FabricNode, **args)

    def test_segment_lookup(self):
        node = two_nodes()["fb1"]
        self.assertEqual(node.segment(100), node.segment("DEFAULT"))
        self.assertRaises(FabricError, node.segment, 200)


class ConfigTests(TestCase):
    def test_mesh_node(self):
        self.assertEqual(frr_conf(two_nodes(password="s3cret")["fb1"]), (
            "! sevpn fabric node fb1: generated by sevpn, changes are overwritten\n"
            "frr defaults datacenter\n"
            "hostname fb1\n"
            "!\n"
            "router bgp 65000\n"
            " bgp router-id 10.77.0.1\n"
            " no bgp default ipv4-unicast\n"
            " neighbor 10.77.0.2 remote-as internal\n"
            " neighbor 10.77.0.2 update-source 10.77.0.1\n"
            " neighbor 10.77.0.2 password s3cret\n"
            " !\n"
            " address-family l2vpn evpn\n"
            "  neighbor 10.77.0.2 activate\n"
            "  advertise-all-vni\n"
            " exit-address-family\n"
            "exit\n"
            "!\n"
        ))

    def test_reflector_names_its_clients(self):
        nodes = fabric({"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3"}, [], reflectors=["a"], asn=64512)
        text = frr_conf(nodes["a"])
        self.assertIn("router bgp 64512\n", text)
        self.assertIn("  neighbor 10.0.0.2 route-reflector-client\n", text)
        self.assertIn("  neighbor 10.0.0.3 route-reflector-client\n", text)
        self.assertNotIn("route-reflector-client", frr_conf(nodes["b"]))
        self.assertNotIn("10.0.0.3", frr_conf(nodes["b"]))  # clients peer with the reflector only
        self.assertNotIn("password", text)

    def test_zebra_gets_no_bgp(self):
        text = zebra_conf(two_nodes()["fb1"])
        self.assertIn("hostname fb1", text)
        self.assertNotIn("router bgp", text)


class PlanTests(TestCase):
    node = two_nodes()["fb1"]
    seg = node.segment(100)

    def test_from_nothing(self):
        self.assertEqual(plan_up(self.node, self.seg, {}).commands, [
            ["ip", "link", "add", "br-100", "type", "bridge"],
            ["ip", "link", "set", "br-100", "addrgenmode", "none"],
            ["ip", "link", "add", "vx-100", "mtu", "1500", "type", "vxlan", "id", "100", "local", "10.77.0.1",
             "dstport", "4789", "nolearning"],
            ["ip", "link", "set", "vx-100", "addrgenmode", "none"],
            ["ip", "link", "set", "vx-100", "master", "br-100"],
            ["bridge", "link", "set", "dev", "vx-100", "learning", "off"],
            ["ip", "link", "set", "vx-100", "up"],
            ["ip", "link", "set", "br-100", "up"],
        ])

    def test_all_there_is_reused(self):
        plan = plan_up(self.node, self.seg, parse_links(LINKS))
        self.assertEqual(plan.commands, [])
        self.assertIn("reusing", plan.notes[0])

    def test_existing_bridge_gets_a_vxlan_device(self):
        links = {k: v for k, v in parse_links(LINKS).items() if k != "vx-100"}
        commands = plan_up(self.node, self.seg, links).commands
        self.assertNotIn(["ip", "link", "add", "br-100", "type", "bridge"], commands)
        self.assertEqual(commands[0][:4], ["ip", "link", "add", "vx-100"])
        self.assertNotIn(["ip", "link", "set", "br-100", "up"], commands)

    def test_vxlan_device_in_another_bridge_with_learning_is_moved(self):
        entries = json.loads(LINKS)
        entries[3]["master"] = "br-other"
        entries[3]["linkinfo"]["info_slave_data"]["learning"] = True
        entries[3]["flags"] = ["BROADCAST"]
        commands = plan_up(self.node, self.seg, parse_links(json.dumps(entries))).commands
        self.assertEqual(commands, [
            ["ip", "link", "set", "vx-100", "master", "br-100"],
            ["bridge", "link", "set", "dev", "vx-100", "learning", "off"],
            ["ip", "link", "set", "vx-100", "up"],
        ])

    def test_conflicting_devices_are_errors_that_say_what_to_do(self):
        entries = json.loads(LINKS)
        entries[3]["linkinfo"]["info_data"]["id"] = 200
        e = self.assertRaises(FabricError, plan_up, self.node, self.seg, parse_links(json.dumps(entries)))
        self.assertIn("VNI 200 (want 100)", str(e))
        self.assertIn("ip link del vx-100", str(e))
        entries = json.loads(LINKS)
        entries[2]["linkinfo"]["info_kind"] = "veth"
        e = self.assertRaises(FabricError, plan_up, self.node, self.seg, parse_links(json.dumps(entries)))
        self.assertIn("not a bridge", str(e))

    def test_attach(self):
        links = parse_links(LINKS)
        self.assertEqual(plan_attach(self.seg, "fbc1", links).commands, [])
        self.assertEqual(plan_attach(self.seg, "eth0", links).commands,
                         [["ip", "link", "set", "eth0", "master", "br-100"]])
        self.assertRaises(FabricError, plan_attach, self.seg, "vt100-0", links)

    def test_down_keeps_a_bridge_with_ports(self):
        plan = plan_down(self.node, self.seg, parse_links(LINKS))
        self.assertEqual(plan.commands, [["ip", "link", "del", "vx-100"]])
        self.assertIn("fbc1 still in it", plan.notes[0])
        links = {k: v for k, v in parse_links(LINKS).items() if k != "fbc1"}
        self.assertEqual(plan_down(self.node, self.seg, links).commands,
                         [["ip", "link", "del", "vx-100"], ["ip", "link", "del", "br-100"]])
        self.assertEqual(plan_down(self.node, self.seg, {}).commands, [])

    def test_an_existing_vxlan_device_loses_its_ipv6_address(self):
        entries = json.loads(LINKS)
        entries[3]["inet6_addr_gen_mode"] = "eui64"
        self.assertEqual(plan_up(self.node, self.seg, parse_links(json.dumps(entries))).commands, [
            ["ip", "link", "set", "vx-100", "addrgenmode", "none"],
            ["ip", "-6", "addr", "flush", "dev", "vx-100"],
        ])

    def test_attach_gives_the_segment_mtu_and_no_ipv6_address(self):
        entries = json.loads(LINKS) + [{"ifname": "vt100-0", "flags": ["BROADCAST", "UP"], "mtu": 1500,
                                        "inet6_addr_gen_mode": "eui64", "linkinfo": {"info_kind": "tun"}}]
        plan = plan_attach(Segment("DEFAULT", 100, mtu=1450), "vt100-0", parse_links(json.dumps(entries)))
        self.assertEqual(plan.commands, [
            ["ip", "link", "set", "vt100-0", "mtu", "1450"],
            ["ip", "link", "set", "vt100-0", "addrgenmode", "none"],
            ["ip", "link", "set", "vt100-0", "master", "br-100"],
        ])

    def test_what_a_hub_finds_on_its_node(self):
        seg, vtep = segment_on_node("DEFAULT", 100, parse_links(LINKS))
        self.assertEqual((seg, vtep), (Segment("DEFAULT", 100, mtu=1500), "10.77.0.1"))
        entries = json.loads(LINKS)
        entries[3]["mtu"] = 1450
        self.assertEqual(segment_on_node("DEFAULT", 100, parse_links(json.dumps(entries)))[0].mtu, 1450)
        e = self.assertRaises(FabricError, segment_on_node, "DEFAULT", 200, parse_links(LINKS))
        self.assertEqual(str(e), "--fabric DEFAULT=200: there is no bridge br-200 on this node: run 'sevpn fabric "
                                 "up --vtep ADDRESS --fabric DEFAULT=200' first (as root; docs/fabric.md)")
        entries = json.loads(LINKS)
        entries[3]["flags"] = ["BROADCAST"]
        e = self.assertRaises(FabricError, segment_on_node, "DEFAULT", 100, parse_links(json.dumps(entries)))
        self.assertIn("br-100 or vx-100 is down: run 'sevpn fabric up", str(e))
        entries[3]["master"] = "br-other"
        e = self.assertRaises(FabricError, segment_on_node, "DEFAULT", 100, parse_links(json.dumps(entries)))
        self.assertIn("bridge br-100 has no VXLAN device vx-100 in it", str(e))

    def test_the_underlay_must_carry_the_vtep_and_room_for_vxlan(self):
        addresses = json.dumps([
            {"ifname": "lo", "mtu": 65536, "addr_info": [{"family": "inet", "local": "127.0.0.1"}]},
            {"ifname": "eth0", "mtu": 1500, "addr_info": [{"family": "inet", "local": "10.77.0.1"}]},
        ])
        self.assertEqual(check_underlay("10.77.0.1", Segment("DEFAULT", 100, mtu=1450), addresses), [])
        [warning] = check_underlay("10.77.0.1", self.seg, addresses)
        self.assertIn("eth0, which carries the VTEP 10.77.0.1, has MTU 1500: VXLAN needs 1550", warning)
        self.assertIn("--mtu 1450", warning)
        e = self.assertRaises(FabricError, check_underlay, "10.77.0.9", self.seg, addresses)
        self.assertIn("--vtep 10.77.0.9 is not an address of this machine", str(e))

    def test_links_that_are_not_json(self):
        self.assertRaises(FabricError, parse_links, "Object \"link\" is unknown")


class StatusTests(TestCase):
    node = two_nodes()["fb1"]

    def test_parsers(self):
        self.assertEqual(parse_evpn_vnis(EVPN_VNIS)[100].remote_vteps, ("10.77.0.2",))
        self.assertEqual(parse_evpn_vnis(EVPN_VNIS_ALONE)[100].remote_vteps, ())
        macs = parse_evpn_macs(EVPN_MACS)[100]
        self.assertEqual(len(macs.local), 3)
        self.assertEqual(macs.per_vtep(), {"10.77.0.2": 1})
        self.assertTrue(parse_bgp_summary(BGP_SUMMARY)["10.77.0.2"].established)
        fdb = parse_fdb(FDB)["vx-100"]
        self.assertEqual(fdb.flood, ("10.77.0.2",))
        self.assertEqual(fdb.per_vtep(), {"10.77.0.2": 1})

    def test_neighbours_and_their_roles(self):
        text = json.dumps({
            "10.77.0.2": {"remoteAs": 65000, "bgpState": "Established",
                          "neighborCapabilities": {"hostName": {"advHostName": "fb1", "rcvHostName": "fb2"}},
                          "addressFamilyInfo": {"l2VpnEvpn": {"routeReflectorClient": True}}},
            "10.77.0.3": {"remoteAs": 65000, "bgpState": "Active", "addressFamilyInfo": {"l2VpnEvpn": {}}},
            "eth1": {"remoteAs": 65000},
        })
        self.assertEqual(parse_bgp_neighbors(text), ("fb1", {"10.77.0.2": True, "10.77.0.3": False}))
        self.assertEqual(parse_bgp_neighbors("{}"), ("", {}))

    def test_the_hub_workers_part(self):
        view = describe(self.node, EVPN_VNIS, EVPN_MACS, BGP_SUMMARY, FDB)
        view["segments"][0]["hub_worker"] = {"worker": 0, "tap": "vt100-0", "mtu": 1500, "local_macs": 3,
                                             "remote_macs": 1, "reflection": {"entries": 3, "failed": 0, "dropped": 0}}
        self.assertIn("  hub worker 0: TAP vt100-0 (MTU 1500), 3 local MACs, 3 reflected into the bridge (0 failed, "
                      "0 dropped), 1 remote MACs seen on the fabric port\n", format_status(view))

    def test_nothing_to_say_is_empty(self):
        for parse in (parse_evpn_vnis, parse_evpn_macs, parse_bgp_summary, parse_fdb):
            self.assertEqual(parse(""), {})
            self.assertEqual(parse("{}" if parse is not parse_fdb else "[]"), {})

    def test_garbage_is_a_sentence(self):
        e = self.assertRaises(FabricError, parse_bgp_summary, "% BGP instance not found")
        self.assertIn("not JSON", str(e))

    def test_healthy_view(self):
        view = describe(self.node, EVPN_VNIS, EVPN_MACS, BGP_SUMMARY, FDB)
        self.assertEqual(view["problems"], [])
        self.assertEqual(view["sessions"], [{"peer": "10.77.0.2", "hostname": "fb2", "state": "Established",
                                             "uptime": "00:00:02", "prefixes_received": 1,
                                             "reflector_client": False}])
        seg = view["segments"][0]
        self.assertEqual((seg["vni"], seg["bridge"], seg["vtep"], seg["local_macs"]), (100, "br-100", "10.77.0.1", 3))
        self.assertEqual(seg["remote_vteps"], [{"vtep": "10.77.0.2", "macs": 1, "fdb": 1, "flood": True}])
        json.dumps(view)
        text = format_status(view)
        self.assertIn("10.77.0.2 (fb2)  Established", text)
        self.assertIn("VNI 100 (virtual hub DEFAULT): bridge br-100", text)
        self.assertNotIn("problems", text)

    def test_counts_that_are_not_whole_numbers_count_as_none(self):
        vnis = parse_evpn_vnis('{"100": {"vxlanIf": "vx-100", "numMacs": "lots"}, "200": {"numMacs": -3}}')
        self.assertEqual((vnis[100].macs, vnis[200].macs), (0, 0))
        peers = parse_bgp_summary('{"peers": {"10.0.0.2": {"state": "Established", "pfxRcd": 1.5}}}')
        self.assertEqual(peers["10.0.0.2"].prefixes_received, 0)

    def test_a_lost_session_and_a_missing_vni_are_problems(self):
        view = describe(self.node, "{}", "{}", BGP_SUMMARY_DOWN, "[]")
        self.assertIn("BGP session with 10.77.0.2 is Active", view["problems"])
        self.assertTrue(any("FRR does not know VNI 100" in p for p in view["problems"]))
        self.assertIn("NOT KNOWN TO FRR", format_status(view))

    def test_control_and_data_plane_disagreeing_is_a_problem(self):
        fdb = json.dumps([e for e in json.loads(FDB) if e["mac"] != "00:00:00:00:00:00"])
        problems = describe(self.node, EVPN_VNIS, EVPN_MACS, BGP_SUMMARY, fdb)["problems"]
        self.assertEqual(problems, ["VNI 100: VTEP 10.77.0.2 is not in vx-100's flood list"])
        fdb = json.dumps([e for e in json.loads(FDB) if not (e["mac"] == "8a:07:a1:62:41:c2" and "dst" in e)])
        problems = describe(self.node, EVPN_VNIS, EVPN_MACS, BGP_SUMMARY, fdb)["problems"]
        self.assertEqual(problems, ["VNI 100: EVPN has 1 MACs at 10.77.0.2, the kernel 0"])


# the system tests ------------------------------------------------------------


class FabricSystemTestCase(SystemTestCase):
    """One fabric per class, shared by its tests (see L{SystemTestCase})."""

    timeout = 120

    @classmethod
    def start(cls, topo):
        """Nothing runs on a fresh fabric until a test starts it."""


def report(what: str, seconds: float) -> None:
    """Timing is reported, never asserted."""
    print(f"\n  [fabric timing] {what}: {seconds:.2f} s", file=sys.stderr, end="")


class Fabric(FabricSystemTestCase):
    """
    Three hub nodes, node 3 the route reflector (nodes 1 and 2 peer only
    with it, so everything between them is reflected); a card host on nodes
    1 and 2, a stand-in hub worker's TAP port on node 3.
    """

    MARKER = "fabric-broadcast-marker"

    @classmethod
    def make_topology(cls):
        return FabricTopology(3, reflectors=(3,))

    @classmethod
    def start(cls, topo):
        for i in (1, 2):
            topo.add_card_host(i)
        topo.add_hub_port(3, cls.MARKER)
        start = time.monotonic()
        topo.start_frr()
        cls.frr_started = time.monotonic() - start

        wait_for(topo.converged, 30, "BGP-EVPN sessions and flood lists on all three nodes", interval=0.1)
        cls.converged_after = time.monotonic() - start
        # The first frames teach the bridges the hosts' MACs (ARP).
        topo_ping = subprocess.run(["ip", "netns", "exec", topo.host_ns(1), "ping", "-c", "1", "-W", "5",
                                    topo.host_addr(2)], capture_output=True, text=True, timeout=30)
        cls.first_ping = time.monotonic() - start if topo_ping.returncode == 0 else None

    def evpn_macs(self, i: int) -> str:
        return self.topo.frr[i].vtysh("show evpn mac vni all")

    def test_convergence_is_reported(self):
        report("fabric_up per node (ip/bridge plan)", max(self.topo.up_seconds.values()))
        report("FRR started on 3 nodes", self.frr_started)
        report("all sessions up, flood lists full", self.converged_after)
        self.assertIsNotNone(self.first_ping, "the first ping from host 1 to host 2 failed")
        report("first ping host 1 -> host 2 answered", self.first_ping)

    def test_sessions_established_and_reflected(self):
        topo = self.topo
        rr = topo.frr[3].status(topo.runner(3))
        self.assertEqual([(s["peer"], s["state"], s["reflector_client"]) for s in rr["sessions"]],
                         [(topo.vtep(1), "Established", True), (topo.vtep(2), "Established", True)])
        client = topo.frr[1].status(topo.runner(1))
        self.assertEqual([(s["peer"], s["state"]) for s in client["sessions"]], [(topo.vtep(3), "Established")])
        # Node 1 knows node 2's VTEP only through the reflector.
        self.assertEqual([r["vtep"] for r in client["segments"][0]["remote_vteps"]], [topo.vtep(2), topo.vtep(3)])

    def test_ping_and_transfer_between_card_hosts(self):
        topo = self.topo
        for src, dst in ((1, 2), (2, 1)):
            out = subprocess.run(["ip", "netns", "exec", topo.host_ns(src), "ping", "-c", "3", "-i", "0.2", "-W", "2",
                                  topo.host_addr(dst)], capture_output=True, text=True, timeout=30)
            self.assertEqual(out.returncode, 0, out.stdout)
        data = os.path.join(topo.dir, "data")
        with open(data, "wb") as f:
            for _ in range(8):
                f.write(os.urandom(1 << 20))
        result_path = os.path.join(topo.dir, "transfer.json")
        server = topo.spawn(topo.host_ns(2), "serve", sys.executable, "-m", "scripts.transfer", "serve",
                            topo.host_addr(2), "7001", result_path)
        time.sleep(0.3)
        start = time.monotonic()
        sender = topo.spawn(topo.host_ns(1), "send", sys.executable, "-m", "scripts.transfer", "send",
                            topo.host_addr(2), "7001", data)
        self.assertEqual(sender.wait(60), 0, topo.log("send"))
        server.wait(30)
        report("8 MiB over TCP across VXLAN", time.monotonic() - start)
        with open(result_path) as f:
            result = json.load(f)
        self.assertIsNone(result["error"])
        self.assertEqual(result["bytes"], 8 << 20)
        self.assertEqual(result["sha256"], sha256_file(data))

    def test_each_host_mac_is_an_evpn_route_on_the_other_node(self):
        topo = self.topo
        subprocess.run(["ip", "netns", "exec", topo.host_ns(1), "ping", "-c", "1", "-W", "2", topo.host_addr(2)],
                       capture_output=True, timeout=30)
        for here, there in ((1, 2), (2, 1)):
            mac = topo.host_mac(here)
            line = wait_for(lambda: next((ln for ln in self.evpn_macs(there).splitlines() if ln.startswith(mac)),
                                         None), 10, f"host {here}'s MAC on node {there}")
            self.assertEqual(line.split()[1:3], ["remote", topo.vtep(here)])
            line = next(ln for ln in self.evpn_macs(here).splitlines() if ln.startswith(mac))
            self.assertEqual(line.split()[1:3], ["local", f"c{here}"])

    def test_reflected_mac_reaches_the_other_nodes_and_leaves_again(self):
        topo = self.topo
        port = topo.ports[3]
        tap = topo.nodes[3].segment(100).tap_name(0)
        mac, witness = "02:fb:00:00:03:01", "02:fb:00:00:03:02"
        start = time.monotonic()
        self.assertEqual(port.command(f"add {mac}"), {"ok": True})
        stats = port.command("sync")
        self.assertEqual((stats["added"], stats["failed"]), (1, 0))
        # The entry is exactly what 'bridge fdb add MAC dev TAP master static' makes.
        run(topo.node_ns(3), "bridge", "fdb", "add", witness, "dev", tap, "master", "static")
        entries = {e["mac"]: e for e in json.loads(run(topo.node_ns(3), "bridge", "-j", "fdb", "show", "dev", tap))}
        ours, theirs = dict(entries[mac]), dict(entries[witness])
        ours.pop("mac"), theirs.pop("mac")
        self.assertEqual(ours, theirs)
        self.assertEqual(ours["state"], "static")
        # zebra takes it as a local MAC of this node, and node 1 learns it from node 3.
        self.assertIn("local", next(ln for ln in self.evpn_macs(3).splitlines() if ln.startswith(mac)))
        for i in (1, 2):
            line = wait_for(lambda: next((ln for ln in self.evpn_macs(i).splitlines() if ln.startswith(mac)), None),
                            10, f"the reflected MAC on node {i}")
            self.assertEqual(line.split()[1:3], ["remote", topo.vtep(3)])
            if i == 1:
                report("a reflected MAC reached node 1 (add -> EVPN remote MAC)", time.monotonic() - start)
        kernel = json.loads(run(topo.node_ns(1), "bridge", "-j", "fdb", "show", "dev", "vx-100"))
        self.assertIn({"mac": mac, "dst": topo.vtep(3)},
                      [{"mac": e["mac"], "dst": e.get("dst")} for e in kernel if "dst" in e])
        # And it is withdrawn when the hub forgets it.
        port.command(f"remove {mac}")
        self.assertEqual(port.command("sync")["removed"], 1)
        run(topo.node_ns(3), "bridge", "fdb", "del", witness, "dev", tap, "master")
        wait_for(lambda: mac not in self.evpn_macs(1), 10, "node 1 to forget the removed MAC")
        self.assertNotIn(mac, run(topo.node_ns(3), "bridge", "fdb", "show", "dev", tap))

    def test_broadcast_reaches_every_node_exactly_once(self):
        topo = self.topo
        count = 20
        before = topo.ports[3].command("frames")["marked"]
        receiver = topo.spawn(topo.host_ns(2), "count", sys.executable, "-m", "scripts.fabric_udp", "count",
                              "7002", "4", self.MARKER)
        self.assertEqual(receiver.stdout.readline().strip(), b"ready")
        sent = subprocess.run(["ip", "netns", "exec", topo.host_ns(1), sys.executable, "-m", "scripts.fabric_udp",
                               "send", topo.broadcast, "7002", str(count), self.MARKER],
                              capture_output=True, text=True, timeout=30, env=env())
        self.assertEqual(sent.returncode, 0, sent.stderr)
        self.assertEqual(int(receiver.stdout.readline()), count)  # card host on node 2
        receiver.wait(10)
        self.assertEqual(topo.ports[3].command("frames")["marked"] - before, count)  # the hub port on node 3

    def test_status_view_on_real_frr(self):
        topo = self.topo
        view = topo.frr[3].status(topo.runner(3))
        self.assertEqual(view["problems"], [])
        seg = view["segments"][0]
        self.assertEqual((seg["vni"], seg["bridge"], seg["vxlan"], seg["vtep"], seg["in_frr"]),
                         (100, "br-100", "vx-100", topo.vtep(3), True))
        remote = {r["vtep"]: r for r in seg["remote_vteps"]}
        self.assertEqual(sorted(remote), [topo.vtep(1), topo.vtep(2)])
        for i in (1, 2):
            self.assertTrue(remote[topo.vtep(i)]["flood"])
            self.assertGreaterEqual(remote[topo.vtep(i)]["macs"], 1)  # at least the card host's MAC
            self.assertEqual(remote[topo.vtep(i)]["macs"], remote[topo.vtep(i)]["fdb"])
        text = format_status(view)
        self.assertIn("rr-client", text)
        self.assertIn(f"{topo.vtep(1)} ({topo.node_ns(1)})  Established", text)

    def test_fabric_up_again_changes_nothing(self):
        topo = self.topo
        plan = fabric_up(topo.nodes[1], 100, topo.runner(1))
        self.assertEqual(plan.commands, [])
        self.assertEqual(plan.notes, ["bridge br-100 exists; reusing it"])


class Plans(FabricSystemTestCase):
    """The device plans against a real kernel, in one namespace, without FRR."""

    @classmethod
    def make_topology(cls):
        return FabricTopology(1, frr=False)

    def test_up_attach_down(self):
        topo = self.topo
        node, ns, go = topo.nodes[1], topo.node_ns(1), topo.runner(1)
        links = parse_links(run(ns, "ip", "-j", "-d", "link", "show"))
        self.assertEqual(links["vx-100"].vni, 100)
        self.assertEqual(links["vx-100"].local, topo.vtep(1))
        self.assertEqual(links["vx-100"].master, "br-100")
        self.assertIs(links["vx-100"].port_learning, False)
        self.assertTrue(links["br-100"].up and links["vx-100"].up)
        self.assertEqual(fabric_up(node, "DEFAULT", go).commands, [])
        run(ns, "ip", "link", "add", "fbp", "type", "veth", "peer", "name", "fbq")
        fabric_attach(node, 100, "fbp", go)
        plan = fabric_down(node, 100, go)
        self.assertEqual(plan.notes, ["kept bridge br-100: fbp still in it"])
        self.assertIn("br-100", run(ns, "ip", "link", "show"))
        self.assertNotIn("vx-100", run(ns, "ip", "link", "show"))
        fabric_up(node, 100, go)  # the kept bridge is reused
        run(ns, "ip", "link", "del", "fbp")
        self.assertEqual(len(fabric_down(node, 100, go).commands), 2)
        self.assertNotIn("br-100", run(ns, "ip", "link", "show"))
        self.assertEqual(fabric_down(node, 100, go).commands, [])

    def test_a_conflicting_device_is_a_sentence(self):
        topo = self.topo
        ns = topo.node_ns(1)
        other = FabricNode("other", topo.vtep(1), (Segment("OTHER", 200, bridge="br-200", vxlan="fbvx"),))
        run(ns, "ip", "link", "add", "fbvx", "type", "vxlan", "id", "300", "local", topo.vtep(1), "dstport", "4789")
        try:
            e = self.assertRaises(FabricError, fabric_up, other, 200, command_runner(ns))
            self.assertIn("fbvx exists with VNI 300 (want 200)", str(e))
        finally:
            run(ns, "ip", "link", "del", "fbvx", check=False)
            run(ns, "ip", "link", "del", "br-200", check=False)
