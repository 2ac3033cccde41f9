"""
Virtual hubs and users: what every store does (L{StoreContract}, run
against the state dir's files and against PostgreSQL), then the files'
own details.
"""

import json
import os
import shutil
import stat
import tempfile

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sevpn.users import (
    CertificateRecord, HubState, IUserStore, StateError, UserPolicy, hash_password, verify_password,
)
from tests import pgcluster


class Passwords(SynchronousTestCase):
    def test_salted_slow_hash(self):
        # "pw!" cannot occur in base64 by chance ("pw" did, now and then)
        a, b = hash_password(b"pw!", n=16), hash_password(b"pw!", n=16)
        self.assertNotEqual(a, b)  # salted
        self.assertTrue(a.startswith("scrypt$16$"))
        self.assertNotIn("pw!", a)
        self.assertTrue(verify_password(b"pw!", a))
        self.assertFalse(verify_password(b"pW!", a))

    def test_default_cost(self):
        self.assertTrue(hash_password(b"x").startswith("scrypt$16384$8$1$"))

    def test_damaged_hash_never_matches(self):
        for stored in ("", "plain", "scrypt$x$y$z$a$b", "md5$1$2$3$4$5"):
            self.assertFalse(verify_password(b"pw", stored))


class StoreContract:
    """
    What every L{IUserStore} does, through the interface only.  A
    subclass makes C{self.store} (empty) and C{self.other()}: another
    process's store on the same users.
    """

    def test_provides_the_interface(self):
        self.assertTrue(verifyObject(IUserStore, self.store))
        self.assertIn("where", self.store.describe())

    def test_default_always_exists(self):
        self.assertEqual(self.store.hubs(), ["DEFAULT"])
        self.assertTrue(self.store.exists("DEFAULT"))
        self.assertEqual(self.store.users("DEFAULT"), {})
        self.store.ensure_default()
        self.assertEqual(self.store.hubs(), ["DEFAULT"])

    def test_virtual_hubs(self):
        self.store.create_hub("LAB")
        self.assertEqual(self.store.hubs(), ["DEFAULT", "LAB"])
        self.assertTrue(self.store.exists("LAB"))
        self.assertFalse(self.store.exists("NOPE"))
        self.store.add_user("LAB", "bob", b"pw")
        self.store.create_hub("LAB")  # again: nothing happens, the users stay
        self.assertEqual(list(self.store.users("LAB")), ["bob"])
        self.store.delete_hub("LAB")
        self.assertEqual(self.store.hubs(), ["DEFAULT"])
        with self.assertRaises(StateError) as e:
            self.store.delete_hub("LAB")
        self.assertEqual(str(e.exception), "there is no virtual hub named LAB")
        with self.assertRaises(StateError) as e:
            self.store.delete_hub("DEFAULT")
        self.assertEqual(str(e.exception), "the DEFAULT virtual hub always exists and cannot be deleted")

    def test_bad_names(self):
        self.assertRaises(StateError, self.store.create_hub, "../etc")
        self.assertRaises(StateError, self.store.create_hub, "x" * 65)
        self.assertRaises(StateError, self.store.add_user, "DEFAULT", "a b", b"pw")
        self.assertRaises(StateError, self.store.users, "MISSING")
        self.assertFalse(self.store.exists("../etc"))
        self.assertEqual(self.store.authenticate("../etc", "x", b"pw"), "auth-failed")
        self.assertEqual(self.store.authenticate("DEFAULT", "a'b", b"pw"), "auth-failed")

    def test_add_and_authenticate(self):
        self.assertTrue(self.store.add_user("DEFAULT", "alice", b"s3cret"))
        self.assertIsNone(self.store.authenticate("DEFAULT", "alice", b"s3cret"))
        self.assertEqual(self.store.authenticate("DEFAULT", "alice", b"wrong"), "auth-failed")
        self.assertEqual(self.store.authenticate("DEFAULT", "nobody", b"s3cret"), "auth-failed")
        self.assertEqual(self.store.authenticate("NOPE", "alice", b"s3cret"), "auth-failed")
        stored = self.store.users("DEFAULT")["alice"]["password"]
        self.assertTrue(stored.startswith("scrypt$16384$8$1$"))
        self.assertNotIn("s3cret", stored)
        # a second add changes the password
        self.assertFalse(self.store.add_user("DEFAULT", "alice", b"new"))
        self.assertEqual(self.store.authenticate("DEFAULT", "alice", b"s3cret"), "auth-failed")
        self.assertIsNone(self.store.authenticate("DEFAULT", "alice", b"new"))

    def test_users_of_one_hub_are_not_anothers(self):
        self.store.create_hub("LAB")
        self.store.add_user("LAB", "bob", b"pw")
        self.assertEqual(self.store.authenticate("DEFAULT", "bob", b"pw"), "auth-failed")
        self.assertIsNone(self.store.authenticate("LAB", "bob", b"pw"))
        with self.assertRaises(StateError) as e:
            self.store.add_user("NOPE", "bob", b"pw")
        self.assertEqual(str(e.exception), "there is no virtual hub named NOPE")

    def test_disable_and_enable(self):
        self.store.add_user("DEFAULT", "dave", b"pw")
        self.assertIsNone(self.store.revoked("DEFAULT", "dave"))
        self.store.set_user("DEFAULT", "dave", disabled=True)
        self.assertTrue(self.store.users("DEFAULT")["dave"]["disabled"])
        self.assertEqual(self.store.authenticate("DEFAULT", "dave", b"pw"), "auth-failed")
        self.assertEqual(self.store.revoked("DEFAULT", "dave"), "user dave was disabled by the operator")
        self.store.set_user("DEFAULT", "dave", disabled=False)
        self.assertNotIn("disabled", self.store.users("DEFAULT")["dave"])
        self.assertIsNone(self.store.authenticate("DEFAULT", "dave", b"pw"))
        self.assertIsNone(self.store.revoked("DEFAULT", "dave"))

    def test_policy(self):
        self.store.add_user("DEFAULT", "erin", b"pw")
        self.assertEqual(self.store.policy("DEFAULT", "erin"), {})
        policy = self.store.set_user("DEFAULT", "erin", max_macs=4, rate_in=10_000_000)
        self.assertEqual(policy, UserPolicy(max_macs=4, rate_in=10_000_000))
        self.assertEqual(self.store.policy("DEFAULT", "erin"), {"max_macs": 4, "rate_in": 10_000_000})
        # a new password keeps the policy, by either command
        self.store.add_user("DEFAULT", "erin", b"pw2")
        self.store.set_user("DEFAULT", "erin", password=b"pw3")
        self.assertEqual(self.store.policy("DEFAULT", "erin"), {"max_macs": 4, "rate_in": 10_000_000})
        self.assertIsNone(self.store.authenticate("DEFAULT", "erin", b"pw3"))
        self.store.set_user("DEFAULT", "erin", max_macs=0)  # 0: back to the hub's default
        self.assertEqual(self.store.policy("DEFAULT", "erin"), {"rate_in": 10_000_000})
        with self.assertRaises(StateError) as e:
            self.store.set_user("DEFAULT", "erin", max_macs=10**9)
        self.assertIn("max_macs must be a whole number from 0 (the default) to 4096", str(e.exception))
        self.assertEqual(self.store.policy("DEFAULT", "erin"), {"rate_in": 10_000_000})
        self.assertEqual(self.store.policy("DEFAULT", "nobody"), {})
        self.assertEqual(self.store.policy("NOPE", "erin"), {})
        with self.assertRaises(StateError) as e:
            self.store.set_user("DEFAULT", "nobody", max_macs=1)
        self.assertEqual(str(e.exception), "there is no user nobody on virtual hub DEFAULT (see 'sevpn hub user list')")

    def test_cascade_user(self):
        self.store.add_user("DEFAULT", "fromA", b"pw")
        self.assertFalse(self.store.cascade_user("DEFAULT", "fromA"))
        self.store.set_cascade_user("DEFAULT", "fromA", True, 500)
        self.assertTrue(self.store.cascade_user("DEFAULT", "fromA"))
        self.assertEqual(self.store.policy("DEFAULT", "fromA"), {"max_macs": 500})
        self.store.add_user("DEFAULT", "fromA", b"again")  # a new password keeps it a cascade user
        self.assertTrue(self.store.cascade_user("DEFAULT", "fromA"))
        self.store.set_cascade_user("DEFAULT", "fromA", False)
        self.assertFalse(self.store.cascade_user("DEFAULT", "fromA"))
        self.assertEqual(self.store.policy("DEFAULT", "fromA"), {"max_macs": 500})
        self.assertFalse(self.store.cascade_user("DEFAULT", "nobody"))
        self.assertFalse(self.store.cascade_user("NOPE", "fromA"))
        with self.assertRaises(StateError) as e:
            self.store.set_cascade_user("DEFAULT", "nobody", True)
        self.assertEqual(str(e.exception),
                         "there is no user nobody on virtual hub DEFAULT (add it with 'sevpn hub user add')")

    def test_delete_user(self):
        self.store.add_user("DEFAULT", "gus", b"pw")
        self.store.delete_user("DEFAULT", "gus")
        self.assertEqual(self.store.authenticate("DEFAULT", "gus", b"pw"), "auth-failed")
        self.assertEqual(self.store.revoked("DEFAULT", "gus"), "user gus was deleted by the operator")
        self.assertEqual(self.store.users("DEFAULT"), {})
        with self.assertRaises(StateError) as e:
            self.store.delete_user("DEFAULT", "gus")
        self.assertEqual(str(e.exception), "there is no user gus on virtual hub DEFAULT (see 'sevpn hub user list')")

    def test_deleted_hub_revokes_its_users(self):
        self.store.create_hub("LAB")
        self.store.add_user("LAB", "hal", b"pw")
        self.store.delete_hub("LAB")
        self.assertEqual(self.store.revoked("LAB", "hal"), "virtual hub LAB was deleted by the operator")
        self.assertEqual(self.store.authenticate("LAB", "hal", b"pw"), "auth-failed")
        self.store.create_hub("LAB")  # made again: the users are gone for good
        self.assertEqual(self.store.users("LAB"), {})

    def test_another_process_sees_the_changes(self):
        other = self.other()
        self.assertEqual(other.authenticate("DEFAULT", "ivy", b"pw"), "auth-failed")
        self.store.add_user("DEFAULT", "ivy", b"pw")
        self.assertIsNone(other.authenticate("DEFAULT", "ivy", b"pw"))  # a login reads what is stored now
        self.store.set_user("DEFAULT", "ivy", disabled=True, max_sessions=1)
        self.store.create_hub("LAB")
        other.refresh()
        self.assertEqual(other.revoked("DEFAULT", "ivy"), "user ivy was disabled by the operator")
        self.assertEqual(other.policy("DEFAULT", "ivy"), {"max_sessions": 1})
        self.assertEqual(other.hubs(), ["DEFAULT", "LAB"])
        self.store.delete_user("DEFAULT", "ivy")
        other.refresh()
        self.assertEqual(other.revoked("DEFAULT", "ivy"), "user ivy was deleted by the operator")
        # and the other way round
        other.add_user("LAB", "jo", b"pw")
        self.store.refresh()
        self.assertEqual(list(self.store.users("LAB")), ["jo"])

    # client certificates

    def certificate(self, n, **kw):
        fields = dict(fingerprint=":".join([f"{n:02X}"] * 32), subject="CN=alice", serial="1f",
                      not_after="2030-01-01T00:00:00+00:00", added="2025-01-01T00:00:00+00:00")
        fields.update(kw)
        return CertificateRecord(**fields)

    def test_a_user_with_a_certificate_and_no_password(self):
        a = self.certificate(1)
        self.assertTrue(self.store.add_user("DEFAULT", "alice", None))
        self.assertNotIn("password", self.store.users("DEFAULT")["alice"])
        self.assertEqual(self.store.authenticate("DEFAULT", "alice", b""), "auth-failed")
        self.assertTrue(self.store.add_certificate("DEFAULT", "alice", a))
        self.assertFalse(self.store.add_certificate("DEFAULT", "alice", a))  # already hers
        other = self.other()  # as the running hub sees it
        self.assertIsNone(other.certificate_login("DEFAULT", "alice", a.fingerprint))
        other.refresh()
        self.assertEqual(other.certificates("DEFAULT", "alice"), [a])
        self.assertEqual(other.certificate_user("DEFAULT", a.fingerprint), "alice")
        self.assertIsNone(other.revoked("DEFAULT", "alice", a.fingerprint))
        # a password later keeps the certificate; None keeps the password
        self.assertFalse(self.store.add_user("DEFAULT", "alice", b"pw"))
        self.store.add_user("DEFAULT", "alice", None)
        self.assertIsNone(self.store.authenticate("DEFAULT", "alice", b"pw"))
        self.assertEqual(self.store.certificates("DEFAULT", "alice"), [a])

    def test_certificate_logins_are_refused_alike(self):
        a, b = self.certificate(1), self.certificate(2)
        self.store.add_user("DEFAULT", "alice", None)
        self.store.add_user("DEFAULT", "bob", b"pw")
        self.store.add_certificate("DEFAULT", "alice", a)
        self.assertEqual(self.store.certificate_login("DEFAULT", "bob", a.fingerprint), "auth-failed")  # not his
        self.assertEqual(self.store.certificate_login("DEFAULT", "alice", b.fingerprint), "auth-failed")  # unknown
        self.assertEqual(self.store.certificate_login("NOPE", "alice", a.fingerprint), "auth-failed")
        self.store.set_user("DEFAULT", "alice", disabled=True)
        self.assertEqual(self.store.certificate_login("DEFAULT", "alice", a.fingerprint), "auth-failed")
        self.assertEqual(self.store.certificates("DEFAULT", "alice"), [a])  # a policy change keeps it

    def test_one_certificate_one_user(self):
        a, b = self.certificate(1), self.certificate(2)
        self.store.add_user("DEFAULT", "alice", None)
        self.store.add_user("DEFAULT", "bob", b"pw")
        self.store.add_certificate("DEFAULT", "alice", a)
        with self.assertRaises(StateError) as e:
            self.store.add_certificate("DEFAULT", "bob", a)
        self.assertEqual(str(e.exception), f"the certificate {a.fingerprint} is already user alice's on virtual hub "
                                           "DEFAULT: a certificate logs in as one user")
        with self.assertRaises(StateError) as e:
            self.store.add_certificate("DEFAULT", "nobody", b)
        self.assertEqual(str(e.exception),
                         "there is no user nobody on virtual hub DEFAULT (add it with 'sevpn hub user add')")
        self.store.create_hub("LAB")  # another virtual hub is another matter
        self.store.add_user("LAB", "carol", None)
        self.assertTrue(self.store.add_certificate("LAB", "carol", a))

    def test_revoking(self):
        a, b = self.certificate(1), self.certificate(2)
        self.store.add_user("DEFAULT", "alice", None)
        self.store.add_certificate("DEFAULT", "alice", a)
        self.store.add_certificate("DEFAULT", "alice", b)
        self.assertEqual(self.store.revoke_certificates("DEFAULT", "alice", a.fingerprint), [a.fingerprint])
        self.assertEqual(self.store.certificate_login("DEFAULT", "alice", a.fingerprint), "auth-failed")
        self.assertIsNone(self.store.certificate_login("DEFAULT", "alice", b.fingerprint))
        self.assertEqual(self.store.revoked("DEFAULT", "alice", a.fingerprint),
                         f"the certificate {a.fingerprint} of user alice was revoked by the operator")
        self.assertIsNone(self.store.revoked("DEFAULT", "alice"))  # her other sessions may stay
        self.assertIsNone(self.store.certificate_user("DEFAULT", a.fingerprint))
        self.assertEqual(self.store.revoke_certificates("DEFAULT", "alice"), [b.fingerprint])
        self.assertEqual(self.store.revoke_certificates("DEFAULT", "alice"), [])
        [kept_a, kept_b] = self.store.certificates("DEFAULT", "alice")
        self.assertIsNotNone(kept_a.revoked)
        self.assertEqual(kept_a.fingerprint, a.fingerprint)
        with self.assertRaises(StateError) as e:
            self.store.add_certificate("DEFAULT", "alice", a)
        self.assertIn(f"the certificate {a.fingerprint} was revoked on ", str(e.exception))
        with self.assertRaises(StateError) as e:
            self.store.revoke_certificates("DEFAULT", "alice", self.certificate(3).fingerprint)
        self.assertIn("user alice on virtual hub DEFAULT has no certificate", str(e.exception))
        self.assertRaises(StateError, self.store.revoke_certificates, "DEFAULT", "nobody")

    def test_a_deleted_users_certificates_go_with_them(self):
        a = self.certificate(1)
        self.store.add_user("DEFAULT", "alice", None)
        self.store.add_certificate("DEFAULT", "alice", a)
        self.store.delete_user("DEFAULT", "alice")
        self.assertEqual(self.store.revoked("DEFAULT", "alice", a.fingerprint),
                         "user alice was deleted by the operator")
        self.store.add_user("DEFAULT", "alice", b"pw")  # the same name again: not the same certificates
        self.assertEqual(self.store.revoked("DEFAULT", "alice", a.fingerprint),
                         f"the certificate {a.fingerprint} of user alice was removed by the operator")
        self.assertEqual(self.store.certificates("DEFAULT", "alice"), [])


class FileStore(StoreContract, SynchronousTestCase):
    """The contract, on a state dir's files."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.store = HubState(os.path.join(self.dir, "fresh"))  # does not exist yet

    def other(self):
        return HubState(self.store.state_dir)


class PostgresStore(StoreContract, SynchronousTestCase):
    """The contract, on a real PostgreSQL server (a fresh database per test)."""

    def setUp(self):
        from sevpn.pgusers import PostgresUserStore

        cluster = pgcluster.shared()
        self.url = cluster.url(cluster.database(self))
        self.store = PostgresUserStore(self.url)
        self.addCleanup(self.store.close)

    def other(self):
        from sevpn.pgusers import PostgresUserStore

        store = PostgresUserStore(self.url)
        self.addCleanup(store.close)
        return store


class State(SynchronousTestCase):
    """The file store's own details: its files."""

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
