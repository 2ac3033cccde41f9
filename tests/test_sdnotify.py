"""
sevpn.sdnotify against real AF_UNIX datagram sockets bound by the test,
at a path and at an abstract name, as systemd binds $NOTIFY_SOCKET.
"""

import os
import shutil
import signal
import socket
import tempfile

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from sevpn import sdnotify


class Listener:
    """What systemd does for a Type=notify unit: a datagram socket to read."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5)

    def receive(self) -> bytes:
        return self.sock.recv(65536)

    def nothing_waiting(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(65536)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5)
        return False

    def close(self):
        self.sock.close()


class Notify(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="dp-sdnotify-")
        self.addCleanup(shutil.rmtree, self.dir)
        self.events = []
        self.notifier = sdnotify.Notifier()
        self.notifier.log = Logger(observer=self.events.append)

    def listen_at_path(self):
        path = os.path.join(self.dir, "notify")
        listener = Listener(path)
        self.addCleanup(listener.close)
        return listener, path

    def test_path_socket_gets_one_datagram(self):
        listener, path = self.listen_at_path()
        sent = sdnotify.notify("READY=1", "STATUS=listening on tcp:5555", environ={"NOTIFY_SOCKET": path})
        self.assertTrue(sent)
        self.assertEqual(listener.receive(), b"READY=1\nSTATUS=listening on tcp:5555")
        self.assertTrue(listener.nothing_waiting())

    def test_abstract_socket(self):
        name = f"dp-sdnotify-{os.getpid()}-{id(self)}"
        listener = Listener("\0" + name)
        self.addCleanup(listener.close)
        self.assertTrue(sdnotify.notify("STATUS=connecting to hub vpn:5555", environ={"NOTIFY_SOCKET": "@" + name}))
        self.assertEqual(listener.receive(), b"STATUS=connecting to hub vpn:5555")

    def test_not_run_by_systemd(self):
        self.assertFalse(self.notifier.notify("READY=1", environ={}))
        self.assertFalse(self.notifier.notify("READY=1", environ={"NOTIFY_SOCKET": ""}))
        self.assertEqual(self.events, [])

    def test_a_value_cannot_add_an_assignment(self):
        """A host name or error text with a line break stays one STATUS value."""
        listener, path = self.listen_at_path()
        self.notifier.notify("STATUS=cannot reach evil\nREADY=1\r\nMAINPID=1", environ={"NOTIFY_SOCKET": path})
        self.assertEqual(listener.receive(), b"STATUS=cannot reach evil READY=1 MAINPID=1")

    def test_long_values_are_cut(self):
        listener, path = self.listen_at_path()
        self.assertTrue(self.notifier.notify("STATUS=" + "x" * 10000, environ={"NOTIFY_SOCKET": path}))
        self.assertEqual(listener.receive(), b"STATUS=" + b"x" * sdnotify.MAX_VALUE)

    def test_errors_are_logged_once_and_never_raised(self):
        missing = os.path.join(self.dir, "nobody-listens")
        for _ in range(3):
            self.assertFalse(self.notifier.notify("READY=1", environ={"NOTIFY_SOCKET": missing}))
        self.assertFalse(self.notifier.notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:9999"}))
        self.assertEqual(len(self.events), 1)
        self.assertEqual(self.events[0]["log_level"].name, "warn")
        self.assertIn("nobody-listens", self.events[0]["socket"])
        self.assertIn("No such file", self.events[0]["why"])

    def test_unknown_address_kind(self):
        self.assertFalse(self.notifier.notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:9999"}))
        self.assertIn("neither a path nor an abstract", self.events[0]["why"])

    def test_not_an_assignment(self):
        listener, path = self.listen_at_path()
        for bad in ("READY", "=1", "ready=1", "STATUS ok=1"):
            self.assertFalse(self.notifier.notify(bad, environ={"NOTIFY_SOCKET": path}))
        self.assertTrue(listener.nothing_waiting())
        self.assertIn("not a KEY=VALUE assignment", self.events[0]["why"])

    def test_a_stuck_manager_does_not_block_the_caller(self):
        """
        The reactor thread sends these: when the reader's queue is full the
        notification is dropped (False), the caller does not wait.
        """
        listener, path = self.listen_at_path()
        listener.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)

        def stuck(signum, frame):
            raise AssertionError("notify() blocked on a full socket")

        previous = signal.signal(signal.SIGALRM, stuck)
        self.addCleanup(signal.signal, signal.SIGALRM, previous)
        signal.setitimer(signal.ITIMER_REAL, 10)
        self.addCleanup(signal.setitimer, signal.ITIMER_REAL, 0)
        results = [self.notifier.notify("STATUS=" + "y" * 300, environ={"NOTIFY_SOCKET": path}) for _ in range(1000)]
        signal.setitimer(signal.ITIMER_REAL, 0)
        self.assertTrue(results[0])
        self.assertFalse(results[-1])
        self.assertEqual(len(self.events), 1)
