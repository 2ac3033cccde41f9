"""
FRR for one fabric node, and the commands that read a node's state: the
I/O half of L{sevpn.fabric}.

L{FrrInstance} runs Debian's FRR daemons (package C{frr}) for one node,
several side by side on one machine -- one per network namespace -- for
the tests and C{make demo-fabric}.  A production node runs the
distribution's service instead, with L{sevpn.fabric.frr_conf} as its
C{/etc/frr/frr.conf} and C{bgpd=yes} in C{/etc/frr/daemons}.

What an instance needs, found on Debian's FRR 8.4:
 - C{-N NAME} (pathspace) puts the daemons' vty sockets, pid files and
   zebra's API socket in C{/var/run/frr/NAME/}, which zebra creates (owned
   by C{frr}); C{vtysh -N NAME} finds them there, from any namespace.
 - C{-f FILE} is needed: without it the daemons read
   C{/etc/frr/NAME/*.conf}, and skip per-daemon files altogether when
   C{/etc/frr/frr.conf} exists.  Each daemon reads the file it is given
   and complains about every line that is not its own, so zebra gets
   L{sevpn.fabric.zebra_conf} and bgpd the whole C{frr.conf}.
 - C{-P 0}: no TCP vty port (several instances would collide on it).
 - the daemons drop to user C{frr}: the instance's directory is theirs.
 - vtysh looks for C{vtysh.conf} in C{CONFIG_DIR/NAME/}; the instance
   gives it an empty one so that it does not print a warning each time.
 - bgpd is stopped before zebra (zebra would otherwise withdraw what bgpd
   installed while bgpd still runs).
"""

from __future__ import annotations

import grp
import ipaddress
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Callable, List, Optional, Sequence

from sevpn.fabric import (
    FabricError, FabricNode, Runner, Segment, describe, frr_conf, parse_bgp_neighbors, zebra_conf,
)

FRR_SBIN = "/usr/lib/frr"
RUN_DIR = "/var/run/frr"
VTYSH = "/usr/bin/vtysh"
DAEMONS = ("zebra", "bgpd")
#: zebra's netlink receive buffer, as Debian's /etc/frr/daemons sets it: a
#: burst of FDB changes must not overflow it.
ZEBRA_NETLINK_BUFFER = 90000000


class FrrError(Exception):
    """FRR cannot be started, stopped or asked; the message says why."""


def frr_unavailable() -> Optional[str]:
    """Why FRR cannot be run here, or None."""
    if os.geteuid() != 0:
        return "FRR needs root (its daemons change the kernel's tables and drop to user frr)"
    for path in [os.path.join(FRR_SBIN, d) for d in DAEMONS] + [VTYSH]:
        if not os.access(path, os.X_OK):
            return f"FRR is not installed ({path} is missing; apt-get install frr)"
    try:
        pwd.getpwnam("frr")
        grp.getgrnam("frr")
    except KeyError:
        return "FRR's user and group 'frr' do not exist (is the frr package installed properly?)"
    return None


def command_runner(netns: Optional[str] = None, timeout: float = 30) -> Runner:
    """
    A L{sevpn.fabric.Runner}: runs an argv (in network namespace C{netns}
    if given) and returns its output, or raises L{FabricError} with
    the command and its error message.
    """
    prefix = ["ip", "netns", "exec", netns] if netns else []

    def run(argv: Sequence[str]) -> str:
        shown = f"'{' '.join(argv)}'"
        return _output(prefix + list(argv), timeout, FabricError, shown, "did not finish",
                       f"{argv[0]} is not installed (iproute2 provides ip and bridge)")

    return run


