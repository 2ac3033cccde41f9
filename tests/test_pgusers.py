"""
The PostgreSQL user store's own behaviour, against a real server: its
schema, the outage rule (on an injected clock), the watcher that keeps a
hub's copy current (polling on a fake clock; notifications on the real
reactor), and where the URL may come from.  What it shares with the file
store is tested in L{tests.test_users}.
"""

import os
import shutil
import tempfile
import threading

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sevpn.users import StateError, users_location
from tests import pgcluster


class Logged:
    def capture(self):
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def lines(self, fragment):
        return [line for line in (formatEvent(e) for e in self.logged) if fragment in line]


class Now:
    """A clock the test moves."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def store(testcase, url, **kw):
    from sevpn.pgusers import PostgresUserStore

    s = PostgresUserStore(url, **kw)
    testcase.addCleanup(s.close)
    return s


class Schema(SynchronousTestCase, Logged):
    def setUp(self):
        self.cluster = pgcluster.shared()
        self.name = self.cluster.database(self)
        self.url = self.cluster.url(self.name)
        self.capture()

    def test_made_on_first_use_once(self):
        self.assertEqual(self.cluster.sql("SELECT to_regclass('sevpn_users')", self.name), [(None,)])
        store(self, self.url).hubs()
        self.assertEqual(self.cluster.sql("SELECT version FROM sevpn_schema", self.name), [(2,)])
        self.assertEqual(self.cluster.sql("SELECT count(*) FROM sevpn_generation", self.name), [(1,)])
        self.assertEqual(len(self.lines("schema brought to version 1")), 1)
        store(self, self.url).hubs()  # another node: nothing to do
        self.assertEqual(len(self.lines("schema brought to version 1")), 1)
        self.assertEqual(self.cluster.sql("SELECT count(*) FROM sevpn_generation", self.name), [(1,)])

    def test_an_older_schema_is_brought_up_to_date(self):
        from sevpn.pgusers import MIGRATIONS
        from sevpn.users import hash_password

        [(version, statements)] = MIGRATIONS[:1]
        self.assertEqual(version, 1)
        for statement in statements:  # a database an earlier sevpn made, with a user in it
            self.cluster.sql(statement, self.name)
        self.cluster.sql("CREATE TABLE sevpn_schema (one boolean PRIMARY KEY DEFAULT true, version integer NOT NULL);"
                         "INSERT INTO sevpn_schema (version) VALUES (1);"
                         "INSERT INTO sevpn_hubs VALUES ('DEFAULT');"
                         "INSERT INTO sevpn_users (hub, name, password) "
                         f"VALUES ('DEFAULT', 'old', '{hash_password(b'pw')}')",
                         self.name)
        s = store(self, self.url)
        self.assertIsNone(s.authenticate("DEFAULT", "old", b"pw"))
        self.assertEqual(self.cluster.sql("SELECT version FROM sevpn_schema", self.name), [(2,)])
        self.assertEqual(len(self.lines("schema brought to version 1")), 0)
        self.assertEqual(len(self.lines("schema brought to version 2")), 1)
        s.add_user("DEFAULT", "new", None)  # what version 2 allows
        self.assertEqual(sorted(s.users("DEFAULT")), ["new", "old"])

    def test_nodes_starting_at_once_migrate_once(self):
        stores = [store(self, self.url) for _ in range(4)]
        errors = []

        def start(s):
            try:
                s.hubs()
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=start, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(len(self.lines("schema brought to version 1")), 1)

    def test_a_newer_schema_is_refused(self):
        store(self, self.url).hubs()
        self.cluster.sql("UPDATE sevpn_schema SET version = 7", self.name)
        with self.assertRaises(StateError) as e:
            store(self, self.url).hubs()
        self.assertIn("has schema version 7, newer than this sevpn knows (2): upgrade sevpn on this node",
                      str(e.exception))

    def test_refresh_says_whether_anything_changed(self):
        node1, node2 = store(self, self.url), store(self, self.url)
        self.assertTrue(node1.refresh())  # the first read
        self.assertFalse(node1.refresh())
        node2.add_user("DEFAULT", "alice", b"pw")
        self.assertTrue(node1.refresh())
        self.assertEqual(list(node1.users("DEFAULT")), ["alice"])
        self.assertFalse(node1.refresh())

    def test_a_damaged_row_is_a_sentence(self):
        s = store(self, self.url)
        s.add_user("DEFAULT", "mallory", b"pw")
        s.add_user("DEFAULT", "alice", b"pw")
        self.cluster.sql("""UPDATE sevpn_users SET policy = '{"max_macs": -1}' WHERE name = 'mallory'""", self.name)
        self.cluster.sql("""UPDATE sevpn_users SET policy = '{"max_macs": 3}' WHERE name = 'alice'""", self.name)
        self.cluster.sql("UPDATE sevpn_generation SET n = n + 1", self.name)
        self.assertTrue(s.refresh())
        [line] = self.lines("holds a damaged policy for user mallory on virtual hub DEFAULT")
        self.assertIn("the user cannot log in until then", line)
        # the rest of the copy follows the database
        self.assertEqual(list(s.users("DEFAULT")), ["alice"])
        self.assertEqual(s.users("DEFAULT")["alice"]["policy"], {"max_macs": 3})
        self.assertEqual(s.authenticate("DEFAULT", "mallory", b"pw"), "auth-failed")
        self.assertEqual(len(self.lines("refused a login of 'mallory' on DEFAULT")), 1)
        self.assertIsNone(s.authenticate("DEFAULT", "alice", b"pw"))  # the others are not held back

    def test_a_replaced_database_is_said(self):
        s = store(self, self.url)
        s.add_user("DEFAULT", "alice", b"pw")
        s.refresh()
        self.cluster.sql("DELETE FROM sevpn_users; UPDATE sevpn_generation SET n = 0", self.name)
        self.assertTrue(s.refresh())
        [line] = self.lines("went back from change")
        self.assertIn("went back from change 1 to change 0: it was restored from a backup or replaced", line)
        self.assertEqual(s.users("DEFAULT"), {})

    def test_a_hub_needs_only_to_read(self):
        """A node's hub may use a role that can only read: changes are the command's, with another role."""
        store(self, self.url).add_user("DEFAULT", "alice", b"pw")
        self.cluster.sql("DO $$ BEGIN CREATE ROLE sevpn_reader LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; "
                         "END $$", self.name)
        self.cluster.sql("GRANT SELECT ON ALL TABLES IN SCHEMA public TO sevpn_reader", self.name)  # as docs/fabric.md
        self.addCleanup(self.cluster.sql, "DROP OWNED BY sevpn_reader", self.name)
        reader = store(self, self.url.replace("postgres@", "sevpn_reader@"))
        self.assertEqual(list(reader.users("DEFAULT")), ["alice"])
        self.assertIsNone(reader.authenticate("DEFAULT", "alice", b"pw"))
        self.assertFalse(reader.refresh())
        reader.listener().close()  # LISTEN takes no privilege
        with self.assertRaises(StateError) as e:
            reader.set_user("DEFAULT", "alice", disabled=True)
        self.assertIn("refused it (permission denied for table sevpn_generation)", str(e.exception))
        self.assertIsNone(reader.authenticate("DEFAULT", "alice", b"pw"))

    def test_names_go_in_as_parameters(self):
        s = store(self, self.url)
        s.add_user("DEFAULT", "o.brien-x_1", b"pw")
        self.assertEqual(s.authenticate("DEFAULT", "x' OR '1'='1", b"pw"), "auth-failed")
        self.assertRaises(StateError, s.create_hub, "x'; DROP TABLE sevpn_users; --")
        self.assertIsNone(s.authenticate("DEFAULT", "o.brien-x_1", b"pw"))


class Outage(SynchronousTestCase, Logged):
    """
    The rule while the database does not answer (the shared server is
    stopped and started again): known users log in from the copy for the
    grace time, unknown and disabled ones are refused, changes fail with a
    sentence, logins do not wait, and the outage is logged once.
    """

    def setUp(self):
        from sevpn.pgusers import PostgresUserStore

        self.cluster = pgcluster.shared()
        self.url = self.cluster.url(self.cluster.database(self))
        self.now = Now()
        self.connects = 0

        def connect(**params):
            import psycopg

            self.connects += 1
            return psycopg.connect(**params)

        self.store = PostgresUserStore(self.url, grace=600, retry=5, clock=self.now, connect=connect)
        self.addCleanup(self.store.close)
        self.store.add_user("DEFAULT", "alice", b"pw")
        self.store.add_user("DEFAULT", "dave", b"pw")
        self.store.set_user("DEFAULT", "dave", disabled=True)
        self.store.refresh()  # the copy: read at t=1000
        self.capture()

    def stop_database(self):
        self.cluster.stop()
        self.addCleanup(self.cluster.start)

    def test_known_users_log_in_unknown_and_disabled_do_not(self):
        self.stop_database()
        self.now.t += 60
        self.assertIsNone(self.store.authenticate("DEFAULT", "alice", b"pw"))
        self.assertEqual(self.store.authenticate("DEFAULT", "alice", b"wrong"), "auth-failed")
        self.assertEqual(self.store.authenticate("DEFAULT", "nobody", b"pw"), "auth-failed")
        self.assertEqual(self.store.authenticate("DEFAULT", "dave", b"pw"), "auth-failed")  # the copy's flag wins
        [line] = self.lines("does not answer")
        self.assertIn(f"the user database {self.store.where} does not answer (", line)
        self.assertIn("logins use this node's copy of the users (checked 1m ago) for up to 10m", line)
        self.assertEqual(self.store.describe()["answering"], False)

    def test_the_copy_serves_for_the_grace_time_only(self):
        self.stop_database()
        self.now.t += 600
        self.assertIsNone(self.store.authenticate("DEFAULT", "alice", b"pw"))
        self.now.t += 1
        self.assertEqual(self.store.authenticate("DEFAULT", "alice", b"pw"), "auth-failed")

    def test_logins_do_not_wait_for_a_database_known_down(self):
        self.stop_database()
        self.assertIsNone(self.store.authenticate("DEFAULT", "alice", b"pw"))  # found its connection gone
        before = self.connects
        for _ in range(3):
            self.now.t += 1
            self.assertIsNone(self.store.authenticate("DEFAULT", "alice", b"pw"))
        self.assertEqual(self.connects, before)  # within the retry time: not asked
        self.now.t += 5
        self.assertIsNone(self.store.authenticate("DEFAULT", "alice", b"pw"))
        self.assertEqual(self.connects, before + 1)  # asked again (and refused)
        self.assertEqual(len(self.lines("does not answer")), 1)  # one sentence for the outage

    def test_changes_fail_with_a_sentence(self):
        self.stop_database()
        with self.assertRaises(StateError) as e:
            self.store.set_user("DEFAULT", "alice", disabled=True)
        self.assertTrue(str(e.exception).startswith(
            f"cannot change the users: the user database {self.store.where} does not answer ("), str(e.exception))
        self.assertRaises(StateError, self.store.refresh)
        self.assertIsNone(self.store.authenticate("DEFAULT", "alice", b"pw"))  # the copy is still there

    def test_back_again(self):
        self.stop_database()
        self.assertIsNone(self.store.authenticate("DEFAULT", "alice", b"pw"))
        self.cluster.start()
        self.now.t += 5
        self.store.add_user("DEFAULT", "carol", b"pw")  # another node could have, too
        self.assertIsNone(self.store.authenticate("DEFAULT", "carol", b"pw"))
        [line] = self.lines("answers again")
        self.assertIn(f"the user database {self.store.where} answers again (it did not for 5s)", line)
        self.assertEqual(self.store.describe()["answering"], True)

    def test_nothing_read_nothing_served(self):
        """A process that never read the users (the command, a node started during the outage) serves nobody."""
        from sevpn.pgusers import PostgresUserStore

        fresh = PostgresUserStore(self.url, clock=self.now)
        self.addCleanup(fresh.close)
        self.stop_database()
        self.assertEqual(fresh.authenticate("DEFAULT", "alice", b"pw"), "auth-failed")
        with self.assertRaises(StateError) as e:
            fresh.hubs()
        self.assertIn("cannot read the users: the user database", str(e.exception))


class Polling(SynchronousTestCase):
    """The watcher's regular check, on a fake clock, with the blocking calls run at once."""

    def setUp(self):
        from sevpn.pgusers import UserDatabaseWatcher

        self.cluster = pgcluster.shared()
        url = self.cluster.url(self.cluster.database(self))
        self.node1, self.node2 = store(self, url), store(self, url)
        self.node1.refresh()
        self.clock = Clock()
        self.changes = []
        self.watcher = UserDatabaseWatcher(self.node1, self.clock, lambda: self.changes.append(self.clock.seconds()),
                                           maybeDeferred, poll=10)
        self.watcher.startService()
        self.addCleanup(self.watcher.stopService)

    def test_a_change_elsewhere_reaches_the_hub_at_the_next_check(self):
        self.node2.add_user("DEFAULT", "alice", b"pw")
        self.clock.advance(9.9)
        self.assertEqual(self.changes, [])
        self.clock.advance(0.1)
        self.assertEqual(self.changes, [10])
        self.assertEqual(list(self.node1.users("DEFAULT")), ["alice"])
        self.clock.advance(10)
        self.assertEqual(self.changes, [10])  # nothing new
        self.node2.set_user("DEFAULT", "alice", disabled=True)
        self.clock.advance(10)
        self.assertEqual(self.changes, [10, 30])
        self.assertEqual(self.node1.revoked("DEFAULT", "alice"), "user alice was disabled by the operator")

    def test_an_outage_tells_the_hub_nothing_and_the_return_catches_up(self):
        self.cluster.stop()
        self.addCleanup(self.cluster.start)
        self.clock.advance(10)
        self.assertEqual((self.changes, self.watcher.checks), ([], 1))
        self.cluster.start()
        self.node2.add_user("DEFAULT", "bob", b"pw")
        self.clock.advance(10)
        self.assertEqual(self.changes, [20])
        self.assertIn("bob", self.node1.users("DEFAULT"))

    def test_stopped_it_checks_no_more(self):
        self.watcher.stopService()
        self.node2.add_user("DEFAULT", "alice", b"pw")
        self.clock.advance(100)
        self.assertEqual((self.changes, self.watcher.checks), ([], 0))


