"""
The process model of C{--workers} (L{sevpn.workers}, L{sevpn.worker}):
the log stream and its tags, a worker's life as the main process sees it
(restarts with backoff, stopping, killing the one that does not stop) on
a fake reactor with real pipes, and the worker's lifeline.  The whole
thing runs for real in tests.test_system_workers.
"""

from __future__ import annotations

import errno
import io
import json
import os

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, capturedLogs, eventAsJSON, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted.internet.defer import succeed

from sevpn import control, workers
from sevpn.worker import Lifeline, LogPipe, parse_arguments
from sevpn.workers import (
    LOG_FD, MAX_LOG_LINE, RESTART_DELAYS, STOP_TIMEOUT, LogStream, WorkerProcess, system_of, tag_own_lines,
    worker_environment,
)
from tests.support import FakeTap, Lab, mac


def event_line(text: str, namespace: str = "sevpn.hub.Hub", **fields) -> bytes:
    events = []
    Logger(namespace=namespace, observer=events.append).info(text, **fields)
    return eventAsJSON(events[0]).encode() + b"\n"


class TagTests(SynchronousTestCase):
    def test_a_workers_line_says_which(self):
        self.assertEqual(system_of({"log_namespace": "sevpn.hub.Hub", "log_level": LogLevel.info}, 2),
                         "worker 2 sevpn.hub.Hub#info")
        self.assertEqual(system_of({"log_system": "-"}, 1), "worker 1")
        self.assertEqual(system_of({"log_system": "HubLink,5,10.0.0.2"}, 1), "worker 1 HubLink,5,10.0.0.2")

    def test_the_main_process_tags_its_own_lines(self):
        seen = []
        observers = [seen.append]
        stop = tag_own_lines(observers)
        for event in ({"log_namespace": "sevpn.hub.Hub", "log_level": LogLevel.info},
                      {"log_system": "worker 1 x#info"}):  # a relayed line keeps its worker
            for observer in list(observers):
                observer(event)
        self.assertEqual([e["log_system"] for e in seen], ["worker 0 sevpn.hub.Hub#info", "worker 1 x#info"])
        stop()
        self.assertEqual(observers, [seen.append])

    def test_without_twisteds_observer_list_lines_stay_as_they_are(self):
        self.assertIsNone(tag_own_lines(None))

    def test_the_fence_found_twisteds_observer_list(self):
        # the private attribute tag_own_lines leans on (see its docstring); if a
        # Twisted upgrade removes it, this says so and the main process's
        # lines go untagged
        self.assertIsInstance(workers._OBSERVERS, list)


class LogStreamTests(SynchronousTestCase):
    def setUp(self):
        self.read_end, self.write_end = os.pipe()
        self.addCleanup(self.close_write)
        self.published = []
        self.messages = []
        self.stream = LogStream(self.read_end, 2, self.messages.append, publish=self.published.append)
        self.addCleanup(self.stream.close)

    def close_write(self):
        if self.write_end is not None:
            os.close(self.write_end)
            self.write_end = None

    def test_events_are_published_with_their_worker(self):
        line = event_line("u{n} joined", n=7)
        os.write(self.write_end, line[:20])
        self.assertTrue(self.stream.read())
        self.assertEqual(self.published, [])  # half a line waits for its end
        os.write(self.write_end, line[20:] + b'{"sevpn_worker": "ready", "pid": 42}\n')
        self.assertTrue(self.stream.read())
        [event] = self.published
        self.assertEqual(formatEvent(event), "u7 joined")
        self.assertEqual(event["log_system"], "worker 2 sevpn.hub.Hub#info")
        self.assertEqual(self.messages, [{"sevpn_worker": "ready", "pid": 42}])

    def test_garbage_and_overlong_lines_are_counted_not_published(self):
        self.stream.feed(b"not json\n[1, 2]\n")
        self.stream.feed(b"x" * (MAX_LOG_LINE + 10))
        self.assertLessEqual(len(self.stream.buffer), MAX_LOG_LINE)  # bounded, whatever comes
        self.stream.feed(b"x" * 10 + b"\n")
        self.assertEqual(self.published, [])
        self.assertEqual(self.stream.bad_lines, 3)  # two bad lines and the overlong one
        self.stream.feed(event_line("after it"))
        self.assertEqual([formatEvent(e) for e in self.published], ["after it"])

    def test_the_end_of_the_stream(self):
        self.close_write()
        self.assertFalse(self.stream.read())
        self.assertEqual(self.stream.doRead(), CONNECTION_DONE)


class FakeProcess:
    def __init__(self, pid):
        self.pid = pid
        self.signals = []

    def signalProcess(self, name):
        self.signals.append(name)


