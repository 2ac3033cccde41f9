"""
State dirs that cannot be planted: what the hub and card refuse at start,
what the sevpn command writes as root beside a service user, and files
that are read only when nobody else could have put them there.

"Another user" is a throwaway uid given files with os.chown (the tests
run as root; without root they are skipped).
"""

import json
import os
import shutil
import signal
import stat
import tempfile

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from sevpn.files import StateDir, StateError, UnsafeState, ensure_dir, read_json, read_private, write_json
from sevpn.users import HubState

#: A uid nobody on a test machine uses.
STRANGER = 54321


def needs_root():
    if os.geteuid() != 0:
        raise SkipTest("changing file owners needs root")


class StateDirCase(SynchronousTestCase):
    def setUp(self):
        self.base = tempfile.mkdtemp(prefix="op-files-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.path = os.path.join(self.base, "state")
        self.state = HubState(self.path)
        self.state.add_user("DEFAULT", "alice", b"pw")

    def refused(self, fragment, runner=None):
        with self.assertRaises(UnsafeState) as caught:
            StateDir(self.path).check(runner)
        self.assertIn(fragment, str(caught.exception))
        return str(caught.exception)


class Check(StateDirCase):
    def test_a_fresh_state_dir_passes(self):
        StateDir(self.path).check(os.geteuid())
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.path, "hubs")).st_mode), 0o700)

    def test_writable_by_others(self):
        os.chmod(self.path, 0o777)
        message = self.refused("is writable by other users (mode 0777)")
        self.assertIn(f"chmod 700 {self.path}", message)

    def test_a_group_writable_file_inside(self):
        users = os.path.join(self.path, "hubs", "DEFAULT", "users.json")
        os.chmod(users, 0o620)
        self.refused(f"{users} is writable by other users (mode 0620)")

    def test_a_file_of_another_user_inside(self):
        needs_root()
        planted = os.path.join(self.path, "hubs", "DEFAULT", "planted")
        with open(planted, "w") as f:
            f.write("x")
        os.chmod(planted, 0o600)
        os.chown(planted, STRANGER, STRANGER)
        message = self.refused(f"{planted} belongs to uid {STRANGER}, not to root")
        self.assertIn("chown root", message)

    def test_a_root_file_in_a_service_users_state_dir(self):
        """Root's files where the service user's belong are refused too."""
        needs_root()
        for directory, dirs, files in os.walk(self.path):
            for name in [directory] + [os.path.join(directory, n) for n in dirs + files]:
                os.chown(name, STRANGER, STRANGER)
        StateDir(self.path).check()  # the sevpn command (root) may work on it
        StateDir(self.path).check(STRANGER)  # and so may the service user
        with open(os.path.join(self.path, "stray"), "w"):
            pass
        os.chmod(os.path.join(self.path, "stray"), 0o600)
        self.refused("stray belongs to root, not to uid 54321", runner=STRANGER)

    def test_the_service_must_own_the_state_dir(self):
        needs_root()
        os.chown(self.path, STRANGER, STRANGER)
        self.refused(f"the state dir {self.path} belongs to uid {STRANGER}, but this runs as root", runner=0)

    def test_a_link_inside(self):
        os.symlink("/etc/passwd", os.path.join(self.path, "hubs", "LAB"))
        self.refused("is a symbolic link")

    def test_a_parent_writable_by_everyone(self):
        os.chmod(self.base, 0o777)
        self.refused(f"{self.base}, a parent of the state dir {self.path}, is writable by every user")
        os.chmod(self.base, 0o1777)  # sticky, as /tmp: nobody can swap our dir
        StateDir(self.path).check()

    def test_a_parent_of_another_user(self):
        needs_root()
        os.chown(self.base, STRANGER, STRANGER)
        self.refused(f"{self.base}, a parent of the state dir {self.path}, belongs to uid {STRANGER}")

    def test_the_control_socket_is_left_to_its_owner(self):
        os.symlink("/nonexistent", os.path.join(self.path, "control.sock"))  # stale: control.listen clears it
        StateDir(self.path).check()


