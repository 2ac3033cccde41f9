"""
A hub's virtual hubs in the node fabric (sevpn.fabricport): the MAC
reflection against a real hub with cards on an in-memory network, the
attaching with a scripted C{ip}; then a real hub in a network namespace
joining a real bridge made by 'sevpn fabric up' (no FRR needed: skipped,
with the reason, when not root or without /dev/net/tun).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from sevpn.fabric import LINKS_COMMAND, FabricError
from sevpn.fabricport import attach_fabric, detach_fabric
from sevpn.port import Port
from tests.support import BROADCAST, Lab, frame, mac, payloads


class Reflector:
    """Records what the hub asks of the kernel's FDB."""

    def __init__(self, tap):
        self.tap = tap
        self.calls = []
        self.closed = False

    def add(self, m):
        self.calls.append(("add", m))

    def remove(self, m):
        self.calls.append(("remove", m))

    def stats(self):
        return {"tap": self.tap, "entries": 0, "failed": 0, "dropped": 0}

    def close(self):
        self.closed = True


class FakeFabricPort(Port):
    """The worker's TAP as the switch sees it: what the bridge sends in is L{bridge_sends}."""

    def __init__(self, name, clock, max_macs):
        super().__init__(f"fabric:{name}", clock, max_macs=max_macs)
        self.device_name = name
        self.written = []
        self.carrier = False
        self.reading = False

    def transmit(self, frames):
        self.written.extend(bytes(f) for f in frames)

    def set_carrier(self, on):
        self.carrier = on

    def start_reading(self):
        self.reading = True

    def bridge_sends(self, frames):
        self.sink.forward(self, frames)
        self.sink.flush(self)


def link(name, kind="", master=None, mtu=1500, up=True, **extra):
    entry = {"ifname": name, "mtu": mtu, "flags": ["BROADCAST", "UP"] if up else ["BROADCAST"],
             "inet6_addr_gen_mode": "eui64"}
    if master:
        entry["master"] = master
    if kind:
        entry["linkinfo"] = {"info_kind": kind, "info_data": extra}
    return entry


NODE = [
    link("eth0", "veth", mtu=9000),
    link("br-100", "bridge", mtu=1450),
    link("vx-100", "vxlan", master="br-100", mtu=1450, id=100, local="10.0.0.1", port=4789, learning=False),
]


class Ip:
    """C{ip} on a node as the hub meets it: the links, and the TAP once it is opened."""

    def __init__(self, links, fail_on=None):
        self.links = [dict(e) for e in links]
        self.commands = []
        self.fail_on = fail_on

    def __call__(self, argv):
        if list(argv) == LINKS_COMMAND:
            return json.dumps(self.links)
        self.commands.append(list(argv))
        if self.fail_on and self.fail_on in argv:
            raise FabricError(f"'{' '.join(argv)}' failed: RTNETLINK answers: Operation not permitted")
        return ""