class FakeReactor(Clock):
    """Spawns nothing: keeps the child's ends of its lifeline and log stream, as a worker would have them."""

    def __init__(self):
        super().__init__()
        self.spawned = []
        self.readers = set()

    def spawnProcess(self, protocol, executable, argv, env, childFDs):
        child = {fd: os.dup(childFDs[fd]) for fd in (0, LOG_FD)}
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((argv, env, child, process))
        return process

    def addReader(self, reader):
        self.readers.add(reader)

    def removeReader(self, reader):
        self.readers.discard(reader)


class FakeRole:
    def __init__(self):
        self.reactor = FakeReactor()
        self.groups = [[None, _Fd(7)]]
        self.python = "/usr/bin/python3"
        self.argv = ["--state-dir", "/var/lib/sevpn/hub", "--workers", "2"]
        self.stopping = False


class _Fd:
    def __init__(self, fd):
        self.fd = fd

    def fileno(self):
        return self.fd


class WorkerLifeTests(SynchronousTestCase):
    def setUp(self):
        self.role = FakeRole()
        self.worker = WorkerProcess(self.role, 1)
        self.addCleanup(self.close_all)

    def close_all(self):
        for _, _, child, _ in self.role.reactor.spawned:
            for fd in child.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self.worker.stream is not None:
            self.worker.stream.close()
        if self.worker.lifeline is not None:
            os.close(self.worker.lifeline)

    def child(self, n=-1):
        return self.role.reactor.spawned[n][2]

    def end(self, exit_code=None, signal=None):
        reason = ProcessTerminated(exit_code, signal) if exit_code or signal else ProcessDone(0)
        self.worker.processEnded(Failure(reason))

    def test_what_a_worker_is_given(self):
        self.worker.spawn()
        argv, env, child, process = self.role.reactor.spawned[0]
        self.assertEqual(argv, ["/usr/bin/python3", "-m", "sevpn.worker", "--worker", "1", "--sockets", "4", "--",
                                "--state-dir", "/var/lib/sevpn/hub", "--workers", "2"])
        self.assertEqual(self.worker.pid, 1000)
        # it says it is ready on its log stream
        os.write(child[LOG_FD], b'{"sevpn_worker": "ready"}\n')
        self.worker.stream.read()
        self.assertTrue(self.worker.ready)
        self.assertEqual(self.worker.describe()["state"], "running")

    def test_systemd_talks_to_the_main_process_only(self):
        env = worker_environment({"PATH": "/bin", "NOTIFY_SOCKET": "/run/systemd/notify", "LISTEN_FDS": "1"})
        self.assertEqual(env, {"PATH": "/bin"})

    def test_a_worker_that_dies_is_restarted_later_and_later(self):
        self.worker.spawn()
        self.worker.watch()
        for n, delay in enumerate(RESTART_DELAYS[:3], 1):
            self.end(signal=9)
            self.assertEqual(self.worker.describe()["state"], "restarting")
            self.role.reactor.advance(delay - 0.1)
            self.assertEqual(len(self.role.reactor.spawned), n)
            self.role.reactor.advance(0.1)
            self.assertEqual(len(self.role.reactor.spawned), n + 1)
            self.assertEqual(self.worker.restarts, n)
        self.assertIn(self.worker.stream, self.role.reactor.readers)

    def test_a_worker_that_cannot_be_started_again_is_tried_again(self):
        self.worker.spawn()
        self.worker.watch()
        real = self.role.reactor.spawnProcess
        self.role.reactor.spawnProcess = lambda *a, **kw: (_ for _ in ()).throw(OSError(errno.EAGAIN, "no processes"))
        fds = len(os.listdir("/proc/self/fd"))
        with capturedLogs() as events:
            self.end(signal=9)
            self.role.reactor.advance(RESTART_DELAYS[0])
        self.assertIn("cannot restart worker 1: no processes; trying again in 2 s", [formatEvent(e) for e in events])
        # the old lifeline and log stream closed; of the failed attempt no pipe left open
        self.assertEqual(len(os.listdir("/proc/self/fd")), fds - 2)
        self.assertEqual(self.worker.describe()["state"], "restarting")
        self.role.reactor.spawnProcess = real
        self.role.reactor.advance(RESTART_DELAYS[1])
        self.assertEqual(self.worker.describe()["state"], "starting")
        self.assertEqual(len(self.role.reactor.spawned), 2)

    def test_a_worker_stopped_by_the_main_process_is_not_restarted(self):
        self.worker.spawn()
        ended = self.worker.stop()
        self.role.stopping = True
        # it was asked on its lifeline, which then closed
        self.assertEqual(os.read(self.child()[0], 100), b"stop\n")
        self.assertEqual(os.read(self.child()[0], 100), b"")
        self.end()
        self.assertIsNone(self.successResultOf(ended))
        self.role.reactor.advance(60)
        self.assertEqual(len(self.role.reactor.spawned), 1)
        self.assertEqual(self.worker.describe()["state"], "stopped")

    def test_a_worker_that_does_not_stop_is_killed(self):
        self.worker.spawn()
        self.role.stopping = True
        ended = self.worker.stop()
        process = self.role.reactor.spawned[0][3]
        self.role.reactor.advance(STOP_TIMEOUT - 1)
        self.assertEqual(process.signals, [])
        self.role.reactor.advance(1)
        self.assertEqual(process.signals, ["KILL"])
        self.assertNoResult(ended)
        self.end(signal=9)
        self.assertIsNone(self.successResultOf(ended))


