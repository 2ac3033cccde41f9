"""
sevpn fabric frr-config|up|down and sevpn hub fabric: what an operator
types, and the sentences they get back.  (The commands against real
devices and a real FRR: tests.test_fabricport and tests.test_system_fabric.)
"""

import os
import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from sevpn.fabric import FabricNode, frr_conf
from tests.test_cli import sevpn


class FrrConfig(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def config(self, *args):
        r = sevpn("fabric", "frr-config", "--name", "hub-a", *args)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout

    def test_a_mesh_node(self):
        self.assertEqual(self.config("--vtep", "10.0.0.1", "--peer", "10.0.0.2", "--peer", "10.0.0.3"),
                         frr_conf(FabricNode("hub-a", "10.0.0.1", (), ("10.0.0.2", "10.0.0.3"))))

    def test_one_of_two_reflectors(self):
        text = self.config("--vtep", "10.0.0.1", "--reflector", "--peer", "10.0.0.3", "--peer", "10.0.0.4",
                           "--reflector-peer", "10.0.0.2", "--asn", "64512")
        self.assertEqual(text, frr_conf(FabricNode("hub-a", "10.0.0.1", (), ("10.0.0.3", "10.0.0.4", "10.0.0.2"),
                                                   ("10.0.0.3", "10.0.0.4"), 64512)))
        self.assertIn("  neighbor 10.0.0.3 route-reflector-client\n", text)
        self.assertNotIn("neighbor 10.0.0.2 route-reflector-client", text)

    def test_the_password_comes_from_a_file(self):
        path = os.path.join(self.dir, "bgp")
        with open(path, "w") as f:
            f.write("s3cret\n")
        self.assertIn(" neighbor 10.0.0.2 password s3cret\n",
                      self.config("--vtep", "10.0.0.1", "--peer", "10.0.0.2", "--password-file", path))
        with open(path, "w") as f:
            f.write("two words\n")
        r = sevpn("fabric", "frr-config", "--vtep", "10.0.0.1", "--peer", "10.0.0.2", "--password-file", path)
        self.assertEqual(r.returncode, 1)
        self.assertIn("the BGP password must be 1 to 80 printable characters", r.stderr)

    def test_mistakes_are_sentences(self):
        for args, sentence, code in (
            ((), "name the node's BGP neighbours with --peer", 1),
            (("--peer", "10.0.0.2", "--reflector-peer", "10.0.0.3"), "this node must be one too (--reflector)", 1),
            (("--peer", "10.0.0.1"), "cannot peer with its own VTEP 10.0.0.1", 1),
            (("--peer", "hub-b"), "'hub-b' is not an IPv4 address", 1),
        ):
            r = sevpn("fabric", "frr-config", "--vtep", "10.0.0.1", *args)
            self.assertEqual(r.returncode, code, r.stderr)
            self.assertIn(sentence, r.stderr)
            self.assertNotIn("Traceback", r.stderr)


class Devices(SynchronousTestCase):
    def test_a_vtep_this_machine_does_not_have(self):
        r = sevpn("fabric", "up", "--vtep", "192.0.2.254", "--fabric", "DEFAULT=100")
        self.assertEqual(r.returncode, 1)
        self.assertIn("--vtep 192.0.2.254 is not an address of this machine", r.stderr)

    def test_a_bad_fabric_option(self):
        r = sevpn("fabric", "up", "--vtep", "192.0.2.254", "--fabric", "DEFAULT=0")
        self.assertEqual(r.returncode, 1)
        self.assertIn("VNI 0 is out of range", r.stderr)

    def test_hub_fabric_without_a_running_hub(self):
        state = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, state)
        r = sevpn("hub", "fabric", "--state-dir", state)
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"nothing is running with the state dir {state}", r.stderr)
