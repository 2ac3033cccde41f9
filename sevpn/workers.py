"""
Every core of one machine: C{twistd sevpn-hub --workers N}.

One hub process is one core.  With C{--workers N} the process started
(the I{main} process, worker 0) runs N-1 more hub processes of itself,
the I{workers} 1..N-1, each a whole hub (its own reactor, TLS, switches,
thread pool for password checks) serving the cards that reach it.

The process model, and why:

 - B{Spawned, not forked.}  The main process starts each worker as a new
   interpreter (C{python -m sevpn.worker}, L{sevpn.worker}) with
   C{reactor.spawnProcess}.  C{os.fork} of a twistd process would share
   its reactor's epoll instance and waker between parent and child (events
   for one delivered to the other), copy a thread pool whose threads do
   not exist in the child while their locks may be held (the first
   password check would hang), and leave every descriptor open in both
   (the other workers' sockets, TAPs, the control socket).  A spawned
   worker builds its own reactor, pool and TLS context from its own
   options and inherits only the descriptors it is given.

 - B{One port, sockets by source address.}  The main process makes, per
   C{--listen} endpoint, N listening sockets sharing it
   (L{sevpn.reuseport.listening_group}: C{SO_REUSEPORT} and a BPF program
   that picks socket I{k} for a source address), keeps socket 0 and hands
   socket I{k} to worker I{k}.  It keeps its own copy of every socket as
   long as it runs, so the group's indices never move: a worker that dies
   leaves its socket's connections waiting in its backlog for the worker
   restarted in its place, instead of the kernel moving another socket
   into its index.  A card's reconnections from one address land on the
   worker that holds its session, so resumption works as with one process.

 - B{The lifeline.}  A worker's standard input is a pipe whose only
   writer is the main process.  The main process asks a worker to stop by
   writing C{stop} and closing it; when the main process dies, even by
   SIGKILL, the kernel closes it: either way the worker reads end-of-file
   and stops as on SIGTERM (goodbyes to its cards, its TAPs gone).  No
   orphans, and no C{PR_SET_PDEATHSIG} (which fires when the forking
   I{thread} exits, and which C{spawnProcess} has no hook to set).

 - B{The log stream.}  A worker writes its log events as JSON lines to a
   pipe (descriptor 3); the main process publishes them into its own log
   with C{[worker K ...]} as their system, and tags its own lines
   C{worker 0}, so whatever the main process logs to (a file, the journal,
   a terminal) has every worker's lines, each saying which.  The same
   stream says when a worker is ready or why it could not start.

 - B{Ready once all listen.}  The main process waits (blocking, before
   its reactor runs: start-up) until every worker says it is ready, and
   only then does twistd's C{startService} return and C{READY=1} go to
   systemd; a worker that cannot start fails the whole start with its
   sentence.  A worker that dies later is restarted (after 1, 2, 4 ... 30
   seconds; its sessions are gone and its cards log in afresh, to the new
   worker at the same index).

 - B{The main process alone} runs what must exist once per node: local
   bridges (C{--bridge}, C{--bridge-tap}: two AF_PACKET sockets on one
   LAN would loop through the backplane), cascades (one dial per cascade,
   not N), the metrics listener (its reading is every worker's, merged).
   It answers C{control.sock} for all workers (L{sevpn.fanout}).

 - B{The backplane} (L{sevpn.backplane}): every process, main included,
   has a TAP port per virtual hub in the virtual hub's Linux bridge, so
   cards on different workers see each other.  The main process makes the
   bridges of the virtual hubs it knows at start before the workers start,
   and removes them after they have stopped.

Per worker, not per node: the resume memory is the node's divided by N
(L{sevpn.hubtap}); the session limits per user and per hub, the login
throttle per user, and C{sevpn hub macs}' tables are each worker's.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from zope.interface import implementer

from sevpn import control
from sevpn.backplane import (
    Backplane, BackplaneError, Links, WorkerBackplane, backplane_for, ensure_bridge, netfilter_warning, remove_bridge,
)
from sevpn.fabric import Segment
from sevpn.fanout import FanOut, ask, socket_path
from sevpn.mac import InvalidMAC, format_mac, parse_mac
from sevpn.reuseport import ListenError, listening_group, parse_endpoint

#: The module a worker process runs (L{sevpn.worker}).
WORKER_MODULE = "sevpn.worker"
#: Descriptors of a worker: the lifeline, the log stream, the first listening socket.
LIFELINE_FD, LOG_FD, FIRST_SOCKET_FD = 0, 3, 4
#: Seconds every worker has to say it is ready at start.
READY_TIMEOUT = 60.0
#: Seconds a worker has to stop before it is killed.
STOP_TIMEOUT = 10.0
#: Seconds before restarting a worker that died, one after another; a worker
#: that ran L{STABLE} seconds starts over at the first.
RESTART_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE = 60.0
#: A longer line on a log stream is dropped (and counted).
MAX_LOG_LINE = 64 * 1024
#: Control commands the main process answers alone (what only it runs, and what workers ask each other).
MAIN_ONLY = ("cascades", "cascade-reload", "card-moved")
#: What a worker must not inherit: systemd talks to the main process only.
PRIVATE_ENVIRONMENT = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC",
                       "WATCHDOG_PID")


class WorkersError(Exception):
    """The workers cannot be started; the message is the sentence for the operator."""


def worker_environment(environ=os.environ) -> Dict[str, str]:
    """
    The environment a worker starts with: the main process's, without
    systemd's variables (L{PRIVATE_ENVIRONMENT}).
    """
    return {k: v for k, v in environ.items() if k not in PRIVATE_ENVIRONMENT}


# log lines: which worker ----------------------------------------------------------


def system_of(event: dict, worker: int) -> str:
    """What a worker's log line shows as its system: C{worker K} and what it would show alone."""
    system = event.get("log_system")
    if system == "-":
        return f"worker {worker}"
    if not system:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '?')}#{getattr(level, 'name', level)}"
    return f"worker {worker} {system}"