class Notifications(TestCase):
    """A change made elsewhere reaches a watching hub at once, through NOTIFY, on the real reactor."""

    @inlineCallbacks
    def test_notified_at_once(self):
        cluster = pgcluster.shared()
        url = cluster.url(cluster.database(self))
        node1, node2 = store(self, url, poll=3600), store(self, url)  # no polling within the test
        node1.refresh()
        changed = []
        waiter = [Deferred()]

        def on_change():
            changed.append(dict(node1.users("DEFAULT")))
            waiter[0].callback(None)

        watcher = node1.watch(reactor, on_change)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        for _ in range(200):  # the listening connection is made in a thread
            if watcher.reader is not None and watcher.checks and not watcher._checking:
                break
            yield deferLater(0.02)
        self.assertIsNotNone(watcher.reader)
        yield threads(node2.add_user, "DEFAULT", "alice", b"pw")
        yield waiter[0].addTimeout(10, reactor)
        self.assertEqual(list(changed[-1]), ["alice"])
        waiter[0] = Deferred()
        yield threads(node2.set_user, "DEFAULT", "alice", disabled=True)
        yield waiter[0].addTimeout(10, reactor)
        self.assertTrue(changed[-1]["alice"]["disabled"])
        self.assertEqual(watcher.checks, 3)  # the first after listening, then one per change

    @inlineCallbacks
    def test_the_listener_comes_back_after_the_database(self):
        cluster = pgcluster.shared()
        url = cluster.url(cluster.database(self))
        node1, node2 = store(self, url, poll=0.2, retry=0), store(self, url)
        node1.refresh()
        changed = []
        watcher = node1.watch(reactor, lambda: changed.append(1))
        watcher.startService()
        self.addCleanup(watcher.stopService)
        yield waitFor(lambda: watcher.reader is not None)
        yield threads(cluster.stop)
        self.addCleanup(cluster.start)
        yield waitFor(lambda: watcher.reader is None)
        yield threads(cluster.start)
        yield waitFor(lambda: watcher.reader is not None)  # by the next check that worked
        yield threads(node2.add_user, "DEFAULT", "alice", b"pw")
        yield waitFor(lambda: "alice" in node1.users("DEFAULT"))
        self.assertTrue(changed)


