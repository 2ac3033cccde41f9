"""
One hub to the operator (L{sevpn.fanout}): the merges of each command's
answers, and the main process asking real workers' control sockets, one
of which is not there.
"""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sevpn import control
from sevpn.fanout import (
    FanOut, WorkerUnreachable, combine, merge_generic, merge_macs, merge_sessions, merge_status, socket_path,
)


def row(mac, port, age=1.0):
    return {"mac": mac, "port": port, "age": age}


class MergeTests(SynchronousTestCase):
    def test_sessions_say_their_worker(self):
        merged = merge_sessions([(0, [{"id": "a"}]), (1, [{"id": "b"}, {"id": "c"}])])
        self.assertEqual([(s["id"], s["worker"]) for s in merged], [("a", 0), ("b", 1), ("c", 1)])

    def test_macs_are_shown_where_they_live(self):
        counters = {"flooded": 2, "unicast": 5, "macs": 2}
        merged = merge_macs([
            (0, {"DEFAULT": {"macs": [row("02:00:00:00:00:01", "s-a"), row("02:00:00:00:00:02", "backplane:vs-DEFAULT-0"),
                                      row("02:00:00:00:00:09", "backplane:vs-DEFAULT-0")],
                             "conflicts": [], "counters": counters}}),
            (1, {"DEFAULT": {"macs": [row("02:00:00:00:00:02", "s-b"), row("02:00:00:00:00:01", "backplane:vs-DEFAULT-1"),
                                      row("02:00:00:00:00:09", "backplane:vs-DEFAULT-1")],
                             "conflicts": [{"mac": "02:00:00:00:00:05", "ports": ["s-c", "s-d"], "count": 1}],
                             "counters": counters}}),
        ])["DEFAULT"]
        self.assertEqual(
            [(r["mac"], r["port"], r["worker"]) for r in merged["macs"]],
            [("02:00:00:00:00:01", "s-a", 0), ("02:00:00:00:00:02", "s-b", 1),
             # on no worker's own port (a host someone put into the bridge): shown once, behind the backplane
             ("02:00:00:00:00:09", "backplane:vs-DEFAULT-0", 0)],
        )
        self.assertEqual(merged["counters"], {"flooded": 4, "unicast": 10, "macs": 4})
        self.assertEqual(merged["conflicts"][0]["worker"], 1)

    def test_status_sums_and_lists_the_workers(self):
        main = {"listen": ["tcp:5555"], "sessions": 2, "refusals": 1, "handshaking": 0, "turned_away": 3,
                "resume_window": 60.0, "worker": 0, "backplane": [{"port": "vs-DEFAULT-0"}]}
        other = dict(main, sessions=5, refusals=0, worker=1, backplane=[{"port": "vs-DEFAULT-1"}])
        workers = [{"worker": 0, "pid": 10, "state": "running"}, {"worker": 1, "pid": 11, "state": "running"},
                   {"worker": 2, "pid": 12, "state": "running"}]
        merged = merge_status([(0, main), (1, other)], workers)
        self.assertEqual((merged["sessions"], merged["refusals"], merged["turned_away"]), (7, 1, 6))
        self.assertEqual((merged["listen"], merged["resume_window"]), (["tcp:5555"], 60.0))
        self.assertNotIn("backplane", merged)
        self.assertEqual([(w["worker"], w["state"], w.get("sessions")) for w in merged["workers"]],
                         [(0, "running", 2), (1, "running", 5), (2, "not answering", None)])
        self.assertEqual(merged["workers"][1]["backplane"], [{"port": "vs-DEFAULT-1"}])

    def test_anything_else_joins_lists_and_sums_counts(self):
        merged = merge_generic([(0, {"ended": [{"id": "a"}], "errors": [], "n": 1, "name": "x"}),
                                (1, {"ended": [{"id": "b"}], "errors": ["e"], "n": 2, "name": "y"})])
        self.assertEqual(merged, {"ended": [{"id": "a"}, {"id": "b"}], "errors": ["e"], "n": 3, "name": "x"})
        self.assertEqual(merge_generic([(0, [{"a": 1}]), (1, [{"a": 2}])]), [{"a": 1, "worker": 0},
                                                                             {"a": 2, "worker": 1}])

    def test_the_one_worker_that_holds_a_session_answers_a_kick(self):
        refused = control.ControlError("there is no session s-b on this hub")
        result = combine("kick", [(0, False, refused), (1, True, {"id": "s-b"}), (2, False, refused)])
        self.assertEqual(result, {"id": "s-b"})

    def test_a_refusal_everywhere_is_the_answer(self):
        refused = control.ControlError("there is no session s-x on this hub")
        silent = WorkerUnreachable("worker 1 did not answer: gone")
        with self.assertRaises(control.ControlError) as caught:
            combine("kick", [(0, False, refused), (1, False, silent)])
        self.assertIs(caught.exception, refused)
        self.assertRaises(WorkerUnreachable, combine, "sessions", [(0, False, silent)])

    def test_a_silent_worker_costs_its_part_with_a_warning(self):
        silent = WorkerUnreachable("worker 2 did not answer within 5 s")
        result = combine("sessions", [(0, True, [{"id": "a"}]), (1, True, []), (2, False, silent)])
        self.assertIsInstance(result, control.Partial)
        self.assertEqual(result.result, [{"id": "a", "worker": 0}])
        self.assertEqual(result.warnings, ["worker 2 did not answer within 5 s"])