class _TagOwnLines:
    """An observer put before all others: the main process's own lines say C{worker 0}."""

    def __call__(self, event: dict) -> None:
        system = event.get("log_system")
        if not system or system == "-":
            event["log_system"] = system_of(event, 0)


#: The global log publisher's observers, which L{tag_own_lines} puts its
#: tagger in front of.  A private attribute of Twisted's L{LogPublisher}
#: (C{_observers}, a list, through Twisted 26.10), resolved here at import;
#: without it the main process's lines stay untagged (the workers' are
#: tagged by the relay, which uses public API only).
_OBSERVERS = getattr(globalLogPublisher, "_observers", None)
if not isinstance(_OBSERVERS, list):
    _OBSERVERS = None


def tag_own_lines(observers: Optional[list] = _OBSERVERS) -> Optional[Callable[[], None]]:
    """Tag this process's log lines as worker 0's; a function that stops it, or None if it cannot."""
    if observers is None:
        return None
    tagger = _TagOwnLines()
    observers.insert(0, tagger)

    def stop() -> None:
        if tagger in observers:
            observers.remove(tagger)

    return stop


@implementer(IReadDescriptor)
class LogStream:
    """
    The main process's end of one worker's log stream: JSON lines, each a
    log event (published with the worker's tag) or a message of the
    worker's own (C{{"sevpn_worker": "ready"}} or C{"fatal"} with C{why}).
    """

    def __init__(self, fd: int, worker: int, on_message: Callable[[dict], None], publish=globalLogPublisher) -> None:
        self.fd = fd
        self.worker = worker
        self.on_message = on_message
        self.publish = publish
        self.buffer = b""
        self.skipping = False
        self.closed = False
        #: Lines longer than L{MAX_LOG_LINE} (dropped) or not understood.
        self.bad_lines = 0
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)

    def fileno(self) -> int:
        return self.fd

    def read(self) -> bool:
        """Read what is there; False at end of stream (the worker's end closed)."""
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return True
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                return False
            if not data:
                return False
            self.feed(data)

    def feed(self, data: bytes) -> None:
        """
        Take bytes from the stream and handle each whole line; an unfinished
        line that grows past L{MAX_LOG_LINE} is dropped (counted) up to its
        end, so that a worker cannot make the main process hold unbounded memory.
        """
        if self.skipping:  # the rest of a line that was too long
            end = data.find(b"\n")
            if end < 0:
                return
            data = data[end + 1:]
            self.skipping = False
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self._line(line)
        if len(self.buffer) > MAX_LOG_LINE:
            self.buffer = b""
            self.skipping = True
            self.bad_lines += 1

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            message = json.loads(line.decode("utf-8", "replace"))
            if not isinstance(message, dict):
                raise ValueError
            if "sevpn_worker" in message:
                self.on_message(message)
                return
            event = eventFromJSON(line.decode("utf-8", "replace"))
        except (ValueError, TypeError, KeyError, AttributeError):
            self.bad_lines += 1
            return
        event["log_system"] = system_of(event, self.worker)
        self.publish(event)

    def doRead(self):
        if not self.read():
            from twisted.internet.main import CONNECTION_DONE

            return CONNECTION_DONE
        return None

    def connectionLost(self, reason) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def logPrefix(self) -> str:
        return f"worker {self.worker} log"


