"""Virtual hubs and users in the hub's state dir."""

import json
import os
import shutil
import stat
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from sevpn.users import HubState, StateError, hash_password, verify_password


class Passwords(SynchronousTestCase):
    def test_salted_slow_hash(self):
        a, b = hash_password(b"pw", n=16), hash_password(b"pw", n=16)
        self.assertNotEqual(a, b)  # salted
        self.assertTrue(a.startswith("scrypt$16$"))
        self.assertNotIn("pw", a.split("$", 4)[-1])
        self.assertTrue(verify_password(b"pw", a))
        self.assertFalse(verify_password(b"pW", a))

    def test_default_cost(self):
        self.assertTrue(hash_password(b"x").startswith("scrypt$16384$8$1$"))

    def test_damaged_hash_never_matches(self):
        for stored in ("", "plain", "scrypt$x$y$z$a$b", "md5$1$2$3$4$5"):
            self.assertFalse(verify_password(b"pw", stored))


class State(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.state = HubState(os.path.join(self.dir, "fresh"))  # does not exist yet

    def test_default_always_exists(self):
        self.assertEqual(self.state.hubs(), ["DEFAULT"])
        self.assertTrue(self.state.exists("DEFAULT"))

    def test_fresh_state_dir_user_add(self):
        self.state.add_user("DEFAULT", "alice", b"s3cret")
        self.assertIsNone(self.state.authenticate("DEFAULT", "alice", b"s3cret"))
        path = os.path.join(self.state.state_dir, "hubs", "DEFAULT", "users.json")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            self.assertNotIn("s3cret", f.read())

    def test_refusal_codes(self):
        self.state.create_hub("LAB")
        self.state.add_user("LAB", "bob", b"pw")
        self.assertEqual(self.state.authenticate("LAB", "bob", b"wrong"), "auth-failed")
        self.assertEqual(self.state.authenticate("LAB", "nobody", b"pw"), "auth-failed")
        self.assertEqual(self.state.authenticate("NOPE", "bob", b"pw"), "auth-failed")
        self.assertEqual(self.state.authenticate("DEFAULT", "bob", b"pw"), "auth-failed")

    def test_changes_seen_without_restart(self):
        other = HubState(self.state.state_dir)  # as the running hub sees it
        self.assertEqual(other.authenticate("DEFAULT", "carol", b"pw"), "auth-failed")
        self.state.add_user("DEFAULT", "carol", b"pw")
        self.assertIsNone(other.authenticate("DEFAULT", "carol", b"pw"))
        self.state.delete_user("DEFAULT", "carol")
        self.assertEqual(other.authenticate("DEFAULT", "carol", b"pw"), "auth-failed")

    def test_disabled_user(self):
        self.state.add_user("DEFAULT", "dave", b"pw")
        path = os.path.join(self.state.state_dir, "hubs", "DEFAULT", "users.json")
        with open(path) as f:
            data = json.load(f)
        data["users"]["dave"]["disabled"] = True
        with open(path, "w") as f:
            json.dump(data, f)
        self.assertEqual(HubState(self.state.state_dir).authenticate("DEFAULT", "dave", b"pw"), "auth-failed")

    def test_bad_names(self):
        self.assertRaises(StateError, self.state.create_hub, "../etc")
        self.assertRaises(StateError, self.state.add_user, "DEFAULT", "a b", b"pw")
        self.assertRaises(StateError, self.state.delete_hub, "DEFAULT")
        self.assertRaises(StateError, self.state.users, "MISSING")
