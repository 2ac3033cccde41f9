"""
The installed commands sevpn-hub and sevpn-nic (twistd in-process): their
help, their usage errors, and a real hub run in the foreground the way
systemd runs it, telling a notify socket the test binds when it is ready.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from scripts.netns import BIN, env, sevpn, wait_for


def command(name: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, name), *args], capture_output=True, text=True, env=env(),
                          timeout=60, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Help(SynchronousTestCase):
    def test_hub_help(self):
        r = command("sevpn-hub", "--help")
        self.assertEqual((r.returncode, r.stderr), (0, ""))
        self.assertTrue(r.stdout.startswith("Usage: sevpn-hub [options]\n"), r.stdout[:200])
        for option in ("--state-dir=", "--listen=", "--hostname=", "--resume-window=", "--mac-age="):
            self.assertIn(option, r.stdout)
        self.assertIn("Run a sevpn virtual HUB", r.stdout)

    def test_nic_help(self):
        r = command("sevpn-nic", "--help")
        self.assertEqual((r.returncode, r.stderr), (0, ""))
        self.assertTrue(r.stdout.startswith("Usage: sevpn-nic [options]\n"), r.stdout[:200])
        for option in ("--state-dir=", "--tap=", "--account=", "--ca-file=", "--no-offload"):
            self.assertIn(option, r.stdout)

    def test_unknown_option_is_a_sentence(self):
        for name in ("sevpn-hub", "sevpn-nic"):
            r = command(name, "--no-such-option")
            self.assertEqual(r.returncode, 1)
            self.assertEqual(r.stderr, f"{name}: option --no-such-option not recognized (see {name} --help)\n")
            self.assertEqual(r.stdout, "")

    def test_bad_value_is_a_sentence(self):
        r = command("sevpn-nic", "--mac", "01:00:5e:00:00:01")
        self.assertEqual(r.returncode, 1)
        self.assertIn("sevpn-nic: 01:00:5e:00:00:01 is a multicast", r.stderr)
        self.assertNotIn("Traceback", r.stderr)
        r = command("sevpn-hub", "--mac-age", "soon")
        self.assertEqual(r.returncode, 1)
        self.assertIn("sevpn-hub: Parameter type enforcement failed", r.stderr)
        self.assertNotIn("Traceback", r.stderr)


class NotifyListener:
    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages = []

    def poll(self):
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def assignments(self) -> dict:
        found = {}
        for message in self.poll():
            for line in message.split("\n"):
                key, _, value = line.partition("=")
                found.setdefault(key, value)
        return found


class Foreground(SynchronousTestCase):
    """The hub as systemd runs it: ExecStart=sevpn-hub ..., Type=notify."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="dp-launch-")
        self.addCleanup(shutil.rmtree, self.dir)
        self.state = os.path.join(self.dir, "hub")
        self.notify = NotifyListener(self.dir)
        self.addCleanup(self.notify.sock.close)
        self.port = free_port()
        self.log = open(os.path.join(self.dir, "hub.log"), "w+")
        self.addCleanup(self.log.close)
        e = env()
        e["NOTIFY_SOCKET"] = self.notify.path
        self.hub = subprocess.Popen(
            [os.path.join(BIN, "sevpn-hub"), "--state-dir", self.state, "--listen",
             f"tcp:{self.port}:interface=127.0.0.1"],
            cwd=self.dir, env=e, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.addCleanup(self.stop)

    def stop(self):
        if self.hub.poll() is None:
            self.hub.kill()
            self.hub.wait(10)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def running(self) -> bool:
        if self.hub.poll() is not None:
            raise AssertionError(f"sevpn-hub exited with {self.hub.returncode}:\n{self.output()}")
        return os.path.exists(os.path.join(self.state, "control.sock"))

    def test_runs_in_the_foreground_without_a_pid_file(self):
        wait_for(self.running, 60, "the hub's control socket")
        status = sevpn("hub", "status", "--json", "--state-dir", self.state)
        self.assertIn(f"tcp:{self.port}:interface=127.0.0.1", status.stdout)
        with socket.create_connection(("127.0.0.1", self.port), timeout=10):
            pass
        self.hub.send_signal(signal.SIGTERM)
        # twistd ends by the signal it was stopped with, which systemd
        # counts as a clean stop (like an exit status of 0).
        self.assertEqual(self.hub.wait(30), -signal.SIGTERM, self.output())
        self.assertEqual(os.listdir(self.dir).count("twistd.pid"), 0)
        self.assertIn("hub stopped", self.output())

    def test_tells_systemd_when_it_listens(self):
        """
        READY=1 arrives once the port takes connections, so that units
        ordered After=sevpn-hub.service find a hub that answers.
        """
        def ready():
            self.running()  # raises if the hub exited
            return "READY" in self.notify.assignments()

        wait_for(ready, 20, "READY=1")
        with socket.create_connection(("127.0.0.1", self.port), timeout=10):
            pass
        found = self.notify.assignments()
        self.assertEqual(found["READY"], "1")
        self.assertIn(f"tcp:{self.port}", found.get("STATUS", ""))
        self.hub.send_signal(signal.SIGTERM)
        self.assertEqual(self.hub.wait(30), -signal.SIGTERM, self.output())
        self.assertEqual(self.notify.assignments().get("STOPPING"), "1")



class CardForeground(SynchronousTestCase):
    """
    The card as sevpn-nic@.service runs it, with a hub it cannot reach: it
    is ready once its TAP exists, not once connected, so a card whose hub
    is down at boot does not fail its unit.  It runs in a network namespace
    of its own (unshare -n) which goes away with it, TAP and all.
    """

    def setUp(self):
        if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("unshare") is None:
            raise SkipTest("needs root, /dev/net/tun and unshare (util-linux) to make a TAP in a private namespace")
        self.dir = tempfile.mkdtemp(prefix="dp-launch-")
        self.addCleanup(shutil.rmtree, self.dir)
        self.notify = NotifyListener(self.dir)
        self.addCleanup(self.notify.sock.close)

    def test_ready_once_the_tap_exists(self):
        from sevpn.pki import ensure_pki

        ca = os.path.join(self.dir, "ca.pem")
        password = os.path.join(self.dir, "pw")
        with open(password, "w") as f:
            f.write("pw\n")
        ensure_pki(os.path.join(self.dir, "hub"))
        shutil.copy(os.path.join(self.dir, "hub", "ca.pem"), ca)
        e = env()
        e["NOTIFY_SOCKET"] = self.notify.path
        log = open(os.path.join(self.dir, "card.log"), "w+")
        self.addCleanup(log.close)
        card = subprocess.Popen(
            ["unshare", "--net", os.path.join(BIN, "sevpn-nic"), "--state-dir", os.path.join(self.dir, "nic"),
             "--tap", "sevpn0", "--hub", "127.0.0.1:9", "--user", "alice", "--password-file", password,
             "--ca-file", ca],
            cwd=self.dir, env=e, stdout=log, stderr=subprocess.STDOUT,
        )

        def stop():
            if card.poll() is None:
                card.kill()
                card.wait(10)

        self.addCleanup(stop)

        def ready():
            if card.poll() is not None:
                log.seek(0)
                raise AssertionError(f"sevpn-nic exited with {card.returncode}:\n{log.read()}")
            return "READY" in self.notify.assignments()

        wait_for(ready, 20, "READY=1")
        found = self.notify.assignments()
        self.assertEqual(found["READY"], "1")
        self.assertIn("sevpn0", found.get("STATUS", ""))
        self.assertIn("127.0.0.1:9", found.get("STATUS", ""))

