"""
FRR instances for fabric nodes: Debian's zebra and bgpd, one instance per
network namespace (skipped, with the reason, when not root or FRR is
missing).  Three nodes talking to each other: tests/test_fabric.py.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from sevpn.fabric import FabricError, FabricNode, Segment
from sevpn import frr
from sevpn.frr import RUN_DIR, FrrError, FrrInstance, command_runner, discover_node, node_status, vtysh_runner
from scripts.fabric_topology import FabricTopology
from scripts.netns import wait_for


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


class InstanceTests(TestCase):
    timeout = 60

    def setUp(self):
        self.topo = FabricTopology(1, frr=True)
        self.addCleanup(self.topo.close)
        self.ns = self.topo.node_ns(1)
        self.node = self.topo.nodes[1]

    def start(self, name=None) -> FrrInstance:
        instance = FrrInstance(self.node, netns=self.ns, name=name)
        self.addCleanup(instance.stop)
        instance.start()
        return instance

    def test_runs_in_its_namespace_and_stops_without_a_trace(self):
        instance = self.start()
        self.assertIn("FRRouting", instance.vtysh("show version"))
        pids = [instance._pid(d) for d in ("zebra", "bgpd")]
        ns_inode = os.stat(f"/run/netns/{self.ns}").st_ino
        for pid in pids:
            self.assertEqual(netns_inode(pid), ns_inode)
        workdir = instance.dir
        self.assertEqual(oct(os.stat(os.path.join(workdir, "frr.conf")).st_mode & 0o777), "0o640")
        instance.stop()
        for pid in pids:
            self.assertFalse(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z")
        self.assertFalse(os.path.exists(os.path.join(RUN_DIR, instance.name)))
        self.assertFalse(os.path.exists(workdir))
        e = self.assertRaises(FrrError, instance.vtysh, "show version")
        self.assertIn("not running", str(e))

    def test_daemons_read_the_instances_config_not_etc_frr(self):
        instance = self.start()
        running = instance.vtysh("show running-config")
        self.assertIn(f"hostname {self.node.name}", running)
        self.assertIn(f"bgp router-id {self.node.vtep}", running)
        self.assertIn("advertise-all-vni", running)
        self.assertNotIn("No such command", instance.log("zebra") + instance.log("bgpd"))
        # zebra sees the segment's VXLAN device in the namespace.
        self.assertEqual(list(instance.vtysh_json("show evpn vni json")), ["100"])

    def test_two_instances_of_one_name_cannot_run(self):
        self.start()
        e = self.assertRaises(FrrError, FrrInstance(self.node, netns=self.ns).start)
        self.assertIn(f"an FRR instance named {self.node.name} already runs", str(e))

    def test_a_failed_start_is_a_sentence_and_leaves_nothing(self):
        instance = FrrInstance(self.node, netns=f"{self.ns}-absent", name=f"{self.node.name}-x")
        e = self.assertRaises(FrrError, instance.start)
        self.assertIn("zebra for", str(e))
        self.assertIn("did not start", str(e))
        self.assertFalse(os.path.exists(os.path.join(RUN_DIR, instance.name)))
        self.assertIsNone(instance.dir)

    def test_status_names_a_daemon_that_does_not_answer(self):
        instance = self.start()
        os.kill(instance._pid("bgpd"), 15)
        wait_for(lambda: not os.path.exists(os.path.join(RUN_DIR, instance.name, "bgpd.vty")) or
                 "bgpd is not running" in _vtysh_error(instance), 10, "bgpd to stop")
        view = node_status(self.node, instance.vtysh, command_runner(self.ns))
        self.assertIn("vtysh -c 'show bgp l2vpn evpn summary json' failed: bgpd is not running", view["problems"][0])
        # Without bgpd's advertise-all-vni zebra stops tracking the VNI, and the view says so.
        self.assertFalse(view["segments"][0]["in_frr"])
        self.assertTrue(any("FRR does not know VNI 100" in p for p in view["problems"]), view["problems"])


def _vtysh_error(instance) -> str:
    try:
        instance.vtysh("show bgp summary")
        return ""
    except FrrError as e:
        return str(e)


class InstanceNameTests(TestCase):
    def test_instance_names_are_one_path_component(self):
        node = FabricNode("a", "10.0.0.1", (Segment("DEFAULT", 100),))
        self.assertRaises(FrrError, FrrInstance, node, name="../etc")


class WithoutFrr(TestCase):
    """What the status says when FRR does not answer, and the node as FRR runs it (vtysh scripted)."""

    node = FabricNode("a", "10.0.0.1", (Segment("DEFAULT", 100),))

    @staticmethod
    def fdb(argv):
        return "[]"

    def test_no_frr_at_all_is_one_sentence(self):
        def vtysh(command):
            raise FrrError(f"vtysh -c '{command}' failed: Exiting: failed to connect to any daemons.")

        view = node_status(self.node, vtysh, self.fdb)
        self.assertEqual(view["problems"], ["FRR does not answer (vtysh: failed to connect to any daemons.): "
                                            "is it running, with bgpd?"])

    def test_the_node_as_bgpd_has_it(self):
        answers = {"show bgp neighbors json": """{
            "10.0.0.3": {"addressFamilyInfo": {"l2VpnEvpn": {"routeReflectorClient": true}},
                         "neighborCapabilities": {"hostName": {"advHostName": "hub a"}}},
            "10.0.0.2": {"addressFamilyInfo": {"l2VpnEvpn": {}}}}"""}
        node = discover_node([Segment("DEFAULT", 100)], "10.0.0.1", answers.__getitem__)
        self.assertEqual((node.name, node.peers, node.clients), ("hub-a", ("10.0.0.2", "10.0.0.3"), ("10.0.0.3",)))

        def down(command):
            raise FrrError("bgpd is not running")

        node = discover_node([Segment("DEFAULT", 100)], "10.0.0.1", down)
        self.assertEqual((node.peers, node.vtep), ((), "10.0.0.1"))


class RunnerTests(TestCase):
    """The commands the fabric runs fail as sentences that name the command."""

    def test_output(self):
        self.assertEqual(command_runner()(["echo", "hello"]), "hello\n")

    def test_a_missing_program(self):
        with self.assertRaises(FabricError) as caught:
            command_runner()(["sevpn-no-such-program", "x"])
        self.assertEqual(str(caught.exception), "sevpn-no-such-program is not installed (iproute2 provides ip and bridge)")

    def test_a_failing_command_says_its_last_error_line(self):
        with self.assertRaises(FabricError) as caught:
            command_runner()(["sh", "-c", "echo first >&2; echo 'the real reason' >&2; exit 3"])
        self.assertEqual(str(caught.exception), "'sh -c echo first >&2; echo 'the real reason' >&2; exit 3' failed: "
                                                "the real reason")

    def test_a_command_that_hangs(self):
        with self.assertRaises(FabricError) as caught:
            command_runner(timeout=0.2)(["sleep", "5"])
        self.assertEqual(str(caught.exception), "'sleep 5' did not finish within 0.2 s")

    def test_vtysh_of_a_missing_frr(self):
        self.patch(frr, "VTYSH", "/nonexistent/vtysh")
        with self.assertRaises(FrrError) as caught:
            vtysh_runner()("show version")
        self.assertEqual(str(caught.exception), "/nonexistent/vtysh is missing (apt-get install frr)")