def _output(argv: List[str], timeout: float, error: type, shown: str, late: str, missing: str) -> str:
    """The output of C{argv}, or C{error} with a sentence: C{missing}, C{shown} C{late}, or its last error line."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise error(missing)
    except subprocess.TimeoutExpired:
        raise error(f"{shown} {late} within {timeout:g} s")
    if result.returncode != 0:
        why = (result.stderr.strip() or result.stdout.strip() or f"exit status {result.returncode}")
        raise error(f"{shown} failed: {why.splitlines()[-1][:300]}")
    return result.stdout


def vtysh_runner(pathspace: Optional[str] = None, config_dir: Optional[str] = None,
                 timeout: float = 15) -> Callable[[str], str]:
    """A function that runs one vtysh command (of the instance C{pathspace}) and returns its output."""
    argv = [VTYSH]
    if pathspace:
        argv += ["-N", pathspace]
    if config_dir:
        argv += ["--config_dir", config_dir]

    def vtysh(command: str) -> str:
        return _output(argv + ["-c", command], timeout, FrrError, f"vtysh -c '{command}'", "did not answer",
                       f"{VTYSH} is missing (apt-get install frr)")

    return vtysh


STATUS_QUERIES = ("show evpn vni json", "show evpn mac vni all json", "show bgp l2vpn evpn summary json")


def node_status(node: FabricNode, vtysh: Callable[[str], str], run: Runner) -> dict:
    """
    L{sevpn.fabric.describe} on what this node's FRR and kernel say now.
    An FRR daemon that does not answer is a problem in the view, not an error.
    """
    answers: List[str] = []
    failures: List[str] = []
    for query in STATUS_QUERIES:
        try:
            answers.append(vtysh(query))
        except FrrError as e:
            answers.append("")
            failures.append(str(e))
    view = describe(node, *answers, run(["bridge", "-j", "fdb", "show"]))
    if failures:
        if failures[0].startswith(f"vtysh -c '{STATUS_QUERIES[0]}'"):
            # zebra did not answer: that it "does not know" a VNI says nothing
            view["problems"] = [p for p in view["problems"] if not p.startswith("FRR does not know")]
        reasons = {f.rsplit(": ", 1)[-1] for f in failures}
        if len(failures) == len(STATUS_QUERIES) and len(reasons) == 1:
            failures = [f"FRR does not answer (vtysh: {reasons.pop()}): is it running, with bgpd?"]
        view["problems"][:0] = failures
    return view


def node_name(name: Optional[str] = None) -> str:
    """C{name}, or this machine's host name (FRR's default), as a fabric node name."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", name or socket.gethostname()).lstrip("._-")[:63] or "node"