# the roles -----------------------------------------------------------------------


class _Role:
    """
    What every process of a multi-worker hub does: its backplane ports,
    and a card that moves between workers.

    A card that comes back from another address lands on another worker
    and logs in afresh there (that worker cannot resume a session it does
    not hold).  Its old session, on its old worker, would keep the card's
    MAC there for the resume window, and its new worker would have the MAC
    behind its backplane port (learned from the card's earlier frames) for
    the MAC table's age: the card's frames would be dropped as a MAC
    conflict on both.  So each fresh login of a card is told to the other
    workers (C{card-moved}): they end that card's sessions (same user, same
    MAC) and say whether the MAC belongs to a live port of theirs (another
    user's card, a host behind a local bridge); if none does, the new
    worker takes the MAC from its backplane port for the new session.
    """

    main = False
    log = Logger()

    def __init__(self, index: int, workers: int, segments: Sequence[Segment] = ()) -> None:
        self.index = index
        self.count = workers
        #: The fabric's segments: their virtual hubs' backplane is their fabric bridge.
        self.segments = tuple(segments)
        self.backplane: Optional[WorkerBackplane] = None
        self.hub = None
        self.reactor = None
        self.state_dir = ""
        #: How a worker asks another (L{sevpn.fanout.ask}; tests give their own).
        self.ask = ask

    def plan(self, hub: str) -> Backplane:
        return backplane_for(hub, self.segments)

    def _attach_backplane(self, hub, reactor, state) -> None:
        self.hub = hub
        self.backplane = WorkerBackplane(self.index, reactor, self.plan)
        try:
            for name in state.hubs():
                self.backplane.attach(hub.vhub(name))
        except BackplaneError as e:
            self.backplane.close()
            raise WorkersError(str(e))
        hub.vhub_added.append(self.backplane.vhub_added)
        hub.joined.append(self.joined)

    def _commands(self, commands: Dict[str, Callable]) -> Dict[str, Callable]:
        return dict(commands, **{"card-moved": self.card_moved})

    def status(self) -> dict:
        """This process's part of C{sevpn hub status}."""
        return {"worker": self.index, "backplane": self.backplane.describe() if self.backplane else []}

    # a card that moved ---------------------------------------------------------------

    def card_moved(self, user: str, hub: str, mac: str) -> dict:
        """
        The C{card-moved} command: the card logged in on another worker.
        End its sessions here; say how many, and whether its MAC is a live
        port's here all the same.
        """
        try:
            card_mac = parse_mac(mac)
        except InvalidMAC:
            raise control.ControlError(f"{mac!r} is not a MAC address")
        ended = self.hub.end_card(str(user), str(hub), card_mac,
                                  "its card logged in again on another worker of this hub")
        vhub = self.hub.vhubs.get(hub)
        owner = vhub.lookup(card_mac) if vhub is not None else None
        elsewhere = owner is None or self.backplane.owns(owner) or getattr(owner, "yields_macs", False)
        return {"ended": len(ended), "live": not elsewhere}

    def joined(self, session) -> None:
        """The hub's hook for a fresh session: tell the other workers (see the class docstring)."""
        if session.card_mac is None or session.cascade or self.count < 2:
            return
        args = {"user": session.user, "hub": session.vhub.name, "mac": format_mac(session.card_mac)}
        asked = [self.ask(self.reactor, self.state_dir, k, "card-moved", args)
                 for k in range(self.count) if k != self.index]
        DeferredList(asked, consumeErrors=True).addCallback(self._told, session)

    def _told(self, results, session) -> None:
        if session.ended:
            return
        answers = [value for ok, value in results if ok and isinstance(value, dict)]
        ended = sum(int(a.get("ended", 0)) for a in answers)
        mac = format_mac(session.card_mac)
        if any(a.get("live") for a in answers):
            self.log.warn("MAC {mac} of {user}'s new session {id} belongs to a live port on another worker; "
                          "it stays there", mac=mac, user=session.user, id=session.id)
            return
        port = self.backplane.port(session.vhub.name) if self.backplane is not None else None
        released = port is not None and session.vhub.release(session.card_mac, port)
        if released:
            session.vhub.claim(session.card_mac, session.port)
        if ended or released:
            self.log.info("the card of {user} (MAC {mac}) moved to this worker in session {id}; "
                          "{ended} session(s) of it on other workers ended",
                          user=session.user, mac=mac, id=session.id, ended=ended)


