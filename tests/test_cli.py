"""The sevpn command: state-dir commands, errors as sentences, exit codes."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from scripts.netns import BIN, env


def sevpn(*args, input=None):
    return subprocess.run([sys.executable, "-m", "sevpn.cli", *args], capture_output=True, text=True,
                          input=input, env=env(), timeout=60)


class Commands(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.hub = os.path.join(self.dir, "hub")
        self.nic = os.path.join(self.dir, "nic")
        self.pw = os.path.join(self.dir, "pw")
        with open(self.pw, "w") as f:
            f.write("s3cret\n")

    def test_users_on_a_fresh_state_dir(self):
        r = sevpn("hub", "user", "add", "alice", "--state-dir", self.hub, "--password-file", self.pw)
        self.assertEqual(r.returncode, 0, r.stderr)
        r = sevpn("hub", "user", "add", "bob", "--json", "--state-dir", self.hub, input="from-stdin\n")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout), {"hub": "DEFAULT", "user": "bob", "added": True})
        users = json.loads(sevpn("hub", "user", "list", "--json", "--state-dir", self.hub).stdout)
        self.assertEqual([(u["hub"], u["user"], u["disabled"]) for u in users],
                         [("DEFAULT", "alice", False), ("DEFAULT", "bob", False)])
        path = os.path.join(self.hub, "hubs", "DEFAULT", "users.json")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            text = f.read()
        self.assertNotIn("s3cret", text)
        self.assertNotIn("from-stdin", text)

    def test_virtual_hubs(self):
        self.assertEqual(sevpn("hub", "create", "LAB", "--state-dir", self.hub).returncode, 0)
        r = sevpn("hub", "user", "add", "x", "--hub", "NOPE", "--state-dir", self.hub, "--password-file", self.pw)
        self.assertEqual(r.returncode, 1)
        self.assertIn("there is no virtual hub named NOPE", r.stderr)
        hubs = json.loads(sevpn("hub", "list", "--json", "--state-dir", self.hub).stdout)
        self.assertEqual([h["hub"] for h in hubs], ["DEFAULT", "LAB"])

    def test_accounts_are_private(self):
        from sevpn.pki import ensure_pki

        ensure_pki(os.path.join(self.dir, "pki"))
        ca = os.path.join(self.dir, "pki", "ca.pem")
        r = sevpn("account", "add", "office", "--state-dir", self.nic, "--hub", "vpn.example.org:5555",
                  "--user", "alice", "--password-file", self.pw, "--ca-file", ca, "--no-auto-reconnect")
        self.assertEqual(r.returncode, 0, r.stderr)
        path = os.path.join(self.nic, "accounts", "office.json")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        [listed] = json.loads(sevpn("account", "list", "--json", "--state-dir", self.nic).stdout)
        self.assertEqual((listed["hub"], listed["auto_reconnect"]), ("vpn.example.org:5555", False))
        self.assertNotIn("password", listed)
        self.assertEqual(sevpn("account", "delete", "office", "--state-dir", self.nic).returncode, 0)
        r = sevpn("account", "delete", "office", "--state-dir", self.nic)
        self.assertEqual(r.returncode, 1)
        self.assertIn("no account named office", r.stderr)

    def test_errors_are_sentences(self):
        cases = [
            (("nic", "status", "--state-dir", self.nic), "there is no state dir"),
            (("hub", "sessions", "--state-dir", self.hub), "there is no state dir"),
            (("hub", "sessions", "--state-dir", self.dir), "nothing is running with the state dir"),
            (("account", "add", "x", "--state-dir", self.nic, "--hub", "h:99999", "--user", "u",
              "--password-file", self.pw, "--ca-file", self.pw), "is not a hub address"),
            (("account", "add", "x", "--state-dir", self.nic, "--hub", "h:1", "--user", "u",
              "--password-file", self.pw, "--ca-file", "/nonexistent"), "does not exist"),
            (("hub", "user", "add", "u", "--state-dir", self.hub, "--password-file", "/nonexistent"),
             "cannot read the password file"),
            (("hub", "create", "../x", "--state-dir", self.hub), "not a valid virtual hub name"),
        ]
        for args, fragment in cases:
            r = sevpn(*args)
            self.assertEqual(r.returncode, 1, args)
            self.assertIn(fragment, r.stderr, args)
            self.assertNotIn("Traceback", r.stderr)


class Plugins(SynchronousTestCase):
    def test_twistd_lists_both_roles(self):
        """The plugins are found from the installed package, not the tree."""
        clean = {k: v for k, v in env().items() if k != "PYTHONPATH"}
        r = subprocess.run([os.path.join(BIN, "twistd"), "--help"], capture_output=True, text=True, env=clean,
                           cwd="/", timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr[-500:])
        self.assertIn("sevpn-hub", r.stdout)
        self.assertIn("sevpn-nic", r.stdout)

    def test_twistd_hub_usage_errors_are_sentences(self):
        r = subprocess.run([os.path.join(BIN, "twistd"), "-n", "sevpn-nic", "--hub", "h:1"],
                           capture_output=True, text=True, env=env(), timeout=60)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("also give --user, --password-file (or --cert-file and --key-file), --ca-file", r.stdout + r.stderr)