def discover_node(segments: Sequence[Segment], vtep: str, vtysh: Callable[[str], str]) -> FabricNode:
    """
    This node as FRR runs it: its name and BGP neighbours (and which are
    route-reflector clients) from C{show bgp neighbors json}, with the
    given segments and VTEP.  When bgpd does not answer the node has no
    neighbours; L{node_status} then says why.
    """
    try:
        name, neighbours = parse_bgp_neighbors(vtysh("show bgp neighbors json"))
    except (FrrError, FabricError):
        name, neighbours = "", {}
    name = node_name(name)
    peers = tuple(sorted((a for a in neighbours if a != vtep), key=ipaddress.IPv4Address))
    return FabricNode(name, vtep, tuple(segments), peers, tuple(a for a in peers if neighbours[a]))


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class FrrInstance:
    """
    zebra and bgpd for one fabric node, in network namespace C{netns},
    with their files in a temporary directory of their own.

    @ivar name: the pathspace (C{-N}); also C{vtysh -N NAME}.
    """

    def __init__(self, node: FabricNode, netns: Optional[str] = None, name: Optional[str] = None) -> None:
        self.node = node
        self.netns = netns
        self.name = name or node.name
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise FrrError(f"FRR instance name {self.name!r} must be one path component")
        self.dir: Optional[str] = None
        self._vtysh: Optional[Callable[[str], str]] = None

    def vtysh(self, command: str) -> str:
        """Run one vtysh command on this instance; its output."""
        if self._vtysh is None:
            raise FrrError(f"FRR instance {self.name} is not running")
        return self._vtysh(command)

    @property
    def run_dir(self) -> str:
        return os.path.join(RUN_DIR, self.name)

    def _pid(self, daemon: str) -> Optional[int]:
        try:
            with open(os.path.join(self.run_dir, f"{daemon}.pid")) as f:
                return int(f.read().strip())
        except (FileNotFoundError, ValueError):
            return None

    def start(self, timeout: float = 15) -> None:
        """Start zebra, then bgpd; return once both answer on their vty sockets."""
        reason = frr_unavailable()
        if reason:
            raise FrrError(reason)
        for daemon in DAEMONS:
            pid = self._pid(daemon)
            if pid is not None and _alive(pid):
                raise FrrError(f"an FRR instance named {self.name} already runs ({daemon} is pid {pid})")
        uid, gid = pwd.getpwnam("frr").pw_uid, grp.getgrnam("frr").gr_gid
        self.dir = tempfile.mkdtemp(prefix=f"sevpn-frr-{self.name}-")
        try:
            vtysh_dir = os.path.join(self.dir, self.name)
            os.mkdir(vtysh_dir)
            files = {"zebra.conf": zebra_conf(self.node), "frr.conf": frr_conf(self.node),
                     os.path.join(self.name, "vtysh.conf"): ""}
            for rel, text in files.items():
                path = os.path.join(self.dir, rel)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
            for root, dirs, names in os.walk(self.dir):
                for entry in [root] + [os.path.join(root, n) for n in names]:
                    os.chown(entry, uid, gid)
            os.chmod(self.dir, 0o750)
            self._vtysh = vtysh_runner(self.name, self.dir)
            self._daemon("zebra", "zebra.conf", "-s", str(ZEBRA_NETLINK_BUFFER))
            self._wait(["zebra.vty", "zserv.api"], timeout, "zebra")
            self._daemon("bgpd", "frr.conf")
            self._wait(["bgpd.vty"], timeout, "bgpd")
        except BaseException:
            self.stop()
            raise

    def _daemon(self, daemon: str, conf: str, *extra: str) -> None:
        argv = ([] if not self.netns else ["ip", "netns", "exec", self.netns]) + [
            os.path.join(FRR_SBIN, daemon), "-d", "-N", self.name, "-f", os.path.join(self.dir, conf),
            "-P", "0", "--log", f"file:{os.path.join(self.dir, daemon + '.log')}", *extra,
        ]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise FrrError(f"{daemon} for {self.name} did not start (exit status {result.returncode}): "
                           f"{(result.stderr.strip() or self.log(daemon).strip())[-400:]}")

    def _wait(self, sockets: List[str], timeout: float, daemon: str) -> None:
        deadline = time.monotonic() + timeout
        while not all(os.path.exists(os.path.join(self.run_dir, s)) for s in sockets):
            pid = self._pid(daemon)
            if time.monotonic() > deadline or (pid is not None and not _alive(pid)):
                raise FrrError(f"{daemon} for {self.name} did not come up within {timeout:g} s: "
                               f"{self.log(daemon).strip()[-400:]}")
            time.sleep(0.02)

    def log(self, daemon: str = "bgpd") -> str:
        if not self.dir:
            return ""
        try:
            with open(os.path.join(self.dir, f"{daemon}.log"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def vtysh_json(self, command: str):
        text = self.vtysh(command)
        try:
            return json.loads(text) if text.strip() else {}
        except ValueError:
            raise FrrError(f"vtysh -c '{command}' printed something that is not JSON: {text[:200]!r}")

    def status(self, run: Runner) -> dict:
        """The node's L{sevpn.fabric.describe} view (C{run} runs C{bridge} in the node's namespace)."""
        return node_status(self.node, self.vtysh, run)

    def kill(self) -> None:
        """SIGKILL every daemon at once, as when the node dies; L{stop} cleans up afterwards."""
        for daemon in DAEMONS:
            pid = self._pid(daemon)
            if pid is not None and _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def stop(self, timeout: float = 10) -> None:
        """Stop bgpd, then zebra (SIGTERM, SIGKILL after C{timeout}); remove the instance's files."""
        for daemon in reversed(DAEMONS):
            pid = self._pid(daemon)
            if pid is None or not _alive(pid):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.dir and not os.environ.get("SEVPN_KEEP_LOGS"):
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
        self._vtysh = None