class WorkerProcessSideTests(SynchronousTestCase):
    def test_arguments(self):
        self.assertEqual(parse_arguments(["--worker", "3", "--sockets", "4,5", "--", "--state-dir", "x"]),
                         (3, [4, 5], ["--state-dir", "x"]))
        for bad in ([], ["--worker", "x", "--"], ["--sockets", "4", "--"]):
            self.assertRaises(SystemExit, parse_arguments, bad)

    def test_the_log_pipe_and_its_fallback(self):
        read_end, write_end = os.pipe()
        stderr = io.StringIO()
        pipe = LogPipe(4, write_end, fallback=stderr)
        log = Logger(namespace="sevpn.hub.Hub", observer=pipe)
        log.info("u{n} joined", n=1)
        pipe.message("ready", pid=9)
        lines = os.read(read_end, 65536).splitlines()
        self.assertEqual(json.loads(lines[0])["log_format"], "u{n} joined")
        self.assertEqual(json.loads(lines[1]), {"pid": 9, "sevpn_worker": "ready"})
        os.close(read_end)  # the main process is gone
        log.warn("the main process is gone: stopping")
        os.close(write_end)
        self.assertTrue(pipe.broken)
        self.assertIn("[worker 4 sevpn.hub.Hub#warn] the main process is gone: stopping", stderr.getvalue())


class FakeWorkerReactor:
    def __init__(self, running=True):
        self.running = running
        self.stopped = 0
        self.readers = []
        self.when_running = []

    def addReader(self, reader):
        self.readers.append(reader)

    def stop(self):
        self.stopped += 1

    def callWhenRunning(self, f):
        self.when_running.append(f)


class LifelineTests(SynchronousTestCase):
    def lifeline(self, running=True):
        read_end, write_end = os.pipe()
        reactor = FakeWorkerReactor(running)
        lifeline = Lifeline(reactor, read_end)
        self.assertEqual(reactor.readers, [lifeline])
        return lifeline, reactor, write_end

    def run_out(self, lifeline, write_end, data=b""):
        if data:
            os.write(write_end, data)
        self.assertIsNone(lifeline.doRead())
        os.close(write_end)
        self.assertEqual(lifeline.doRead(), CONNECTION_DONE)
        with capturedLogs() as events:
            lifeline.connectionLost(None)
        return [(e["log_level"], formatEvent(e)) for e in events]

    def test_asked_to_stop(self):
        lifeline, reactor, write_end = self.lifeline()
        said = self.run_out(lifeline, write_end, b"stop\n")
        self.assertEqual(said, [(LogLevel.info, "stopping: the main process asked")])
        self.assertEqual(reactor.stopped, 1)

    def test_the_main_process_died(self):
        lifeline, reactor, write_end = self.lifeline(running=False)
        self.assertIsNone(lifeline.doRead())
        said = self.run_out(lifeline, write_end)
        self.assertEqual(said, [(LogLevel.warn, "the main process is gone: stopping")])
        self.assertEqual(reactor.when_running, [reactor.stop])  # before the reactor runs: at once when it does

    def test_a_hang_up_alone_stops_it_too(self):
        # epoll may report the hang-up without a read: connectionLost alone must stop
        lifeline, reactor, write_end = self.lifeline()
        os.close(write_end)
        lifeline.connectionLost(None)
        self.assertEqual(reactor.stopped, 1)


class FakeBackplane:
    def __init__(self, vhub):
        self.tap = FakeTap(Clock())
        vhub.add_port(self.tap)

    def port(self, hub):
        return self.tap

    def owns(self, port):
        return port is self.tap