class Attaching(SynchronousTestCase):
    def setUp(self):
        self.lab = Lab(self, resume_window=0)
        self.ports = []
        self.reflectors = []

    def open_port(self, name, max_macs):
        port = FakeFabricPort(name, self.lab.clock, max_macs)
        self.ports.append(port)
        self.ip.links.append(link(name, "tun"))
        return port

    def reflector_for(self, name):
        self.reflectors.append(Reflector(name))
        return self.reflectors[-1]

    def attach(self, links=NODE, worker=0, fail_on=None):
        self.ip = Ip(links, fail_on)
        return attach_fabric(self.lab.hub.vhub, self.lab.clock, [("DEFAULT", 100)], worker, self.ip,
                             self.open_port, self.reflector_for)

    def test_the_worker_tap_joins_the_bridge_with_the_segment_mtu(self):
        [member] = self.attach(worker=2)
        [port] = self.ports
        self.assertEqual(self.ip.commands, [
            ["ip", "link", "set", "vt100-2", "mtu", "1450"],
            ["ip", "link", "set", "vt100-2", "addrgenmode", "none"],
            ["ip", "link", "set", "vt100-2", "master", "br-100"],
        ])
        self.assertTrue(port.carrier and port.reading and port.yields_macs)
        self.assertIn(port, self.lab.hub.vhub("DEFAULT").ports)
        self.assertEqual(port.max_macs, self.lab.hub.vhub("DEFAULT").max_entries)
        info = member.describe()
        self.assertEqual((info["tap"], info["vni"], info["mtu"], info["vtep"], info["worker"]),
                         ("vt100-2", 100, 1450, "10.0.0.1", 2))

    def test_no_bridge_is_a_sentence_naming_sevpn_fabric_up(self):
        e = self.assertRaises(FabricError, self.attach, links=NODE[:1])
        self.assertIn("there is no bridge br-100", str(e))
        self.assertIn("sevpn fabric up --vtep ADDRESS --fabric DEFAULT=100", str(e))
        self.assertEqual(self.ports, [])
        e = self.assertRaises(FabricError, self.attach, links=NODE[:2])
        self.assertIn("bridge br-100 has no VXLAN device vx-100 in it", str(e))

    def test_a_failed_attach_leaves_nothing_behind(self):
        self.assertRaises(FabricError, self.attach, fail_on="master")
        [port] = self.ports
        self.assertTrue(port.closed)
        self.assertNotIn(port, self.lab.hub.vhub("DEFAULT").ports)
        self.assertIsNone(self.lab.hub.vhub("DEFAULT").on_learn)

    def test_detach(self):
        members = self.attach()
        vhub = self.lab.hub.vhub("DEFAULT")
        detach_fabric(members)
        self.assertTrue(self.ports[0].closed and self.reflectors[0].closed)
        self.assertEqual((vhub.ports, vhub.on_learn, vhub.on_forget), ([], None, None))


class Options(SynchronousTestCase):
    def test_fabric_option(self):
        from twisted.python.usage import UsageError

        from sevpn.hubtap import Options as HubOptions

        options = HubOptions()
        options.parseOptions(["--fabric", "DEFAULT=100", "--fabric", "LAB=200"])
        self.assertEqual(options["fabric"], [("DEFAULT", 100), ("LAB", 200)])
        for args, sentence in ((["--fabric", "DEFAULT"], "expected HUB=VNI"),
                               (["--fabric", "DEFAULT=100", "--fabric", "LAB=100"], "is in the fabric twice"),
                               (["--fabric", "DEFAULT=16777216"], "out of range")):
            e = self.assertRaises(UsageError, HubOptions().parseOptions, args)
            self.assertIn(sentence, str(e))


