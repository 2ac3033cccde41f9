"""
One hub to the operator: the main process answers C{control.sock} for
all workers (C{--workers N}).

Each worker I{k} > 0 listens on its own control socket,
C{STATE/control-K.sock} (0600).  A command that reaches the main process
is run there and asked of every other worker at once (L{ask}); the
answers are merged (L{merge}):

 - C{sessions}: every worker's rows, each with its C{worker};
 - C{macs}: per virtual hub every worker's table, each row with its
   C{worker}; a MAC a worker knows only behind its backplane port (the
   bridge to the other workers) is shown once, where it really is, and
   only shown on the backplane when no worker has it on one of its own
   ports (a host behind a port someone added to the bridge); switch
   counters summed;
 - C{status}: the main process's, with the counts summed over workers
   and a C{workers} list (each worker's pid, state and figures);
 - C{reading} (what C{--metrics} serves, L{sevpn.metrics.read_hub}): the
   hub's figures and switch counters summed, every worker's sessions and
   ports;
 - anything else: lists joined, numbers summed, dictionaries merged key by
   key, other values the main process's.

A worker that does not answer (restarting, wedged) costs its part of the
answer, not the answer: the others' is returned with a warning naming
it (L{control.Partial}).  A worker's refusal (C{ok: false}) is a refusal
only if no worker succeeded: C{kick} of a session finds the one worker
that holds it, and the others' "no such session" are not errors.

The merges are pure functions of the answers; L{ask} is the only I/O.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, DeferredList, TimeoutError, maybeDeferred
from twisted.internet.protocol import ClientFactory
from twisted.protocols.basic import LineOnlyReceiver

from sevpn import control

#: Seconds a worker has to answer.
TIMEOUT = 5.0
#: The longest answer read from a worker (4096 sessions' rows are ~2 MiB).
MAX_ANSWER = 64 << 20
#: Port names of the worker TAPs (see L{sevpn.backplane}).
BACKPLANE_PREFIX = "backplane:"
#: Counts in C{status} that are summed over the workers.
STATUS_SUMS = ("sessions", "refusals", "handshaking", "turned_away")

Answers = List[Tuple[int, object]]


def socket_path(state_dir: str, worker: int) -> str:
    """Worker C{worker}'s control socket (worker 0, the main process, has L{control.socket_path})."""
    return control.socket_path(state_dir, control.SOCKET_NAME if worker == 0 else f"control-{worker}.sock")


class WorkerUnreachable(Exception):
    """A worker did not answer; the message says which and why."""


# asking a worker ------------------------------------------------------------------


