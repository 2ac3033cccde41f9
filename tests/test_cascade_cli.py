"""C{sevpn hub cascade ...} on a state dir without a running hub: files, secrets, sentences."""

import json
import os
import shutil
import stat
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.test_cli import sevpn

CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


class CascadeCommands(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.hub = os.path.join(self.dir, "hub")
        self.pw = os.path.join(self.dir, "pw")
        self.ca = os.path.join(self.dir, "ca.pem")
        with open(self.pw, "w") as f:
            f.write("cascade-s3cret\n")
        with open(self.ca, "w") as f:
            f.write(CA)

    def add(self, name="toB", *extra):
        return sevpn("hub", "cascade", "add", name, "--state-dir", self.hub, "--hub-name", "DEFAULT",
                     "--to", "hub-b.example.org:5555", "--remote-hub", "SITE", "--user", "fromA",
                     "--password-file", self.pw, "--ca-file", self.ca, *extra)

    def test_add_list_delete(self):
        r = self.add()
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("cascade toB added: virtual hub DEFAULT to virtual hub SITE at hub-b.example.org:5555", r.stdout)
        self.assertIn("the hub is not running; it connects the cascade when it starts", r.stdout)
        path = os.path.join(self.hub, "cascades", "toB.json")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            saved = json.load(f)
        self.assertEqual(saved["password"], "cascade-s3cret")
        self.assertEqual(saved["ca_file"], self.ca)
        listed = json.loads(sevpn("hub", "cascade", "list", "--json", "--state-dir", self.hub).stdout)
        self.assertEqual([(c["name"], c["to"], c["state"]) for c in listed],
                         [("toB", "hub-b.example.org:5555", "hub not running")])
        self.assertNotIn("password", listed[0])
        human = sevpn("hub", "cascade", "list", "--state-dir", self.hub).stdout
        self.assertIn("toB", human)
        self.assertNotIn("s3cret", human)
        # adding again changes it and keeps its MAC
        self.assertEqual(self.add("toB", "--server-name", "b.internal").returncode, 0)
        with open(path) as f:
            again = json.load(f)
        self.assertEqual((again["mac"], again["server_name"]), (saved["mac"], "b.internal"))
        r = sevpn("hub", "cascade", "delete", "toB", "--state-dir", self.hub)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertFalse(os.path.exists(path))
        r = sevpn("hub", "cascade", "delete", "toB", "--state-dir", self.hub)
        self.assertEqual((r.returncode, r.stderr.strip()), (1, "sevpn: there is no cascade named toB"))

    def test_mistakes_are_sentences(self):
        for args, sentence in (
            (("--hub-name", "NOPE"), "there is no virtual hub named NOPE"),
            (("--to", "b:99999"), "is not a hub address"),
            (("--ca-file", "/nonexistent/ca.pem"), "cannot read the CA file /nonexistent/ca.pem"),
            (("--ca-file", self.pw), "holds no PEM certificate"),
        ):
            base = {"--hub-name": "DEFAULT", "--to": "b:5555", "--ca-file": self.ca}
            base[args[0]] = args[1]
            r = sevpn("hub", "cascade", "add", "x", "--state-dir", self.hub, "--remote-hub", "DEFAULT",
                      "--user", "u", "--password-file", self.pw, *[v for kv in base.items() for v in kv])
            self.assertEqual(r.returncode, 1, args)
            self.assertIn(sentence, r.stderr)
            self.assertNotIn("Traceback", r.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.hub, "cascades", "x.json")))

    def test_allow_and_deny_a_cascade_user(self):
        users = os.path.join(self.hub, "hubs", "DEFAULT", "users.json")
        r = sevpn("hub", "cascade", "allow", "fromA", "--state-dir", self.hub)
        self.assertEqual(r.returncode, 1)
        self.assertIn("there is no user fromA on virtual hub DEFAULT", r.stderr)
        sevpn("hub", "user", "add", "fromA", "--state-dir", self.hub, "--password-file", self.pw)
        r = sevpn("hub", "cascade", "allow", "fromA", "--max-macs", "500", "--state-dir", self.hub)
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(users) as f:
            record = json.load(f)["users"]["fromA"]
        self.assertEqual((record["cascade"], record["policy"]["max_macs"]), (True, 500))
        # a new password keeps the policy
        sevpn("hub", "user", "add", "fromA", "--state-dir", self.hub, input="another\n")
        with open(users) as f:
            record = json.load(f)["users"]["fromA"]
        self.assertTrue(record["cascade"])
        sevpn("hub", "cascade", "deny", "fromA", "--state-dir", self.hub)
        with open(users) as f:
            self.assertNotIn("cascade", json.load(f)["users"]["fromA"])
        r = sevpn("hub", "cascade", "allow", "fromA", "--max-macs", "lots", "--state-dir", self.hub)
        self.assertEqual(r.returncode, 1)  # usage errors too: exit status 1, as every error of sevpn
        self.assertIn("is not a number of MACs", r.stderr)
