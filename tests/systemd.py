"""
What `systemctl start` does with a unit of C{Type=notify}, for tests on
machines where systemd is not PID 1: read the installed unit file, expand
its specifiers and C{EnvironmentFile=} into C{ExecStart=} the way systemd
does, and wait for C{READY=1} on a notification socket the test binds.

Only what the sevpn units use is emulated; anything else in a unit
(an C{ExecStart=} prefix, an unknown specifier, another C{Type=}) raises
L{Unsupported} rather than being run differently from systemd.
References: systemd.unit(5) (syntax, specifiers), systemd.exec(5)
(C{EnvironmentFile=}, C{UMask=}, C{StateDirectory=}), systemd.service(5)
(command lines, C{Type=notify}, C{NotifyAccess=}), sd_notify(3).
"""

from __future__ import annotations

import os
import re
import select
import shlex
import socket
import struct
import time
from typing import Callable, Dict, List, Optional, Tuple

#: systemd's default PATH for services (and a root login's on Debian).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: systemd's StateDirectory= root for system units.
STATE_ROOT = "/var/lib"

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\$")
_WORD_VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Unsupported(AssertionError):
    """The unit asks for something this emulation does not do; the message says what."""


def unit_name(name: str) -> Tuple[str, str, Optional[str]]:
    """
    The full unit name C{systemctl} makes of C{name}, the file it is read
    from (the template for an instance), and the instance or None:
    C{"sevpn-nic@sevpn0"} is C{("sevpn-nic@sevpn0.service",
    "sevpn-nic@.service", "sevpn0")}.
    """
    full = name if "." in name.rpartition("@")[2] else name + ".service"
    stem, dot, suffix = full.rpartition(".")
    if "@" in stem:
        prefix, _, instance = stem.partition("@")
        if not instance:
            raise Unsupported(f"{name} is a template; start an instance of it")
        return full, f"{prefix}@.{suffix}", instance
    return full, full, None


class UnitFile:
    """
    The settings of one section of a unit file, specifiers expanded for
    the unit C{name} (an instance name for a template).
    """

    def __init__(self, text: str, name: str, section: str = "Service") -> None:
        self.name, self.template, self.instance = unit_name(name)
        self.settings: Dict[str, List[str]] = {}
        current = None
        pending = ""
        for raw in text.splitlines():
            line = raw.strip()
            if not pending and (not line or line[0] in "#;"):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line, pending = pending + line, ""
            if line.startswith("[") and line.endswith("]"):
                current = line[1:-1]
                continue
            key, equals, value = line.partition("=")
            if not equals:
                raise Unsupported(f"{self.template}: {line!r} is not KEY=VALUE")
            if current != section:
                continue
            key, value = key.strip(), value.strip()
            if value == "":
                self.settings[key] = []  # an empty assignment resets the list
            else:
                self.settings.setdefault(key, []).append(self.expand_specifiers(value))

    def expand_specifiers(self, value: str) -> str:
        stem = self.name.rpartition(".")[0]
        table = {
            "i": self.instance or "", "I": unescape(self.instance or ""), "n": self.name, "N": stem,
            "p": stem.partition("@")[0], "%": "%",
        }

        def one(match: "re.Match[str]") -> str:
            letter = match.group(1)
            if letter not in table:
                raise Unsupported(f"{self.template}: the specifier %{letter} is not emulated")
            return table[letter]

        return re.sub(r"%(.)", one, value)

    def all(self, key: str) -> List[str]:
        return list(self.settings.get(key, []))

    def one(self, key: str, default: Optional[str] = None) -> Optional[str]:
        """The value of a single-valued setting (the last assignment wins, as in systemd)."""
        values = self.settings.get(key)
        return values[-1] if values else default


