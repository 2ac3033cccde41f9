"""
Persistent TAP devices (L{sevpn.tapdevice}): made, attached to, let go
and removed in a network namespace this test makes, as C{sevpn nic
create|delete}, a card and a hub's C{--bridge-tap} use them.  Needs root
and /dev/net/tun; skipped with the reason without.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from scripts.netns import in_netns, skip_reason
from sevpn.tapdevice import TapError, TapPort, create_persistent_tap, delete_persistent_tap
from tests.support import mac


class PersistentTapTests(SynchronousTestCase):
    def setUp(self):
        reason = skip_reason()
        if reason:
            raise SkipTest(reason)
        self.ns = f"tb{os.getpid() % 10000}{int(time.time() * 1000) % 100}-tap"
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", self.ns], capture_output=True)
        self.enter = in_netns(self.ns)
        self.enter.__enter__()
        self.addCleanup(self.enter.__exit__)

    def link(self, name: str) -> dict:
        out = subprocess.run(["ip", "-j", "-d", "link", "show", name], capture_output=True, text=True)
        return json.loads(out.stdout)[0] if out.returncode == 0 else {}

    def carrier(self, name: str) -> str:
        return "0" if "NO-CARRIER" in self.link(name)["flags"] else "1"

    def test_create_attach_let_go_delete(self):
        made = create_persistent_tap("tbp0", mac(7))
        self.assertEqual(made, mac(7))
        link = self.link("tbp0")
        self.assertIn("NO-CARRIER", link["flags"])
        self.assertIn("UP", link["flags"])
        self.assertTrue(link["linkinfo"]["info_data"]["persist"])

        port = TapPort("tbp0", mac(9), Clock(), keep_mac=True)  # as a card without --mac
        self.assertTrue(port.persistent)
        self.assertEqual(port.mac, mac(7))  # a persistent TAP keeps its MAC
        port.set_carrier(True)
        self.assertEqual(self.carrier("tbp0"), "1")
        subprocess.run(["ip", "addr", "add", "10.55.0.1/24", "dev", "tbp0"], check=True)
        port.close()

        link = self.link("tbp0")  # still there, no carrier, its address kept
        self.assertIn("NO-CARRIER", link["flags"])
        self.assertEqual([a["local"] for a in link.get("addr_info", [])] or self._addresses("tbp0"), ["10.55.0.1"])

        delete_persistent_tap("tbp0")
        self.assertEqual(self.link("tbp0"), {})

    def _addresses(self, name):
        out = subprocess.run(["ip", "-j", "-4", "addr", "show", name], capture_output=True, text=True, check=True)
        return [a["local"] for a in json.loads(out.stdout)[0]["addr_info"]]

    def test_the_attaching_program_sets_the_flags(self):
        """A TAP made with offload is used without it (and back): the kernel takes the opener's flags."""
        create_persistent_tap("tbp1")
        self.addCleanup(delete_persistent_tap, "tbp1")
        for offload in (False, True):
            port = TapPort("tbp1", None, Clock(), offload=offload)
            self.assertEqual(self.link("tbp1")["linkinfo"]["info_data"]["vnet_hdr"], offload)
            port.close()

    def test_a_tap_in_use_is_refused(self):
        create_persistent_tap("tbp2")
        self.addCleanup(delete_persistent_tap, "tbp2")
        port = TapPort("tbp2", None, Clock())
        self.addCleanup(port.close)
        with self.assertRaises(TapError) as caught:
            TapPort("tbp2", None, Clock())
        self.assertIn("another program (a card or a hub) already uses it", str(caught.exception))
        with self.assertRaises(TapError) as caught:
            delete_persistent_tap("tbp2")
        self.assertIn("cannot delete TAP device tbp2: a program (a card or a hub) uses it; stop that first",
                      str(caught.exception))

    def test_sentences(self):
        subprocess.run(["ip", "link", "add", "tbv0", "type", "veth", "peer", "name", "tbv1"], check=True)
        cases = [
            (lambda: create_persistent_tap("tbv0"), "tbv0 already exists; pick another name"),
            (lambda: TapPort("tbv0", None, Clock()), "a network interface of another kind has that name"),
            (lambda: delete_persistent_tap("tbv0"), "tbv0 is not a TAP device; leaving it alone"),
            (lambda: delete_persistent_tap("tbnone"), "there is no TAP device named tbnone"),
        ]
        create_persistent_tap("tbp3")
        self.addCleanup(delete_persistent_tap, "tbp3")
        cases.append((lambda: create_persistent_tap("tbp3"), "('sevpn nic delete tbp3' if it is a persistent TAP)"))
        port = TapPort("tbp4", mac(9), Clock(), keep_mac=True)  # made now: not persistent, the card's MAC
        self.addCleanup(port.close)
        self.assertFalse(port.persistent)
        self.assertEqual(port.mac, mac(9))
        cases.append((lambda: delete_persistent_tap("tbp4"), "cannot delete TAP device tbp4: a program (a card or a hub) uses it"))
        for call, words in cases:
            with self.assertRaises(TapError) as caught:
                call()
            self.assertIn(words, str(caught.exception))
        self.assertEqual(self.link("tbnone"), {})  # asking made nothing
