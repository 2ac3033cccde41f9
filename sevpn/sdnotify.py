"""
Tell systemd how a service is doing: the C{sd_notify} protocol, without
libsystemd.

A unit of C{Type=notify} sets C{$NOTIFY_SOCKET} to an C{AF_UNIX} datagram
socket (a path, or an abstract name written C{@name}); the service sends
newline-separated assignments such as C{READY=1} and C{STATUS=...} to it,
one datagram per call.  Outside systemd the variable is unset and
L{notify} does nothing, so the same code runs under C{twistd -n}, in tests
and under systemd.

Notification is advice, never a reason to fail: errors are logged once per
process and then kept quiet, nothing is raised, and a send never blocks
(the reactor thread sends).
"""

from __future__ import annotations

import os
import re
import socket
from typing import Mapping

from twisted.logger import Logger

#: systemd reads at most this many bytes of a notification (PIPE_BUF);
#: a longer one is cut by the kernel and systemd ignores it whole.
MAX_DATAGRAM = 4096
#: Longest value of one assignment we send; a C{STATUS} line is a sentence.
MAX_VALUE = 400
_KEY = re.compile(r"[A-Z][A-Z0-9_]*")


class NotifyError(Exception):
    """A notification cannot be sent; the message says why."""


def notify_address(value: str):
    """
    The socket address named by a C{$NOTIFY_SOCKET} value.

    @raise NotifyError: for a kind of address this module does not speak
        (systemd 254 added C{vsock:}, used only by virtual machine managers).
    """
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise NotifyError(f"NOTIFY_SOCKET {value[:80]!r} is neither a path nor an abstract socket name (@name)")


def encode(assignments) -> bytes:
    """
    One datagram of C{KEY=VALUE} lines.  A newline inside a value would let
    a value (a host name, an error text) smuggle in an assignment of its
    own, so line breaks become spaces; values are cut at L{MAX_VALUE}.

    @raise NotifyError: for an assignment that is not C{KEY=VALUE}.
    """
    lines = []
    for assignment in assignments:
        key, equals, value = assignment.partition("=")
        if not equals or not _KEY.fullmatch(key):
            raise NotifyError(f"{assignment[:40]!r} is not a KEY=VALUE assignment")
        value = " ".join(value.splitlines())[:MAX_VALUE]
        lines.append(f"{key}={value}")
    data = "\n".join(lines).encode("utf-8", "replace")
    if len(data) > MAX_DATAGRAM:
        raise NotifyError(f"a notification of {len(data)} bytes is more than systemd reads ({MAX_DATAGRAM})")
    return data


class Notifier:
    """
    Sends notifications and remembers whether it has complained already,
    so a missing or broken socket costs one log line, not one per event.
    """

    log = Logger()

    def __init__(self) -> None:
        self.complained = False

    def notify(self, *assignments: str, environ: Mapping[str, str] = os.environ) -> bool:
        """
        Send C{assignments} (C{"READY=1"}, C{"STATUS=listening on tcp:5555"},
        ...) as one datagram to C{$NOTIFY_SOCKET}.

        @return: C{True} if the datagram was sent; C{False} when there is no
            C{$NOTIFY_SOCKET} (not run by systemd) or it could not be sent.
        """
        value = environ.get("NOTIFY_SOCKET")
        if not value:
            return False
        try:
            address = notify_address(value)
            data = encode(assignments)
            # Non-blocking: the reactor thread calls this, and a manager
            # that does not read must cost a dropped STATUS, not a stall.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
                sock.sendto(data, address)
        except (NotifyError, OSError) as e:
            if not self.complained:
                self.complained = True
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                self.log.warn(
                    "cannot notify systemd at {socket}: {why} (further notification errors are not logged)",
                    socket=repr(value[:80]), why=why,
                )
            return False
        return True


_notifier = Notifier()


def notify(*assignments: str, environ: Mapping[str, str] = os.environ) -> bool:
    """
    Send C{assignments} to systemd in one datagram; see L{Notifier.notify}.
    Never raises; the first failure of the process is logged.
    """
    return _notifier.notify(*assignments, environ=environ)
