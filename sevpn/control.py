"""
The local control socket of a running hub or card.

A UNIX socket C{STATE/control.sock}, mode 0600 (root only), speaking one
JSON object per line: the request C{{"command": NAME, "args": {...}}},
the answer C{{"ok": true, "result": ...}} or C{{"ok": false, "error":
SENTENCE}}.  The C{sevpn} command is its client (L{call}).
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import socket
import stat
import sys
from typing import Callable, Dict

from twisted.internet.defer import maybeDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

SOCKET_NAME = "control.sock"


class ControlError(Exception):
    """A control request failed; the message is for the user."""


class NotRunning(ControlError):
    """Nothing listens on the state dir's control socket."""


class Partial:
    """
    A command's result with warnings: part of the answer is missing (a hub
    worker did not answer).  Sent as C{{"ok": true, "result": ...,
    "warnings": [SENTENCE, ...]}}; L{call} prints the warnings.
    """

    def __init__(self, result, warnings) -> None:
        self.result = result
        self.warnings = list(warnings)


def _answer_for(result) -> dict:
    if isinstance(result, Partial):
        return {"ok": True, "result": result.result, "warnings": result.warnings}
    return {"ok": True, "result": result}


class ControlProtocol(LineOnlyReceiver):
    """
    One control connection: one request line, one answer line, then the
    connection is closed.  A L{ControlError} or C{ValueError} is answered
    as its sentence; anything else is logged and answered as an internal error.
    """

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024
    log = Logger()

    def lineReceived(self, line: bytes) -> None:
        """
        Run the request's command with its arguments and answer with its
        result; an unknown or malformed request is answered as such.
        """
        try:
            request = json.loads(line.decode("utf-8"))
            command = self.factory.commands[request["command"]]
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise ValueError
            inspect.signature(command).bind(**args)  # arguments it does not take: malformed, not a failure
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            self._answer({"ok": False, "error": "unknown or malformed control request"})
            return
        d = maybeDeferred(command, **args)
        d.addCallback(_answer_for)
        d.addErrback(self._error)
        d.addCallback(self._answer)

    def _error(self, failure) -> dict:
        if failure.check(ControlError, ValueError):
            return {"ok": False, "error": str(failure.value)}
        self.log.failure("control request failed", failure)
        return {"ok": False, "error": f"internal error: {failure.getErrorMessage()}"}

    def _answer(self, answer: dict) -> None:
        self.sendLine(json.dumps(answer, sort_keys=True).encode("utf-8"))
        self.transport.loseConnection()


class ControlFactory(Factory):
    """The control socket's listener: C{commands} maps each command's name to the function that answers it."""

    noisy = False

    protocol = ControlProtocol

    def __init__(self, commands: Dict[str, Callable]) -> None:
        self.commands = commands


def socket_path(state_dir: str, name: str = SOCKET_NAME) -> str:
    """Where the control socket of the hub or card with C{state_dir} is."""
    return os.path.join(state_dir, name)


def remove_stale(path: str) -> None:
    """
    Clear the way for a new control socket at C{path}: remove what a
    crash left there (a socket nobody listens on, a file, a link, dangling
    or not, which is removed itself and never followed); refuse if a hub
    or card answers on it, or if it is a directory.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ControlError(f"cannot check the old control socket {path}: {(e.strerror or str(e)).lower()}")
    if stat.S_ISDIR(st.st_mode):
        raise ControlError(f"{path} is a directory, where the control socket goes: remove it")
    if stat.S_ISSOCK(st.st_mode):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            pass  # nobody listens: left over from a crash
        else:
            raise ControlError(
                f"another hub or card already runs with the state dir {os.path.dirname(path)} "
                f"(it answers on {path})"
            )
        finally:
            probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ControlError(f"cannot remove the old control socket {path}: {(e.strerror or str(e)).lower()}")


def listen(reactor, state_dir: str, commands: Dict[str, Callable], name: str = SOCKET_NAME):
    """Listen on the state dir's control socket (C{name}: a hub worker's own), replacing a stale one."""
    path = socket_path(state_dir, name)
    remove_stale(path)
    old = os.umask(0o177)
    try:
        return reactor.listenUNIX(path, ControlFactory(commands), mode=0o600)
    finally:
        os.umask(old)


def call(state_dir: str, command: str, timeout: float = 10.0, **args):
    """Ask the hub or card running on C{state_dir}; blocking, for the CLI."""
    path = socket_path(state_dir)
    if not os.path.isdir(state_dir):
        if os.path.exists(state_dir):
            raise ControlError(f"the state dir {state_dir} is a file, not a directory: pass --state-dir with a directory")
        raise ControlError(f"there is no state dir {state_dir}: pass --state-dir with the right directory")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(f"nothing is running with the state dir {state_dir} (no control socket at {path})")
        except PermissionError:
            raise ControlError(f"not allowed to use {path}: run this as root (or as the state dir's owner)")
        except OSError as e:
            if e.errno in (errno.ENOTSOCK, errno.ECONNREFUSED, errno.ELOOP):
                raise NotRunning(f"nothing is running with the state dir {state_dir} ({path} is stale)")
            raise ControlError(f"cannot reach {path}: {(e.strerror or str(e)).lower()}")
        sock.sendall(json.dumps({"command": command, "args": args}).encode("utf-8") + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except socket.timeout:
        raise ControlError(f"no answer from {path} within {timeout:g} seconds")
    finally:
        sock.close()
    try:
        answer = json.loads(b"".join(chunks).decode("utf-8"))
    except ValueError:
        raise ControlError(f"the answer from {path} was not understood")
    if not answer.get("ok"):
        raise ControlError(answer.get("error") or "the request failed")
    for warning in answer.get("warnings") or ():
        print(f"warning: {warning}", file=sys.stderr)
    return answer.get("result")
