"""
The control socket: what a crash or a hostile user leaves at
STATE/control.sock never stops a hub or card from starting, and nothing
there is followed out of the state dir.
"""

import os
import shutil
import socket
import stat
import tempfile

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from sevpn import control


class StaleSockets(TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="op-control-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = control.socket_path(self.dir)

    def listen(self):
        """Start a control socket as a hub would; check that it answers."""
        port = control.listen(reactor, self.dir, {"status": lambda: {"state": "fine"}})
        self.addCleanup(port.stopListening)
        st = os.lstat(self.path)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        d = deferToThread(control.call, self.dir, "status")
        d.addCallback(self.assertEqual, {"state": "fine"})
        return d

    def test_a_socket_nobody_listens_on(self):
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(self.path)
        dead.close()  # what a killed hub leaves behind
        return self.listen()

    def test_a_dangling_link(self):
        os.symlink(os.path.join(self.dir, "gone"), self.path)
        return self.listen()

    def test_a_link_out_of_the_state_dir_is_removed_not_followed(self):
        """A link to a live socket elsewhere is not taken for a running hub, and its target is untouched."""
        other = tempfile.mkdtemp(prefix="op-control-other-")
        self.addCleanup(shutil.rmtree, other, True)
        target = os.path.join(other, "sock")
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(live.close)
        live.bind(target)
        live.listen(1)
        os.symlink(target, self.path)
        d = self.listen()
        d.addCallback(lambda _: self.assertTrue(stat.S_ISSOCK(os.lstat(target).st_mode)))
        return d

    def test_a_link_to_a_file_outside(self):
        other = tempfile.NamedTemporaryFile(prefix="op-control-", delete=False)
        other.write(b"keep me")
        other.close()
        self.addCleanup(os.unlink, other.name)
        os.symlink(other.name, self.path)
        d = self.listen()

        def check(_):
            with open(other.name, "rb") as f:
                self.assertEqual(f.read(), b"keep me")

        return d.addCallback(check)

    def test_a_regular_file(self):
        with open(self.path, "w") as f:
            f.write("junk")
        return self.listen()

    def test_a_directory_is_a_sentence(self):
        os.mkdir(self.path)
        with self.assertRaises(control.ControlError) as caught:
            control.listen(reactor, self.dir, {})
        self.assertIn(f"{self.path} is a directory, where the control socket goes", str(caught.exception))

    def test_a_running_hub_is_not_replaced(self):
        d = self.listen()

        def second(_):
            with self.assertRaises(control.ControlError) as caught:
                control.listen(reactor, self.dir, {})
            self.assertIn(f"another hub or card already runs with the state dir {self.dir}", str(caught.exception))

        return d.addCallback(second)

    def test_the_client_tells_a_missing_state_dir_from_a_stopped_hub(self):
        with self.assertRaises(control.ControlError) as caught:
            control.call(os.path.join(self.dir, "typo"), "status")
        self.assertIn("there is no state dir", str(caught.exception))
        with self.assertRaises(control.NotRunning) as caught:
            control.call(self.dir, "status")
        self.assertIn("nothing is running with the state dir", str(caught.exception))


class Requests(TestCase):
    """A request the command cannot take is answered as malformed, not logged as a failure."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="op-control-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        port = control.listen(reactor, self.dir, {"kick": lambda session: {"kicked": session}})
        self.addCleanup(port.stopListening)

    async def test_the_arguments_it_takes(self):
        answer = await deferToThread(control.call, self.dir, "kick", session="s1")
        self.assertEqual(answer, {"kicked": "s1"})

    async def test_arguments_it_does_not_take(self):
        for args in ({"nobody": "s1"}, {}, {"session": "s1", "more": 1}):
            with self.assertRaises(control.ControlError) as caught:
                await deferToThread(control.call, self.dir, "kick", **args)
            self.assertEqual(str(caught.exception), "unknown or malformed control request")
        self.assertEqual(self.flushLoggedErrors(), [])