def deferLater(seconds):
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


def threads(f, *args, **kw):
    from twisted.internet.threads import deferToThread

    return deferToThread(f, *args, **kw)


@inlineCallbacks
def waitFor(condition, seconds=20.0):
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        yield deferLater(0.02)
    raise AssertionError("the condition did not come true in time")


class Location(SynchronousTestCase):
    """Where the URL comes from: never a password on the command line, nor in a file others read."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def write(self, text, mode):
        path = os.path.join(self.dir, "users.url")
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def test_files_by_default(self):
        self.assertIsNone(users_location())

    def test_a_url_without_a_password(self):
        url = "postgresql://sevpn@db.example.org/sevpn"
        self.assertEqual(users_location(url), url)

    def test_no_password_on_the_command_line(self):
        for url in ("postgresql://sevpn:hunter2@db/sevpn", "postgresql://sevpn@db/sevpn?password=hunter2"):
            with self.assertRaises(StateError) as e:
                users_location(url)
            self.assertIn("--users: the URL holds a password, which every user of this machine can read",
                          str(e.exception))
            self.assertNotIn("hunter2", str(e.exception))

    def test_a_password_in_a_private_file(self):
        path = self.write("postgresql://sevpn:hunter2@db/sevpn\nignored\n", 0o600)
        self.assertEqual(users_location(path=path), "postgresql://sevpn:hunter2@db/sevpn")

    def test_a_password_in_a_file_others_read(self):
        path = self.write("postgresql://sevpn:hunter2@db/sevpn\n", 0o644)
        with self.assertRaises(StateError) as e:
            users_location(path=path)
        self.assertEqual(str(e.exception), f"--users-file {path} holds the database password but other users "
                                           f"may read it: chmod 600 {path}")
        self.assertEqual(users_location(path=self.write("postgresql://sevpn@db/sevpn\n", 0o644)),
                         "postgresql://sevpn@db/sevpn")

    def test_other_mistakes(self):
        with self.assertRaises(StateError) as e:
            users_location("mysql://u:secret@db/x")
        self.assertIn("'db/x' is not a postgresql://USER@HOST/DATABASE URL", str(e.exception))
        self.assertNotIn("secret", str(e.exception))
        self.assertRaises(StateError, users_location, "postgresql://a@b/c", os.path.join(self.dir, "x"))
        with self.assertRaises(StateError) as e:
            users_location(path=os.path.join(self.dir, "missing"))
        self.assertIn("cannot read --users-file", str(e.exception))
        with self.assertRaises(StateError) as e:
            users_location(path=self.write("\n", 0o600))
        self.assertIn("is empty", str(e.exception))

    def test_where_never_shows_the_password(self):
        from sevpn.pgusers import PostgresUserStore

        s = PostgresUserStore("postgresql://sevpn:hunter2@db.example.org:5433/users")
        self.assertEqual(s.where, "postgresql://sevpn@db.example.org:5433/users")
        self.assertEqual(s.params["connect_timeout"], "2")
        self.assertIn("statement_timeout=2000", s.params["options"])


class HubOptions(SynchronousTestCase):
    """C{twistd sevpn-hub --users ...}."""

    def parse(self, *args):
        from sevpn.hubtap import Options

        options = Options()
        options.parseOptions(list(args))
        return options

    def test_the_service_gets_the_store(self):
        from sevpn.hubtap import makeService

        config = self.parse("--users", "postgresql://sevpn@db.example.org/sevpn", "--users-grace", "60")
        service = makeService(config)
        self.assertEqual((service.users, service.users_settings),
                         ("postgresql://sevpn@db.example.org/sevpn", {"grace": 60.0}))
        self.assertIsNone(makeService(self.parse()).users)  # the state dir's files by default

    def test_mistakes_are_sentences(self):
        from twisted.python.usage import UsageError

        e = self.assertRaises(UsageError, self.parse, "--users", "postgresql://sevpn:hunter2@db/sevpn")
        self.assertIn("--users: the URL holds a password", str(e))
        e = self.assertRaises(UsageError, self.parse, "--users", "postgresql://a@b/c", "--users-file", "/x")
        self.assertEqual(str(e), "give --users or --users-file, not both")
        e = self.assertRaises(UsageError, self.parse, "--users-grace", "-1")
        self.assertIn("--users-grace must not be negative", str(e))


class Commands(SynchronousTestCase):
    """The real C{sevpn hub ...} commands on the shared users (C{--users-file}), no hub running."""

    def setUp(self):
        from tests.test_cli import sevpn

        self.sevpn = sevpn
        cluster = pgcluster.shared()
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.url_file = os.path.join(self.dir, "users.url")
        with open(self.url_file, "w") as f:
            f.write(cluster.url(cluster.database(self)) + "\n")
        self.pw = os.path.join(self.dir, "pw")
        with open(self.pw, "w") as f:
            f.write("s3cret\n")
        self.where = ["--users-file", self.url_file, "--state-dir", os.path.join(self.dir, "no-hub-here")]

    def run_ok(self, *args):
        r = self.sevpn(*args, *self.where)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout

    def test_users_in_the_database(self):
        import json

        self.assertIn("virtual hub LAB created in postgresql://postgres@", self.run_ok("hub", "create", "LAB"))
        self.run_ok("hub", "user", "add", "alice", "--password-file", self.pw)
        self.run_ok("hub", "user", "add", "bob", "--hub", "LAB", "--password-file", self.pw)
        self.run_ok("hub", "user", "set", "alice", "--rate-in", "10M")
        self.run_ok("hub", "user", "disable", "bob", "--hub", "LAB")
        self.run_ok("hub", "cascade", "allow", "alice", "--max-macs", "50")
        users = json.loads(self.run_ok("hub", "user", "list", "--json"))
        self.assertEqual([(u["hub"], u["user"], u["disabled"], u["rate_in"], u["max_macs"]) for u in users],
                         [("DEFAULT", "alice", False, 10_000_000, 50), ("LAB", "bob", True, 0, 0)])
        hubs = json.loads(self.run_ok("hub", "list", "--json"))
        self.assertEqual(hubs, [{"hub": "DEFAULT", "users": 1}, {"hub": "LAB", "users": 1}])
        self.run_ok("hub", "delete", "LAB")
        self.run_ok("hub", "user", "delete", "alice")
        self.assertEqual(json.loads(self.run_ok("hub", "user", "list", "--json")), [])
        self.assertFalse(os.path.exists(os.path.join(self.dir, "no-hub-here")))  # nothing written beside

    def test_errors_are_sentences(self):
        r = self.sevpn("hub", "user", "delete", "nobody", *self.where)
        self.assertEqual((r.returncode, r.stderr),
                         (1, "sevpn: there is no user nobody on virtual hub DEFAULT (see 'sevpn hub user list')\n"))
        r = self.sevpn("hub", "user", "list", "--users", "postgresql://u:hunter2@db/x")
        self.assertEqual(r.returncode, 1)
        self.assertIn("sevpn: --users: the URL holds a password", r.stderr)
        self.assertNotIn("hunter2", r.stderr)
        r = self.sevpn("hub", "user", "list", "--users", "postgresql://postgres@/nothere?host=/nonexistent")
        self.assertEqual(r.returncode, 1)
        self.assertTrue(r.stderr.startswith("sevpn: cannot read the users: the user database "
                                            "postgresql://postgres@/nonexistent/nothere does not answer ("), r.stderr)
        self.assertEqual(len(r.stderr.splitlines()), 1)

    def test_a_hub_does_not_start_without_its_database(self):
        from sevpn.hubservice import HubService

        service = HubService(state_dir=os.path.join(self.dir, "hub"), listen=["tcp:0:interface=127.0.0.1"],
                             users="postgresql://postgres@/nothere?host=/nonexistent")
        with self.assertRaises(SystemExit) as e:
            service.startService()
        self.assertTrue(str(e.exception).startswith(
            "sevpn-hub: cannot read the users: the user database postgresql://postgres@/nonexistent/nothere does "
            "not answer ("), str(e.exception))
        self.assertEqual(service.ports, [])
