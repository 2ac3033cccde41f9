"""
An operator with a real hub and two real cards (twistd, TAP devices, TLS)
in network namespaces this test makes: saving accounts that pin the hub's
CA, connecting and waiting for the outcome, every card of the machine at a
glance, and a user disabled or a session kicked while its card is
connected.  Skipped, with the reason, when not root or without
/dev/net/tun.
"""

from __future__ import annotations

import json
import os
import re

from scripts.netns import BIN, PASSWORD, Topology, sevpn, wait_for
from tests.test_system import SystemTestCase


class OperatorTopology(Topology):
    prefix = "op"


class Operator(SystemTestCase):
    """Card A (TAP op0, state dir ROOT/nic) on host 1, card B (TAP op1, ROOT/nic-op1) on host 2."""

    hosts = 2

    @classmethod
    def make_topology(cls):
        return OperatorTopology(cls.hosts)

    @classmethod
    def start(cls, topo):
        for user in ("u1", "u2", "u3"):
            topo.add_user(user)
        topo.start_hub()
        cls.root = os.path.join(topo.dir, "root")
        cls.card_dirs = {1: os.path.join(cls.root, "nic"), 2: os.path.join(cls.root, "nic-op1")}
        cls.taps = {1: "op0", 2: "op1"}
        for i in (1, 2):
            proc = topo.spawn(topo.host(i), f"card{i}", os.path.join(BIN, "twistd"), "-n", "--pidfile=", "sevpn-nic",
                              "--state-dir", cls.card_dirs[i], "--tap", cls.taps[i])
            wait_for(lambda: os.path.exists(os.path.join(cls.card_dirs[i], "control.sock")) or proc.poll() is not None,
                     30, f"card {i} to start")
            if proc.poll() is not None:
                raise AssertionError(f"card {i} exited: {topo.log(f'card{i}')[-2000:]}")
        cls.ca = os.path.join(topo.hub_state, "ca.pem")
        cls.password = os.path.join(topo.dir, "password")  # add_user wrote it
        cls.wrong = os.path.join(topo.dir, "wrong")
        with open(cls.wrong, "w") as f:
            f.write("not-" + PASSWORD + "\n")

    def account(self, i, name, user, password=None, port=5555):
        return sevpn("account", "add", name, "--state-dir", self.card_dirs[i],
                     "--hub", f"{self.topo.hub_addr(i)}:{port}", "--user", user,
                     "--password-file", password or self.password, "--ca-file", self.ca)

    def connect(self, i, name, *extra):
        return sevpn("nic", "connect", name, "--wait", "--state-dir", self.card_dirs[i], *extra, check=False)

    def status(self, i):
        return json.loads(sevpn("nic", "status", "--json", "--state-dir", self.card_dirs[i]).stdout)

    def card_log(self, i):
        return self.topo.log(f"card{i}")

    def test_connect_wait_show_and_versions(self):
        added = self.account(1, "office", "u1").stdout
        ca = json.loads(sevpn("hub", "ca", "--json", "--state-dir", self.topo.hub_state).stdout)
        self.assertIn(f"SHA-256 fingerprint {ca['sha256']}", added)
        r = self.connect(1, "office")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), f"connected to hub DEFAULT at {self.topo.hub_addr(1)}:5555 as u1")
        self.assertEqual(self.status(1)["state"], "connected")  # it did wait: connected when the command ended
        # every card of the machine, wg-show style, found by their state dirs
        shown = sevpn("nic", "show", "--root", self.root).stdout
        self.assertIn("card op0: connected, carrier up", shown)
        self.assertIn(f"  account: office: user u1 on virtual hub DEFAULT at {self.topo.hub_addr(1)}:5555", shown)
        self.assertRegex(shown, r"  transfer: \d+(\.\d)? (B|KiB|MiB) received, \d+(\.\d)? (B|KiB|MiB) sent")
        self.assertRegex(shown, r"card op1: (disconnected|refused|connecting)")
        cards = json.loads(sevpn("nic", "show", "--json", "--root", self.root).stdout)
        self.assertEqual([(c["state_dir"], c["tap"]) for c in cards],
                         [(self.card_dirs[1], "op0"), (self.card_dirs[2], "op1")])
        # human units in text, raw numbers in JSON, versions in both
        from sevpn import __version__

        text = sevpn("nic", "status", "--state-dir", self.card_dirs[1]).stdout
        self.assertRegex(text, r"uptime:\s+\d+s\n")
        self.assertRegex(text, r"resume window:\s+1m\n")
        self.assertRegex(text, r"carrier:\s+yes\n")
        self.assertIn("version:", text)
        self.assertNotIn("None", text)
        self.assertEqual(self.status(1)["version"], __version__)
        hub = sevpn("hub", "status", "--state-dir", self.topo.hub_state).stdout
        self.assertRegex(hub, rf"version:\s+{re.escape(__version__)}\n")
        self.assertRegex(hub, r"listen:\s+tcp:5555\n")
        self.assertNotIn("[", hub)  # no Python lists
        sessions = sevpn("hub", "sessions", "--state-dir", self.topo.hub_state).stdout
        self.assertRegex(sessions, r"u1\s+10\.\S+\s+connected\s+\d+s\s+\d+(\.\d)? (B|KiB)")

    def test_connect_wait_reports_a_refusal(self):
        self.account(2, "wrong", "u3", password=self.wrong)
        r = self.connect(2, "wrong")
        self.assertEqual(r.returncode, 1)
        self.assertIn("sevpn: the hub refused account wrong: the hub refused the connection: ", r.stderr)
        self.assertNotIn("Traceback", r.stderr)

    def test_connect_wait_times_out_with_the_last_error(self):
        self.account(2, "nowhere", "u3", port=5556)
        r = self.connect(2, "nowhere", "--timeout", "2")
        self.assertEqual(r.returncode, 1)
        self.assertRegex(r.stderr, r"sevpn: not connected within 2 seconds \(still connecting\): .*refused")
        sevpn("nic", "disconnect", "--state-dir", self.card_dirs[2])

    def test_a_disabled_users_session_ends_at_once(self):
        self.account(2, "lab", "u2")
        self.assertEqual(self.connect(2, "lab").returncode, 0)
        session = self.status(2)["session"]
        r = sevpn("hub", "user", "disable", "u2", "--state-dir", self.topo.hub_state)
        self.assertIn(f"ended session {session} of u2 on virtual hub DEFAULT: user u2 was disabled by the operator",
                      r.stdout)
        self.assertNotIn("u2", [s["user"] for s in self.topo.hub_sessions()])
        wait_for(lambda: "closed the session (user u2 was disabled by the operator)" in self.card_log(2), 10,
                 "the card to log the hub's reason")
        wait_for(lambda: self.status(2)["state"] == "refused", 10, "the card to be refused")
        self.assertIn(f"session {session} of u2 on DEFAULT ended: user u2 was disabled by the operator",
                      self.topo.log("hub"))
        sevpn("hub", "user", "enable", "u2", "--state-dir", self.topo.hub_state)
        self.assertEqual(self.connect(2, "lab").returncode, 0)

    def test_kick(self):
        if self.status(1)["state"] != "connected":
            self.account(1, "office", "u1")
            self.assertEqual(self.connect(1, "office").returncode, 0)
        session = self.status(1)["session"]
        r = sevpn("hub", "session", "kick", session, "--reason", "maintenance at noon",
                  "--state-dir", self.topo.hub_state)
        self.assertEqual(r.stdout.strip(), f"ended session {session} of u1 on virtual hub DEFAULT: maintenance at noon")
        wait_for(lambda: "closed the session (maintenance at noon); reconnecting" in self.card_log(1), 10,
                 "the card to log the reason")
        wait_for(lambda: (lambda s: s["state"] == "connected" and s["session"] != session)(self.status(1)), 15,
                 "a fresh session")
        r = sevpn("hub", "session", "kick", session, "--state-dir", self.topo.hub_state, check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"there is no session {session} on this hub", r.stderr)