class Reflection(SynchronousTestCase):
    """What reaches the bridge's FDB as a real hub's cards come and go."""

    def setUp(self):
        self.lab = Lab(self, resume_window=0)
        self.port = self.reflector = None

        def open_port(name, max_macs):
            self.port = FakeFabricPort(name, self.lab.clock, max_macs)
            return self.port

        def reflector_for(name):
            self.reflector = Reflector(name)
            return self.reflector

        links = NODE + [link("vt100-0", "tun", mtu=1450, master="br-100")]
        attach_fabric(self.lab.hub.vhub, self.lab.clock, [("DEFAULT", 100)], 0, Ip(links), open_port,
                      reflector_for)
        self.vhub = self.lab.hub.vhub("DEFAULT")

    def test_a_card_is_reflected_when_it_joins_and_withdrawn_when_it_leaves(self):
        card = self.lab.card(1)
        self.assertEqual(self.reflector.calls, [("add", mac(1))])  # from its hello, before any frame
        card.lan.tap.os_sends([frame(BROADCAST, mac(1))])
        self.lab.network.pump()
        self.assertEqual(self.reflector.calls, [("add", mac(1))])  # frames refresh, they do not reflect again
        card.disconnect()
        self.lab.network.pump()
        self.assertEqual(self.reflector.calls, [("add", mac(1)), ("remove", mac(1))])

    def test_an_idle_station_ages_out_of_the_bridge_too(self):
        self.lab.hub.start()  # the sweep of aged entries
        card = self.lab.card(1)
        for _ in range(int(self.vhub.max_age) + 31):  # the sweep runs every 30 s; keepalives keep the session
            self.lab.clock.advance(1)
            self.lab.network.pump()
        self.assertEqual(card.state, "connected")
        self.assertEqual(self.reflector.calls, [("add", mac(1)), ("remove", mac(1))])

    def test_other_nodes_stations_are_never_reflected(self):
        card = self.lab.card(1)
        self.port.bridge_sends([frame(BROADCAST, mac(9), b"from node 2"), frame(mac(1), mac(8), b"to card 1")])
        self.lab.network.pump()
        self.assertEqual(self.reflector.calls, [("add", mac(1))])
        self.assertEqual(self.port.macs, {mac(8), mac(9)})
        self.assertEqual(payloads(card.lan.tap), [b"from node 2", b"to card 1"])

    def test_a_station_from_another_node_takes_its_mac_here(self):
        self.lab.card(1)
        self.port.bridge_sends([frame(BROADCAST, mac(9), b"card 9 on node 2")])
        card9 = self.lab.card(9)  # its node went; it dialled this one
        self.assertIs(self.vhub.lookup(mac(9)), self.lab.hub.sessions[card9.session.id].port)
        self.assertEqual(self.reflector.calls, [("add", mac(1)), ("add", mac(9))])
        self.assertEqual(self.vhub.mac_conflicts, 0)
        # frames to it go to its session now, not back into the fabric
        written = len(self.port.written)
        self.port.bridge_sends([frame(mac(9), mac(7), b"for card 9")])
        self.lab.network.pump()
        self.assertEqual(payloads(card9.lan.tap, mac(9))[-1:], [b"for card 9"])
        self.assertEqual(len(self.port.written), written)

    def test_the_fabric_cannot_take_a_connected_cards_mac(self):
        card = self.lab.card(1)
        self.port.bridge_sends([frame(BROADCAST, mac(1), b"a copy of card 1 elsewhere")])
        self.lab.network.pump()
        self.assertEqual(payloads(card.lan.tap), [])
        self.assertEqual(self.vhub.mac_conflicts, 1)
        self.assertEqual(self.reflector.calls, [("add", mac(1))])


# a real hub on a real node bridge ---------------------------------------------

from tests.test_system import SystemTestCase  # noqa: E402
from scripts.netns import BIN, Topology, env, wait_for  # noqa: E402


class NodeTopology(Topology):
    """A node namespace (the base class's hub namespace) with an underlay address; one card host."""

    prefix = "ff"

    def __init__(self) -> None:
        super().__init__(1)
        self.vtep = f"10.{self.subnet}.250.1"
        try:
            self.ip("-n", self.hub_ns, "link", "add", "ul0", "type", "veth", "peer", "name", "ul1")
            self.ip("-n", self.hub_ns, "addr", "add", f"{self.vtep}/24", "dev", "ul0")
            for dev in ("ul0", "ul1"):
                self.ip("-n", self.hub_ns, "link", "set", dev, "up")
        except Exception:
            self.close()
            raise

    def node_sevpn(self, *args: str) -> subprocess.CompletedProcess:
        """The sevpn command, run in the node's namespace."""
        return subprocess.run(["ip", "netns", "exec", self.hub_ns, sys.executable, "-m", "sevpn.cli", *args],
                              capture_output=True, text=True, timeout=60, env=env())

    def tap(self) -> dict:
        out = self.run(self.hub_ns, "ip", "-j", "-d", "link", "show", "vt100-0", check=False).strip()
        return json.loads(out)[0] if out.startswith("[") else {}

    def fdb(self) -> dict:
        """The bridge's entries on the worker's TAP: MAC -> state ("static": the hub's; "": learned)."""
        out = self.run(self.hub_ns, "bridge", "-j", "fdb", "show", "dev", "vt100-0", check=False).strip() or "[]"
        return {e["mac"]: e.get("state", "") for e in json.loads(out) if e.get("master") == "br-100"}


