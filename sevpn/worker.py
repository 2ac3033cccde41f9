"""
C{python -m sevpn.worker --worker K --sockets FD,... -- HUB-OPTIONS}: one
worker process of a hub run with C{--workers N}, started by its main
process (L{sevpn.workers}), never by hand.

It parses the hub's options as the main process did, and runs the same
hub service with the worker's part (L{sevpn.workers.WorkerRole}): the
listening sockets it was given (descriptors C{4, 5, ...}), its own control
socket, its backplane ports.  Descriptor 0 is its lifeline (end of file:
the main process is gone or asked it to stop), descriptor 3 its log
stream to the main process (JSON lines; see L{LogPipe}).  Its standard
output and error are the main process's standard error, for what Python
itself prints (a crash before logging began).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from typing import List, Optional, Sequence, Tuple

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger, eventAsJSON, formatEventAsClassicLogText
from zope.interface import implementer

from sevpn.workers import LIFELINE_FD, LOG_FD


class LogPipe:
    """
    A log observer: each event as one JSON line to the main process, and
    the worker's own messages (C{ready}, C{fatal}) on the same stream.
    Writes block: a worker logs a line per event that matters, and the
    main process reads the stream on every reactor turn.  Once the stream
    is broken (the main process is gone; the lifeline stops this worker)
    lines go to standard error as text, tagged C{worker K}, so the last
    words of a worker whose main process died still reach the journal.
    """

    def __init__(self, worker: int, fd: int = LOG_FD, fallback=None) -> None:
        self.worker = worker
        self.fd = fd
        self.fallback = fallback if fallback is not None else sys.stderr
        self.broken = False

    def __call__(self, event: dict) -> None:
        if self.broken:
            self._fall_back(event)
            return
        try:
            line = eventAsJSON(event)
        except Exception:
            return
        if not self._write(line.encode("utf-8", "replace") + b"\n"):
            self._fall_back(event)

    def message(self, kind: str, **fields) -> None:
        self._write(json.dumps(dict(fields, sevpn_worker=kind)).encode("utf-8") + b"\n")

    def _write(self, data: bytes) -> bool:
        if self.broken:
            return False
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            self.broken = True
            return False
        return True

    def _fall_back(self, event: dict) -> None:
        from sevpn.workers import system_of

        text = formatEventAsClassicLogText(dict(event, log_system=system_of(event, self.worker)))
        if text:
            try:
                self.fallback.write(text)
                self.fallback.flush()
            except (OSError, ValueError):
                pass


@implementer(IReadDescriptor)
class Lifeline:
    """The read end of the pipe the main process holds: at its end, this worker stops."""

    log = Logger()

    def __init__(self, reactor, fd: int = LIFELINE_FD) -> None:
        self.reactor = reactor
        self.fd = fd
        self.asked = False
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.fd

    def doRead(self):
        from twisted.internet.main import CONNECTION_DONE

        while True:
            try:
                data = os.read(self.fd, 256)
            except BlockingIOError:
                return None
            except OSError:
                data = b""
            if not data:
                return CONNECTION_DONE
            if b"stop" in data:
                self.asked = True

    def connectionLost(self, reason) -> None:
        """End of file (the reactor may see only the hang-up, without a read): stop."""
        try:
            os.close(self.fd)
        except OSError:
            pass
        if self.asked:
            self.log.info("stopping: the main process asked")
        else:
            self.log.warn("the main process is gone: stopping")
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def logPrefix(self) -> str:
        return "lifeline"


def parse_arguments(argv: Sequence[str]) -> Tuple[int, List[int], List[str]]:
    """C{--worker K --sockets FD,FD -- HUB-OPTIONS...} -> (K, descriptors, hub options)."""
    argv = list(argv)
    if "--" not in argv:
        raise SystemExit("sevpn.worker: is started by 'sevpn-hub --workers N', not by hand")
    split = argv.index("--")
    head, hub_argv = argv[:split], argv[split + 1:]
    options = dict(zip(head[::2], head[1::2]))
    try:
        index = int(options["--worker"])
        sockets = [int(fd) for fd in options.get("--sockets", "").split(",") if fd]
    except (KeyError, ValueError):
        raise SystemExit("sevpn.worker: expected --worker K --sockets FD,... -- HUB-OPTIONS")
    return index, sockets, hub_argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Run worker K: parse the hub's options as the main process did, start the
    hub service with the worker's role, say C{ready} (or C{fatal} and why)
    on the log stream, and run until the lifeline ends; the exit status.
    """
    index, sockets, hub_argv = parse_arguments(sys.argv[1:] if argv is None else argv)
    from twisted.internet import default

    default.install()
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner
    from twisted.python import usage

    from sevpn import hubtap
    from sevpn.workers import WorkerRole

    pipe = LogPipe(index)
    globalLogBeginner.beginLoggingTo([pipe], redirectStandardIO=False)
    config = hubtap.Options()
    try:
        config.parseOptions(hub_argv)
    except usage.UsageError as e:
        pipe.message("fatal", why=str(e))
        return 1
    service = hubtap.makeService(config)
    service.role = WorkerRole(index, config["workers"], sockets,
                              service.role.segments if service.role is not None else ())
    service.worker = index  # the fabric port's name is the worker's
    Lifeline(reactor)
    try:
        service.startService()
    except SystemExit as e:
        why = str(e.code if e.code is not None else "")
        pipe.message("fatal", why=why.split(": ", 1)[1] if why.startswith("sevpn-hub: ") else why)
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    pipe.message("ready", pid=os.getpid())
    reactor.run()
    return 0


if __name__ == "__main__":
    # Run the module's own copy, not __main__'s: its log lines then read sevpn.worker.*.
    from sevpn import worker

    sys.exit(worker.main())