class WorkerRole(_Role):
    """A worker process's part: its inherited sockets and its own control socket."""

    def __init__(self, index: int, workers: int, sockets: Sequence[int], segments: Sequence[Segment] = ()) -> None:
        super().__init__(index, workers, segments)
        self.sockets = list(sockets)

    def listen(self, reactor, descriptions: Sequence[str], factory) -> list:
        """
        Listen on the sockets inherited from the main process (socket I{k} of
        each listening group), not on C{descriptions}: the main process made
        them, so that each card's address reaches the same worker.
        """
        import socket

        ports = []
        for fd in self.sockets:
            sock = socket.socket(fileno=fd)
            try:
                ports.append(reactor.adoptStreamPort(sock.fileno(), sock.family, factory))
            finally:
                sock.close()  # the port has its own duplicate
        return ports

    def control(self, reactor, state_dir: str, commands: Dict[str, Callable]):
        self.reactor = reactor
        self.state_dir = state_dir
        return control.listen(reactor, state_dir, self._commands(commands),
                              name=os.path.basename(socket_path(state_dir, self.index)))

    def start(self, hub, reactor, state) -> None:
        self._attach_backplane(hub, reactor, state)

    def stop(self) -> Deferred:
        if self.backplane is not None:
            self.backplane.close()
        return succeed(None)