class _Asking(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_ANSWER

    def connectionMade(self) -> None:
        self.sendLine(json.dumps({"command": self.factory.command, "args": self.factory.args}).encode("utf-8"))

    def lineReceived(self, line: bytes) -> None:
        self.factory.answered(line)
        self.transport.loseConnection()

    def lineLengthExceeded(self, line) -> None:
        self.factory.failed(f"its answer is longer than {MAX_ANSWER >> 20} MiB")
        self.transport.abortConnection()


class _AskFactory(ClientFactory):
    noisy = False
    protocol = _Asking

    def __init__(self, worker: int, command: str, args: dict, path: str = "") -> None:
        self.worker = worker
        self.path = path
        self.command = command
        self.args = args
        self.deferred: Deferred = Deferred()

    def answered(self, line: bytes) -> None:
        if self.deferred.called:
            return
        try:
            answer = json.loads(line.decode("utf-8"))
        except ValueError:
            self.failed("its answer was not understood")
            return
        if answer.get("ok"):
            self.deferred.callback(answer.get("result"))
        else:
            self.deferred.errback(control.ControlError(answer.get("error") or "the request failed"))

    def failed(self, why: str) -> None:
        if not self.deferred.called:
            self.deferred.errback(WorkerUnreachable(f"worker {self.worker} did not answer on {self.path}: {why}"))

    def clientConnectionFailed(self, connector, reason) -> None:
        code = getattr(reason.value, "osError", None)
        self.failed(os.strerror(code) if isinstance(code, int) else reason.getErrorMessage())

    def clientConnectionLost(self, connector, reason) -> None:
        self.failed("it closed the connection")


def ask(reactor, state_dir: str, worker: int, command: str, args: dict, timeout: float = TIMEOUT) -> Deferred:
    """
    Ask worker C{worker} for C{command}: a Deferred with its result, failing
    with L{control.ControlError} (it refused) or L{WorkerUnreachable}.
    """
    path = socket_path(state_dir, worker)
    factory = _AskFactory(worker, command, args, path)
    connector = reactor.connectUNIX(path, factory, timeout=timeout)

    def failed(failure):
        connector.disconnect()
        if failure.check(TimeoutError):
            raise WorkerUnreachable(f"worker {worker} did not answer on {path} within {timeout:g} s")
        return failure

    return factory.deferred.addTimeout(timeout, reactor).addErrback(failed)


# merging answers ------------------------------------------------------------------


def _tagged(rows, worker: int) -> list:
    return [dict(row, worker=worker) if isinstance(row, dict) else row for row in rows]


def merge_values(values: Sequence[object]) -> object:
    """Lists joined, numbers summed, dictionaries merged key by key, anything else the first."""
    first = values[0]
    if all(isinstance(v, list) for v in values):
        return [row for v in values for row in v]
    if all(isinstance(v, dict) for v in values):
        keys: List[str] = []
        for v in values:
            keys += [k for k in v if k not in keys]
        return {k: merge_values([v[k] for v in values if k in v]) for k in keys}
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sum(values)
    return first


def merge_generic(answers: Answers) -> object:
    """Any command: rows of lists tagged with their worker, then L{merge_values}."""
    values = [_tagged(v, k) if isinstance(v, list) else v for k, v in answers]
    return merge_values(values)


def merge_sessions(answers: Answers) -> list:
    """C{sessions}: every worker's rows, each tagged with its C{worker}."""
    return [row for k, rows in answers for row in _tagged(rows, k)]


def merge_macs(answers: Answers) -> dict:
    """
    C{macs}: per virtual hub every worker's rows, tagged with their worker;
    a MAC behind a backplane port is shown only if no worker has it on one of
    its own ports, and then once; switch counters summed.
    """
    merged: Dict[str, dict] = {}
    for k, hubs in answers:
        for hub, info in hubs.items():
            into = merged.setdefault(hub, {"macs": [], "conflicts": [], "counters": []})
            into["macs"] += _tagged(info.get("macs", []), k)
            into["conflicts"] += _tagged(info.get("conflicts", []), k)
            into["counters"].append(info.get("counters", {}))
    for info in merged.values():
        home = {row["mac"] for row in info["macs"] if not str(row.get("port", "")).startswith(BACKPLANE_PREFIX)}
        seen = set()
        rows = []
        for row in info["macs"]:
            if str(row.get("port", "")).startswith(BACKPLANE_PREFIX):
                if row["mac"] in home or row["mac"] in seen:
                    continue  # it lives on a worker's own port, or was shown already
                seen.add(row["mac"])
            rows.append(row)
        info["macs"] = sorted(rows, key=lambda r: (r.get("mac", ""), r.get("worker", 0)))
        info["counters"] = merge_values(info["counters"]) if info["counters"] else {}
    return merged


def merge_status(answers: Answers, workers: Sequence[dict] = ()) -> dict:
    """
    The main process's status (worker 0 answers first), the counts of
    L{STATUS_SUMS} summed, and C{workers}: C{workers} (what the main
    process knows of each: pid, state) with each one's figures.
    """
    answered = dict(answers)
    base = dict(answered.get(0) or next(iter(answered.values()), {}))
    for key in ("worker", "backplane"):  # each worker's, in its row
        base.pop(key, None)
    for key in STATUS_SUMS:
        counts = [v.get(key) for v in answered.values() if isinstance(v.get(key), (int, dict))]
        if counts:
            base[key] = merge_values(counts)
    rows = []
    for info in workers:
        row = dict(info)
        status = answered.get(info["worker"])
        if status is not None:
            row.update({key: status[key] for key in STATUS_SUMS if key in status})
            row["backplane"] = status.get("backplane", [])
        elif row.get("state") == "running":
            row["state"] = "not answering"
        rows.append(row)
    base["workers"] = rows
    return base


def merge_readings(answers: Answers) -> dict:
    """
    The metrics reading (L{sevpn.metrics.read_hub}) of the whole node:
    the hub's figures summed (the resume window is one), per virtual hub
    the switch counters summed, the MACs as L{merge_macs} shows them, and
    every worker's sessions and ports, each with its C{worker}.
    """
    readings = dict(answers)
    base = readings.get(0) or next(iter(readings.values()))
    hub = merge_values([r["hub"] for r in readings.values()])
    hub["resume_window"] = base["hub"]["resume_window"]
    vhubs: Dict[str, dict] = {}
    for k, reading in answers:
        for v in reading["virtual_hubs"]:
            into = vhubs.setdefault(v["name"], {"name": v["name"], "switch": [], "mac_table_limit": v["mac_table_limit"],
                                                 "macs": [], "conflicts": [], "sessions": [], "ports": []})
            into["switch"].append(v["switch"])
            into["macs"].append((k, {"macs": v["macs"]}))
            for key in ("conflicts", "sessions", "ports"):
                into[key] += _tagged(v[key], k)
    for name, v in vhubs.items():
        v["switch"] = merge_values([c for c in v["switch"] if c]) if any(v["switch"]) else {}
        v["macs"] = merge_macs([(k, {name: table}) for k, table in v["macs"]])[name]["macs"]
    return {"time": max(r["time"] for r in readings.values()), "hub": hub,
            "virtual_hubs": [vhubs[name] for name in sorted(vhubs)]}


def merge_fabric(answers: Answers) -> dict:
    """C{sevpn hub fabric}: every worker's fabric ports (each row says its worker)."""
    return {"worker": answers[0][1].get("worker", 0),
            "segments": [row for _, answer in answers for row in answer.get("segments", [])]}


#: The merge of each command whose answer has a shape of its own.
MERGES: Dict[str, Callable[[Answers], object]] = {
    "sessions": merge_sessions,
    "macs": merge_macs,
    "reading": merge_readings,
    "fabric": merge_fabric,
}


def combine(command: str, outcomes: Sequence[Tuple[int, bool, object]],
            merge: Optional[Callable[[Answers], object]] = None) -> object:
    """
    The answer to C{command} from each worker's outcome (worker, succeeded,
    result or exception): merged, or a L{control.Partial} with a warning
    per worker that did not answer; if none succeeded, the first refusal
    (or the first worker's failure) is raised.
    """
    answers = [(k, v) for k, ok, v in outcomes if ok]
    silent = [v for _, ok, v in outcomes if not ok and isinstance(v, WorkerUnreachable)]
    refusals = [v for _, ok, v in outcomes if not ok and not isinstance(v, WorkerUnreachable)]
    if not answers:
        raise (refusals or silent)[0]
    result = (merge or MERGES.get(command, merge_generic))(answers)
    if silent:
        return control.Partial(result, [str(e) for e in silent])
    return result


class FanOut:
    """
    The main process's control commands: run here and on every worker.

    @param workers: how many processes (the main one included).
    @param describe_workers: what the main process knows of each worker,
        for C{status} (L{merge_status}).
    """

    def __init__(self, reactor, state_dir: str, workers: int,
                 describe_workers: Callable[[], List[dict]] = lambda: [], timeout: float = TIMEOUT) -> None:
        self.timeout = timeout
        self.reactor = reactor
        self.state_dir = state_dir
        self.workers = workers
        self.describe_workers = describe_workers

    def command(self, name: str, local: Callable) -> Callable[..., Deferred]:
        """C{local} (this process's command C{name}) made to answer for every worker."""

        def run(**args) -> Deferred:
            calls = [maybeDeferred(local, **args)] + [
                ask(self.reactor, self.state_dir, k, name, args, self.timeout) for k in range(1, self.workers)
            ]

            def done(results):
                outcomes = []
                for k, (ok, value) in enumerate(results):
                    if not ok:
                        if k == 0 and not value.check(control.ControlError, ValueError):
                            value.raiseException()  # a bug here: the control protocol reports it
                        value = value.value
                    outcomes.append((k, ok, value))
                merge = None
                if name == "status":
                    merge = lambda answers: merge_status(answers, self.describe_workers())  # noqa: E731
                return combine(name, outcomes, merge)

            return DeferredList(calls, consumeErrors=True).addCallback(done)

        return run

    def reading(self, local: Callable[[], dict]) -> Callable[[], Deferred]:
        """The metrics listener's C{read}: every worker's reading, merged (a silent worker's left out)."""
        command = self.command("reading", local)

        def read() -> Deferred:
            return command().addCallback(lambda result: result.result if isinstance(result, control.Partial)
                                         else result)

        return read

    def wrap(self, commands: Dict[str, Callable], local_only: Sequence[str] = ()) -> Dict[str, Callable]:
        """C{commands} with each one not in C{local_only} answering for every worker."""
        return {name: fn if name in local_only else self.command(name, fn) for name, fn in commands.items()}