class HubOnANode(SystemTestCase):
    """A real hub joins the node bridge 'sevpn fabric up' made, and reflects its card into it."""

    timeout = 120

    @classmethod
    def make_topology(cls):
        return NodeTopology()

    @classmethod
    def start(cls, topo):
        topo.add_user("u1")

    def test_a_refuses_to_start_without_the_bridge(self):
        topo = self.topo
        proc = topo.spawn(topo.hub_ns, "hub-refused", os.path.join(BIN, "twistd"), "-n", "--pidfile=",
                          "sevpn-hub", "--state-dir", topo.hub_state, "--listen", "tcp:5555", "--fabric", "DEFAULT=100")
        self.assertEqual(proc.wait(30), 1)
        log = topo.log("hub-refused")
        self.assertIn("there is no bridge br-100 on this node: run 'sevpn fabric up --vtep ADDRESS "
                      "--fabric DEFAULT=100' first", log)
        self.assertNotIn("Traceback", log)
        self.assertEqual(topo.tap(), {})

    def test_b_joins_the_bridge_and_reflects_its_card(self):
        topo = self.topo
        up = topo.node_sevpn("fabric", "up", "--vtep", topo.vtep, "--fabric", "DEFAULT=100", "--mtu", "1400")
        self.assertEqual(up.returncode, 0, up.stderr)
        self.assertIn("br-100 with vx-100 (VNI 100, from", up.stdout)
        again = topo.node_sevpn("fabric", "up", "--vtep", topo.vtep, "--fabric", "DEFAULT=100", "--mtu", "1400",
                                "--json")
        self.assertEqual(json.loads(again.stdout)["segments"][0]["commands"], [])  # idempotent
        topo.start_hub("--fabric", "DEFAULT=100")
        tap = topo.tap()
        self.assertEqual((tap["master"], tap["mtu"], tap["inet6_addr_gen_mode"]), ("br-100", 1400, "none"))
        self.assertIn("LOWER_UP", tap["flags"])  # carrier on
        addresses = json.loads(topo.run(topo.hub_ns, "ip", "-j", "addr", "show", "vt100-0"))[0].get("addr_info")
        self.assertEqual(addresses or [], [])  # no IPv6 link-local: the node says nothing into the segment
        topo.start_card(1, extra=("--mtu", "1400"))
        card_mac = topo.wait_connected(1)["mac"]
        wait_for(lambda: card_mac in topo.fdb(), 10, "the card's MAC in the bridge")
        self.assertEqual(topo.fdb()[card_mac], "static")  # put there by the hub, not learned by the bridge
        # the status without FRR on the node: the hub's part, and a sentence for FRR's
        view = json.loads(topo.node_sevpn("hub", "fabric", "--json", "--state-dir", topo.hub_state,
                                          "--frr-pathspace", topo.hub_ns).stdout)
        [seg] = view["segments"]
        self.assertEqual((seg["vni"], seg["vtep"], seg["hub_worker"]["tap"], seg["hub_worker"]["local_macs"],
                          seg["hub_worker"]["reflection"]["entries"]), (100, topo.vtep, "vt100-0", 1, 1))
        self.assertEqual(len(view["problems"]), 1)
        self.assertIn("FRR does not answer", view["problems"][0])
        # 'fabric down' while the hub runs keeps the bridge it is in
        down = topo.node_sevpn("fabric", "down", "--vtep", topo.vtep, "--fabric", "DEFAULT=100")
        self.assertIn("kept bridge br-100: vt100-0 still in it", down.stdout)
        self.assertEqual(topo.node_sevpn("fabric", "up", "--vtep", topo.vtep, "--fabric", "DEFAULT=100",
                                         "--mtu", "1400").returncode, 0)
        # the card leaves: its entry goes
        topo.stop(topo.cards[1])
        wait_for(lambda: card_mac not in topo.fdb(), 10, "the card's MAC to leave the bridge")
        # the hub stops: its TAP goes, and then the bridge can
        topo.stop(topo.hub_proc)
        self.assertEqual(topo.tap(), {})
        down = topo.node_sevpn("fabric", "down", "--vtep", topo.vtep, "--fabric", "DEFAULT=100", "--json")
        self.assertEqual(json.loads(down.stdout)["segments"][0]["commands"],
                         [["ip", "link", "del", "vx-100"], ["ip", "link", "del", "br-100"]])