class FanOutTests(TestCase):
    """The main process asks real control sockets: worker 1 answers, worker 2 is not there."""

    def setUp(self):
        self.state = self.mktemp()
        os.makedirs(self.state)
        self.kicked = []

        def kick(session, reason=""):
            if session != "s-1":
                raise control.ControlError(f"there is no session {session} on this hub")
            self.kicked.append((1, reason))
            return {"id": session}

        worker1 = control.listen(reactor, self.state, {"sessions": lambda: [{"id": "s-1"}], "kick": kick},
                                 name=os.path.basename(socket_path(self.state, 1)))
        self.addCleanup(worker1.stopListening)
        # worker 3 is wedged: it takes the request and never answers
        wedged = control.listen(reactor, self.state, {"sessions": Deferred}, name="control-3.sock")
        self.addCleanup(wedged.stopListening)

        def local_kick(session, reason=""):
            raise control.ControlError(f"there is no session {session} on this hub")

        fanout = FanOut(reactor, self.state, 4, lambda: [], timeout=0.5)
        main = control.listen(reactor, self.state, fanout.wrap({
            "sessions": lambda: [{"id": "s-0"}], "kick": local_kick, "cascades": lambda: ["only here"],
        }, local_only=["cascades"]))
        self.addCleanup(main.stopListening)

    def call(self, command, **args):
        """The sevpn command's blocking client, in a thread: its result and what it printed on stderr."""

        def blocking():
            err = io.StringIO()
            with redirect_stderr(err):
                result = control.call(self.state, command, **args)
            return result, err.getvalue()

        return threads.deferToThread(blocking)

    async def test_sessions_of_every_worker_that_answers(self):
        result, err = await self.call("sessions")
        self.assertEqual(result, [{"id": "s-0", "worker": 0}, {"id": "s-1", "worker": 1}])
        self.assertIn("warning: worker 2 did not answer", err)
        self.assertIn("control-2.sock: No such file or directory", err)
        self.assertIn("warning: worker 3 did not answer on", err)
        self.assertIn("control-3.sock within 0.5 s", err)

    async def test_kick_reaches_the_worker_holding_the_session(self):
        result, err = await self.call("kick", session="s-1", reason="bye")
        self.assertEqual(result, {"id": "s-1"})
        self.assertEqual(self.kicked, [(1, "bye")])
        with self.assertRaises(control.ControlError) as caught:
            await self.call("kick", session="s-9")
        self.assertEqual(str(caught.exception), "there is no session s-9 on this hub")

    async def test_what_only_the_main_process_runs_is_not_asked(self):
        result, err = await self.call("cascades")
        self.assertEqual((result, err), (["only here"], ""))


class ReadingTests(SynchronousTestCase):
    """What --metrics serves with workers: the node, not worker 0."""

    def reading(self, worker, sessions, frames):
        return {
            "time": 100.0 + worker,
            "hub": {"sessions": len(sessions), "sessions_limit": 4096, "handshaking": 1, "turned_away": 0,
                    "refusals": {"bad-password": worker}, "resume_window": 60.0, "resume_memory": 10,
                    "resume_memory_limit": 100},
            "virtual_hubs": [{
                "name": "DEFAULT", "mac_table_limit": 4096,
                "switch": {"flooded": frames, "unicast": 1, "macs": 2},
                "macs": [row(f"02:00:00:00:00:0{worker}", sessions[0]),
                         row(f"02:00:00:00:00:0{1 - worker}", f"backplane:vs-DEFAULT-{worker}")],
                "conflicts": [],
                "sessions": [{"id": s, "user": f"u{worker}"} for s in sessions],
                "ports": [{"name": f"backplane:vs-DEFAULT-{worker}", "kind": "TapPort", "macs": 1}],
            }],
        }

    def test_every_workers_sessions_and_the_sums(self):
        merged = combine("reading", [(0, True, self.reading(0, ["s-a"], 5)), (1, True, self.reading(1, ["s-b"], 7))])
        self.assertEqual(merged["time"], 101.0)
        self.assertEqual(merged["hub"]["sessions"], 2)
        self.assertEqual(merged["hub"]["sessions_limit"], 8192)  # each worker has its own
        self.assertEqual(merged["hub"]["refusals"], {"bad-password": 1})
        self.assertEqual(merged["hub"]["resume_window"], 60.0)
        [vhub] = merged["virtual_hubs"]
        self.assertEqual(vhub["switch"], {"flooded": 12, "unicast": 2, "macs": 4})
        self.assertEqual([(s["id"], s["worker"]) for s in vhub["sessions"]], [("s-a", 0), ("s-b", 1)])
        self.assertEqual([p["name"] for p in vhub["ports"]], ["backplane:vs-DEFAULT-0", "backplane:vs-DEFAULT-1"])
        self.assertEqual([(m["mac"], m["port"]) for m in vhub["macs"]],
                         [("02:00:00:00:00:00", "s-a"), ("02:00:00:00:00:01", "s-b")])