class Writing(SynchronousTestCase):
    def setUp(self):
        needs_root()
        self.path = tempfile.mkdtemp(prefix="op-files-")
        self.addCleanup(shutil.rmtree, self.path, True)

    def test_root_writes_as_the_state_dirs_owner(self):
        """The sevpn command run as root beside a hub running as a service user."""
        os.chown(self.path, STRANGER, STRANGER)
        HubState(self.path).add_user("DEFAULT", "alice", b"pw")
        for name in ("hubs", "hubs/DEFAULT", "hubs/DEFAULT/users.json"):
            st = os.stat(os.path.join(self.path, name))
            self.assertEqual((st.st_uid, st.st_gid), (STRANGER, STRANGER), name)
        users = os.stat(os.path.join(self.path, "hubs/DEFAULT/users.json"))
        self.assertEqual(stat.S_IMODE(users.st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.path, "hubs")).st_mode), 0o700)
        StateDir(self.path).check(STRANGER)

    def test_directories_are_0700_whatever_the_umask(self):
        old = os.umask(0o002)
        try:
            ensure_dir(os.path.join(self.path, "a", "b"))
            created = StateDir(os.path.join(self.path, "fresh")).create()
        finally:
            os.umask(old)
        for name in ("a", "a/b", "fresh"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.path, name)).st_mode), 0o700, name)
        created.check()


class Reading(SynchronousTestCase):
    def setUp(self):
        self.path = tempfile.mkdtemp(prefix="op-files-")
        self.addCleanup(shutil.rmtree, self.path, True)
        self.file = os.path.join(self.path, "users.json")

    def test_a_link_is_not_followed(self):
        target = os.path.join(self.path, "elsewhere.json")
        write_json(target, {"users": {}})
        os.symlink(target, self.file)
        with self.assertRaises(UnsafeState) as caught:
            read_private(self.file)
        self.assertIn("is a symbolic link", str(caught.exception))

    def test_a_file_of_another_user(self):
        needs_root()
        write_json(self.file, {"users": {}})
        os.chown(self.file, STRANGER, STRANGER)
        with self.assertRaises(UnsafeState) as caught:
            read_json(self.file, None, "users")
        self.assertIn(f"belongs to uid {STRANGER}", str(caught.exception))

    def test_a_file_writable_by_others(self):
        write_json(self.file, {"users": {}})
        os.chmod(self.file, 0o666)
        with self.assertRaises(UnsafeState) as caught:
            read_json(self.file, None, "users")
        self.assertIn("writable by other users (mode 0666), who could plant users", str(caught.exception))

    def test_a_fifo_does_not_block(self):
        os.mkfifo(self.file, 0o600)

        def stuck(signum, frame):
            raise AssertionError("reading a FIFO blocked")

        old = signal.signal(signal.SIGALRM, stuck)
        self.addCleanup(signal.signal, signal.SIGALRM, old)
        signal.alarm(5)
        self.addCleanup(signal.alarm, 0)
        with self.assertRaises(UnsafeState) as caught:
            read_private(self.file)
        self.assertIn("is not a regular file", str(caught.exception))

    def test_damaged_users_file_is_a_sentence(self):
        state = HubState(self.path)
        state.add_user("DEFAULT", "alice", b"pw")
        users = os.path.join(self.path, "hubs", "DEFAULT", "users.json")
        for content, why in [
            (b"{not json", "is damaged ("),
            (json.dumps({"users": []}).encode(), "it holds no 'users' object"),
            (json.dumps({"users": {"alice": {"password": 5}}}).encode(), "user alice: 'password' must be a password hash"),
            (json.dumps({"users": {"alice": {"password": "x", "policy": {"rate_in": "fast"}}}}).encode(),
             "rate_in must be a whole number"),
            (json.dumps({"users": {"alice": {"password": "x", "policy": 5}}}).encode(), "'policy' must be an object"),
            (json.dumps({"users": {"alice": {"password": "x", "disabled": "no"}}}).encode(),
             "'disabled' must be true or false"),
            (json.dumps({"users": {"a b": {"password": "x"}}}).encode(), "is not a valid user name"),
        ]:
            with open(users, "wb") as f:
                f.write(content)
            with self.assertRaises(StateError) as caught:
                HubState(self.path).users("DEFAULT")
            self.assertIn(f"the users file {users} ", str(caught.exception))
            self.assertIn(why, str(caught.exception))