class MainRole(_Role):
    """
    The main process's part: the listening groups, the workers' lives, the
    bridges, the fan-out of control commands.

    @param argv: the hub's command line as given (its plugin options), for
        the workers to parse alike.
    """

    main = True
    log = Logger()

    def __init__(self, workers: int, argv: Sequence[str], segments: Sequence[Segment] = (),
                 python: str = sys.executable) -> None:
        super().__init__(0, workers, segments)
        self.argv = list(argv)
        self.python = python
        self.groups: List[list] = []
        self.workers: Dict[int, WorkerProcess] = {}
        self.stopping = False
        self.state = None
        self.made_bridges: List[Backplane] = []
        self.fanout: Optional[FanOut] = None
        self._untag: Optional[Callable[[], None]] = None
        self.links = Links()

    # start ---------------------------------------------------------------------

    def listen(self, reactor, descriptions: Sequence[str], factory) -> list:
        if self._untag is None:
            self._untag = tag_own_lines()
        try:
            endpoints = [parse_endpoint(d) for d in descriptions]
            for endpoint in endpoints:
                self.groups.append(listening_group(endpoint, self.count))
        except ListenError as e:
            self._close_groups()
            raise WorkersError(str(e))
        return [reactor.adoptStreamPort(group[0].fileno(), group[0].family, factory) for group in self.groups]

    def control(self, reactor, state_dir: str, commands: Dict[str, Callable]):
        """
        The node's control socket, answered for every worker (L{FanOut}): a
        command is run here and asked of the workers, and the answers merged;
        L{MAIN_ONLY} commands are run here alone.
        """
        self.reactor = reactor
        self.state_dir = state_dir
        self.fanout = FanOut(reactor, state_dir, self.count, self.describe_workers)
        return control.listen(reactor, state_dir, self.fanout.wrap(self._commands(commands), MAIN_ONLY))

    def reading(self, local: Callable[[], dict]) -> Callable:
        """What C{--metrics} serves: every worker's reading (after L{control})."""
        return self.fanout.reading(local)

    def start(self, hub, reactor, state) -> None:
        """Bridges, this process's backplane ports, then every worker, ready (blocking: start-up)."""
        self.reactor = reactor
        self.state = state
        for name in state.hubs():
            backplane = self.plan(name)
            if not backplane.managed:
                continue  # a fabric segment's bridge: 'sevpn fabric up' made it, the fabric port checked it
            try:
                if ensure_bridge(backplane, self.links):
                    self.made_bridges.append(backplane)
            except BackplaneError as e:
                raise WorkersError(str(e))
        self._attach_backplane(hub, reactor, state)
        warning = netfilter_warning()
        if warning:
            self.log.warn("{warning}", warning=warning)
        for index in range(1, self.count):
            self.workers[index] = WorkerProcess(self, index)
        try:
            for worker in self.workers.values():
                worker.spawn()
            self._wait_ready(time.monotonic() + READY_TIMEOUT)
        except BaseException:
            self.stopping = True
            for worker in self.workers.values():
                worker.ask_to_stop()
            if self.backplane is not None:
                self.backplane.close()
            for backplane in self.made_bridges:  # (a worker's TAP may still be in one: it is kept then)
                remove_bridge(backplane, self.links)
            raise
        for worker in self.workers.values():
            worker.watch()
        self.log.info("{n} hub workers running (pids {pids}); cards are spread over them by source address",
                      n=self.count, pids=", ".join(str(p) for p in [os.getpid()] + [
                          w.pid for w in self.workers.values()]))

    def _wait_ready(self, deadline: float) -> None:
        waiting = {worker.stream: worker for worker in self.workers.values()}
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                late = min(w.index for w in waiting.values())
                raise WorkersError(f"worker {late} did not start within {READY_TIMEOUT:g} s")
            readable, _, _ = select.select(list(waiting), [], [], left)
            for stream in readable:
                worker = waiting[stream]
                alive = stream.read()
                if worker.ready:
                    del waiting[stream]
                elif worker.fatal or not alive:
                    why = worker.fatal or "it exited (its log lines above say why)"
                    raise WorkersError(f"worker {worker.index} could not start: {why}")

    # what the operator sees -------------------------------------------------------

    def describe_workers(self) -> List[dict]:
        rows = [{"worker": 0, "pid": os.getpid(), "state": "running", "restarts": 0}]
        for index, worker in sorted(self.workers.items()):
            rows.append(worker.describe())
        return rows

    # stop ----------------------------------------------------------------------

    def stop(self) -> Deferred:
        """Stop every worker (killed after L{STOP_TIMEOUT}), then this process's ports and the bridges."""
        self.stopping = True
        ended = [worker.stop() for worker in self.workers.values()]
        done = gatherResults(ended, consumeErrors=True)
        done.addBoth(lambda _: self._cleanup())
        return done

    def _cleanup(self) -> None:
        if self.backplane is not None:
            self.backplane.close()
        names = set(self.state.hubs()) if self.state is not None else set()
        names |= set(self.backplane.ports if self.backplane is not None else ())
        bridges = {b.bridge: b for b in self.made_bridges}
        for name in sorted(names):
            try:
                backplane = self.plan(name)
            except BackplaneError:
                continue
            bridges.setdefault(backplane.bridge, backplane)
        for backplane in bridges.values():
            sentence = remove_bridge(backplane, self.links)
            if sentence:
                self.log.info("{sentence}", sentence=sentence)
        self._close_groups()
        if self._untag is not None:
            self._untag()
            self._untag = None

    def _close_groups(self) -> None:
        for group in self.groups:
            for sock in group:
                sock.close()
        self.groups = []