class CardMovedTests(SynchronousTestCase):
    """A card that logs in afresh on one worker ends its sessions on the others, and takes its MAC along."""

    def setUp(self):
        from sevpn.workers import WorkerRole

        self.lab = Lab(self)
        self.role = WorkerRole(1, 3, [4])
        self.role.hub = self.lab.hub
        self.vhub = self.lab.hub.vhub("DEFAULT")
        self.role.backplane = FakeBackplane(self.vhub)
        self.asked = []
        self.answers = {}
        self.role.ask = lambda reactor, state_dir, k, command, args: (
            self.asked.append((k, command, args)) or succeed(self.answers.get(k, {"ended": 0, "live": False})))

    def test_its_sessions_here_end(self):
        self.lab.card(1)
        self.lab.card(2)
        [old] = [s.id for s in self.lab.hub.sessions.values() if s.user == "u1"]
        with capturedLogs() as events:
            self.assertEqual(self.role.card_moved("u1", "DEFAULT", "02:00:00:00:00:01"), {"ended": 1, "live": False})
            self.lab.network.pump()
        self.assertNotIn(old, self.lab.hub.sessions)  # (the card, told, comes back in a fresh one)
        said = [formatEvent(e) for e in events]
        self.assertTrue(any("ended: its card logged in again on another worker of this hub" in t for t in said), said)
        # the card was told why, on its link
        self.assertTrue(any("closed the session (its card logged in again on another worker" in t for t in said), said)

    def test_someone_elses_live_mac_is_said(self):
        self.lab.card(2)
        # u1's card moved, but MAC 2 is u2's live card here: nothing ends, and it is not to be taken
        self.assertEqual(self.role.card_moved("u1", "DEFAULT", "02:00:00:00:00:02"), {"ended": 0, "live": True})
        self.assertEqual(len(self.lab.hub.sessions), 1)
        self.assertRaises(control.ControlError, self.role.card_moved, "u1", "DEFAULT", "not a mac")

    def test_a_fresh_login_asks_every_other_worker_and_takes_its_mac(self):
        self.vhub.claim(mac(1), self.role.backplane.tap)  # the card's frames came through the bridge before
        self.lab.hub.joined.append(self.role.joined)
        self.answers[2] = {"ended": 1, "live": False}
        self.lab.card(1)
        self.assertEqual(sorted(k for k, _, _ in self.asked), [0, 2])
        self.assertEqual({c for _, c, _ in self.asked}, {"card-moved"})
        self.assertEqual(self.asked[0][2], {"user": "u1", "hub": "DEFAULT", "mac": "02:00:00:00:00:01"})
        [session] = self.lab.hub.sessions.values()
        self.assertIs(self.vhub.lookup(mac(1)), session.port)

    def test_a_mac_live_elsewhere_stays_there(self):
        self.vhub.claim(mac(1), self.role.backplane.tap)
        self.lab.hub.joined.append(self.role.joined)
        self.answers[0] = {"ended": 0, "live": True}
        self.lab.card(1)
        self.assertIs(self.vhub.lookup(mac(1)), self.role.backplane.tap)

    def test_one_worker_asks_nobody(self):
        from sevpn.workers import WorkerRole

        role = WorkerRole(0, 1, [])
        role.ask = self.role.ask
        self.lab.hub.joined.append(role.joined)
        self.lab.card(1)
        self.assertEqual(self.asked, [])


class OptionsTests(SynchronousTestCase):
    """C{--workers} on the command line."""

    def options(self, *argv):
        from sevpn.hubtap import Options

        config = Options()
        config.parseOptions(list(argv))
        return config

    def test_one_process_by_default(self):
        from sevpn.hubtap import makeService

        service = makeService(self.options("--state-dir", "/tmp/x"))
        self.assertIsNone(service.role)
        self.assertEqual(service.limits["resume_memory"], 256 << 20)

    def test_workers_share_the_nodes_resume_memory(self):
        from sevpn.hubtap import makeService
        from sevpn.workers import MainRole

        argv = ["--state-dir", "/tmp/x", "--workers", "4", "--resume-memory", "400"]
        service = makeService(self.options(*argv))
        self.assertIsInstance(service.role, MainRole)
        self.assertEqual(service.role.count, 4)
        self.assertEqual(service.role.argv, argv)  # what the workers parse alike
        self.assertEqual(service.limits["resume_memory"], 100 << 20)

    def test_bad_counts_and_endpoints_are_sentences(self):
        from twisted.python.usage import UsageError

        for argv, words in [
            (["--workers", "0"], "--workers must be a whole number from 1 to 1024, not '0'"),
            (["--workers", "many"], "--workers must be a whole number from 1 to 1024, not 'many'"),
            (["--workers", "2", "--listen", "unix:/run/hub.sock"], "with --workers the hub listens on tcp: or tcp6:"),
        ]:
            with self.assertRaises(UsageError) as caught:
                self.options(*argv)
            self.assertIn(words, str(caught.exception))