def unescape(instance: str) -> str:
    """systemd-escape --unescape, for an instance name."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), instance.replace("-", "/"))


def environment_file(text: str) -> Dict[str, str]:
    """
    The assignments of an C{EnvironmentFile=}: C{KEY=VALUE} lines; blank
    lines and lines starting with C{#} or C{;} ignored; a value may be
    quoted (single quotes literally, double quotes with backslash escapes),
    and an unquoted value keeps its inner spaces.
    """
    env: Dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, equals, value = line.partition("=")
        key = key.strip()
        if not equals or not _KEY.fullmatch(key):
            continue  # systemd ignores (and logs) such a line
        if raw.rstrip().endswith("\\"):
            raise Unsupported(f"line {number} of an environment file continues a line: not emulated")
        lexer = shlex.shlex(value.strip(), posix=True)
        lexer.whitespace_split = True
        lexer.commenters = ""
        try:
            env[key] = " ".join(lexer)
        except ValueError as e:
            raise Unsupported(f"line {number} of an environment file: {e}")
    return env


def exec_argv(command: str, env: Dict[str, str]) -> List[str]:
    """
    The argument vector of an C{ExecStart=} line: words split and unquoted,
    then C{$NAME} standing as a word of its own replaced by the variable's
    value split at whitespace (zero or more words), C{${NAME}} anywhere by
    its exact value, C{$$} by C{$}; an unset variable is empty.
    """
    try:
        words = shlex.split(command)
    except ValueError as e:
        raise Unsupported(f"ExecStart={command!r}: {e}")
    if words and words[0][:1] in "@-:+!":
        raise Unsupported(f"ExecStart={command!r}: the prefix {words[0][0]!r} is not emulated")
    argv: List[str] = []
    for word in words:
        alone = _WORD_VARIABLE.fullmatch(word)
        if alone:
            argv.extend(env.get(alone.group(1), "").split())
        else:
            argv.append(_VARIABLE.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), ""), word))
    return argv


class NotifySocket:
    """
    The socket a C{Type=notify} service reports to, as systemd binds it:
    datagrams, with the sender's credentials, so that C{NotifyAccess=main}
    can be held (messages from any other process are kept apart, not obeyed).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        #: (sender pid, assignments) of every datagram read, in order.
        self.messages: List[Tuple[Optional[int], Dict[str, str]]] = []

    def read(self, timeout: float) -> bool:
        """Read one datagram if one comes within C{timeout} seconds."""
        if not select.select([self.sock], [], [], timeout)[0]:
            return False
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        fields = dict(line.partition("=")[::2] for line in data.decode("utf-8", "replace").splitlines() if line)
        self.messages.append((pid, fields))
        return True

    def wait_ready(self, main_pid: int, exited: Callable[[], bool], timeout: float) -> str:
        """
        Wait for C{READY=1} from C{main_pid}, as systemd does for
        C{NotifyAccess=main}.

        @return: the last C{STATUS=} the service sent with or before it.
        @raise AssertionError: the service exited or did not report within C{timeout}.
        """
        deadline = time.monotonic() + timeout
        while True:
            for pid, fields in self.messages:
                if pid == main_pid and fields.get("READY") == "1":
                    return self.status(main_pid)
            if exited():
                raise AssertionError(f"the service exited before it was ready{self._heard()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the service was not ready within TimeoutStartSec={timeout:g}s{self._heard()}")
            self.read(min(left, 0.2))

    def status(self, main_pid: int) -> str:
        values = [fields["STATUS"] for pid, fields in self.messages if pid == main_pid and "STATUS" in fields]
        return values[-1] if values else ""

    def _heard(self) -> str:
        if not self.messages:
            return " (no notification arrived)"
        return f" (notifications, sender pid and fields: {self.messages[-5:]})"

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def seconds(value: Optional[str], default: float) -> float:
    """A systemd time span such as C{60}, C{30s}, C{1min 30s}, in seconds."""
    if not value:
        return default
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        if unit not in units:
            raise Unsupported(f"the time span {value!r} is not emulated")
        total += float(number) * units[unit]
    return total