class WorkerProcess(ProcessProtocol):
    """The main process's view of worker C{index}: its process, lifeline and log stream."""

    log = Logger()

    def __init__(self, role: MainRole, index: int) -> None:
        self.role = role
        self.index = index
        self.pid: Optional[int] = None
        self.process = None
        self.lifeline: Optional[int] = None
        self.stream: Optional[LogStream] = None
        self.ready = False
        self.fatal: Optional[str] = None
        self.started = 0.0
        self.restarts = 0
        self.delay_index = 0
        self.restart_call = None
        self._ended: Optional[Deferred] = None
        self._kill_call = None

    def spawn(self) -> None:
        """
        Start the worker process: its lifeline on standard input, its log stream
        on L{LOG_FD}, socket C{index} of each listening group from
        L{FIRST_SOCKET_FD} on, and the hub's own options to parse alike.
        """
        role = self.role
        reactor = role.reactor
        lifeline_read, self.lifeline = os.pipe()
        log_read, log_write = os.pipe()
        fds = {0: lifeline_read, 1: 2, 2: 2, LOG_FD: log_write}
        sockets = []
        for n, group in enumerate(role.groups):
            fds[FIRST_SOCKET_FD + n] = group[self.index].fileno()
            sockets.append(str(FIRST_SOCKET_FD + n))
        argv = [role.python, "-m", WORKER_MODULE, "--worker", str(self.index), "--sockets", ",".join(sockets),
                "--", *role.argv]
        self.ready = False
        self.fatal = None
        self._ended = Deferred()
        try:
            self.process = reactor.spawnProcess(self, role.python, argv, env=worker_environment(), childFDs=fds)
        except BaseException:
            os.close(self.lifeline)
            os.close(log_read)
            self.lifeline = None
            raise
        finally:
            os.close(lifeline_read)
            os.close(log_write)
        self.pid = self.process.pid
        self.started = time.monotonic()
        self.stream = LogStream(log_read, self.index, self._message)

    def watch(self) -> None:
        """Read the log stream on the reactor from now on."""
        if self.stream is not None and not self.stream.closed:
            self.role.reactor.addReader(self.stream)

    def _message(self, message: dict) -> None:
        kind = message.get("sevpn_worker")
        if kind == "ready":
            self.ready = True
            if self.restarts:
                self.log.info("worker {w} is running again (pid {pid})", w=self.index, pid=self.pid)
        elif kind == "fatal":
            self.fatal = str(message.get("why", ""))[:400] or "it gave no reason"

    # life and death -------------------------------------------------------------

    def ask_to_stop(self) -> None:
        """Write C{stop} on the lifeline and close it: the worker stops as on SIGTERM."""
        if self.lifeline is not None:
            try:
                os.write(self.lifeline, b"stop\n")
            except OSError:
                pass  # it is gone already
            os.close(self.lifeline)
            self.lifeline = None

    def stop(self) -> Deferred:
        """
        Stop the worker (no restart): ask it over its lifeline, kill it after
        L{STOP_TIMEOUT} seconds; fires when it has ended.
        """
        if self.restart_call is not None and self.restart_call.active():
            self.restart_call.cancel()
        self.restart_call = None
        if self.process is None or self._ended is None or self._ended.called:
            return succeed(None)
        self.ask_to_stop()
        self._kill_call = self.role.reactor.callLater(STOP_TIMEOUT, self._kill)
        return self._ended

    def _kill(self) -> None:
        self._kill_call = None
        self.log.warn("worker {w} (pid {pid}) did not stop within {t:g} s: killing it", w=self.index, pid=self.pid,
                      t=STOP_TIMEOUT)
        try:
            self.process.signalProcess("KILL")
        except Exception:
            pass

    def processEnded(self, reason) -> None:
        """
        The worker ended: read its last log lines, and unless the hub is
        stopping restart it after the next of L{RESTART_DELAYS} (back to the
        first once a worker has lived L{STABLE} seconds).
        """
        status = reason.value
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        if self.lifeline is not None:
            os.close(self.lifeline)
            self.lifeline = None
        if self.stream is not None and not self.stream.closed:
            self.stream.read()  # its last lines
            self.role.reactor.removeReader(self.stream)
            self.stream.close()
        how = (f"was killed by signal {status.signal} ({signal.Signals(status.signal).name})"
               if getattr(status, "signal", None) else f"exited with status {getattr(status, 'exitCode', '?')}")
        ended, self._ended = self._ended, None
        self.process = None
        if self.role.stopping:
            self.log.info("worker {w} (pid {pid}) stopped", w=self.index, pid=self.pid)
        else:
            if time.monotonic() - self.started >= STABLE:
                self.delay_index = 0
            delay = self._restart_later()
            self.log.warn(
                "worker {w} (pid {pid}) {how}: the sessions it held are gone and its cards log in again; "
                "restarting it in {delay:g} s", w=self.index, pid=self.pid, how=how, delay=delay)
        if ended is not None:
            ended.callback(None)

    def _restart(self) -> None:
        self.restart_call = None
        if self.role.stopping:
            return
        self.restarts += 1
        try:
            self.spawn()
        except OSError as e:
            delay = self._restart_later()
            self.log.error("cannot restart worker {w}: {why}; trying again in {delay:g} s", w=self.index,
                           why=e.strerror or str(e), delay=delay)
            return
        self.watch()

    def _restart_later(self) -> float:
        """Restart the worker after the next of L{RESTART_DELAYS}; returns that delay."""
        delay = RESTART_DELAYS[min(self.delay_index, len(RESTART_DELAYS) - 1)]
        self.delay_index += 1
        self.restart_call = self.role.reactor.callLater(delay, self._restart)
        return delay

    def describe(self) -> dict:
        if self.process is not None:
            state = "running" if self.ready else "starting"
        elif self.restart_call is not None:
            state = "restarting"
        else:
            state = "stopped"
        return {"worker": self.index, "pid": self.pid, "state": state, "restarts": self.restarts}
