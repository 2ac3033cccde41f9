"""
Emulated internet lines for the benchmarks.

The kernel here has no netem, so the lines are made by C{wanem}, a small
userspace line emulator (delay, jitter, loss, rate limit with a drop-tail
queue; the shared bench's C{wan/wanem.c}, built here with C{cc -O2}).  The
topology is the peers harness's: each card host reaches the hub through a
namespace of its own in which wanem bridges two veths, and the line's
options apply to each direction of each segment::

    host i:eth0 --veth-- wan i:to-host [wanem] wan i:to-hub --veth-- hub:<tag>v<i>

so card to card crosses two lines (C{--delay-ms 10}: 20 ms RTT card to
hub, 40 ms card to card; C{--loss 1}: about 2% over the two lines).
Addresses are those of L{scripts.netns.Topology}.  Offloads (checksum, SG,
TSO, GSO, GRO) are off on all four veth ends of a line so that every frame
on it is at most the MTU: wanem never forwards a larger one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from twisted.trial.unittest import SkipTest

from scripts.netns import Topology, skip_reason, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Where wanem.c is read from (WANEM_SRC overrides) and where it is built.
WANEM_SRC = os.environ.get("WANEM_SRC", os.path.join(os.path.dirname(os.path.abspath(__file__)), "wanem.c"))
WANEM_BUILD = os.path.join(REPO, "build", "wanem")


@dataclass(frozen=True)
class Line:
    """One emulated line, as wanem's options for each direction of each segment."""

    name: str
    delay_ms: float
    rate_mbit: float
    loss_pct: float = 0.0

    def wanem_args(self) -> List[str]:
        args = ["--delay-ms", f"{self.delay_ms:g}", "--rate-mbit", f"{self.rate_mbit:g}"]
        if self.loss_pct:
            args += ["--loss", f"{self.loss_pct:g}"]
        return args

    def describe(self) -> str:
        loss = f", {self.loss_pct:g}% loss" if self.loss_pct else ""
        return (f"line {self.name}: {self.delay_ms:g} ms{loss}, {self.rate_mbit:g} Mbit/s per direction and segment "
                f"({2 * self.delay_ms:g} ms RTT card to hub, {4 * self.delay_ms:g} ms card to card)")


#: The three lines of "make bench": a good line, a fair one, a poor one.
LINES: Tuple[Line, ...] = (
    Line("A", delay_ms=10, rate_mbit=500),
    Line("B", delay_ms=20, rate_mbit=200, loss_pct=0.5),
    Line("C", delay_ms=50, rate_mbit=100, loss_pct=1.0),
)


def select_lines(spec: Optional[str]) -> List[Line]:
    """
    The lines named by C{LINES}: unset, C{1} or C{all} for all three,
    C{0} for none, or names such as C{A,C}.

    @raise ValueError: a name that is not a line.
    """
    spec = (spec or "").strip()
    if spec in ("", "1", "all", "yes"):
        return list(LINES)
    if spec in ("0", "no", "none"):
        return []
    by_name = {line.name: line for line in LINES}
    chosen = []
    for name in re.split(r"[,\s]+", spec.upper()):
        if name not in by_name:
            raise ValueError(f"LINES={spec!r}: no line {name!r} (the lines are {', '.join(by_name)}, or 0 for none)")
        chosen.append(by_name[name])
    return chosen


def line_skip_reason() -> Optional[str]:
    """Why emulated lines cannot be made on this machine, or None."""
    reason = skip_reason()
    if reason:
        return reason
    if shutil.which("ethtool") is None:
        return "emulated lines need ethtool (apt-get install ethtool) to switch offloads off"
    if not os.path.exists(os.environ.get("WANEM", "")) and not os.path.exists(WANEM_SRC):
        return f"emulated lines need wanem.c at {WANEM_SRC} (set WANEM_SRC, or WANEM to a built binary)"
    if not os.environ.get("WANEM") and shutil.which("cc") is None:
        return "emulated lines need a C compiler (apt-get install gcc) to build wanem"
    return None


def build_wanem() -> str:
    """The wanem binary: WANEM if set, else C{build/wanem/wanem}, (re)built from WANEM_SRC when older."""
    if os.environ.get("WANEM"):
        return os.environ["WANEM"]
    binary = os.path.join(WANEM_BUILD, "wanem")
    if not os.path.exists(binary) or os.path.getmtime(WANEM_SRC) > os.path.getmtime(binary):
        os.makedirs(WANEM_BUILD, exist_ok=True)
        subprocess.run(["cc", "-O2", "-o", binary, WANEM_SRC], check=True)
    return binary


# wanem's counters ------------------------------------------------------------

_COUNTER = re.compile(r"\b([a-z_A-Z]+) (\d+)\b")


def parse_wanem_counters(text: str) -> Dict[str, Dict[str, int]]:
    """
    The last counter block in a wanem log, per direction (C{A->B} is host
    to hub, C{B->A} hub to host)::

        {"A->B": {"rx": 1200, "forwarded": 1190, "dropped_loss": 6, "dropped_queue": 4, ...}, ...}
    """
    heads = list(re.finditer(r"^wanem (?:counters|stopped) after", text, re.M))
    last = text[heads[-1].end():] if heads else ""
    out = {}
    for line in last.splitlines():
        m = re.match(r"\s+(A->B|B->A): (.*)", line)
        if m:
            out[m.group(1)] = {k: int(v) for k, v in _COUNTER.findall(m.group(2))}
    return out


def counter_delta(after: Dict[str, Dict[str, int]], before: Dict[str, Dict[str, int]]) -> Dict[str, Dict[str, int]]:
    """
    C{after - before}, per direction and counter; the gauges (frames in
    flight, the largest backlog) and kernel_rx_drops (reset by each read)
    are taken as they are in C{after}.
    """
    out = {}
    for d, counters in after.items():
        prev = before.get(d, {})
        out[d] = {k: v if k in _AS_IS else v - prev.get(k, 0) for k, v in counters.items()}
    return out


_AS_IS = ("in_flight", "max_backlog_B", "kernel_rx_drops")


# the topology ------------------------------------------------------------------

OFFLOADS = ("tx", "sg", "tso", "gso", "gro")


class BenchTopology(Topology):
    """
    L{Topology} whose namespaces carry a name prefix of the caller's
    (Topology names its own "sv..."), so that a benchmark's namespaces are
    told apart from the test suite's.
    """

    dir_prefix = "sevpn-bench-"

    def __init__(self, hosts: int = 2, prefix: str = "wb") -> None:
        self.prefix = prefix
        try:
            super().__init__(hosts)
        except SkipTest as e:  # a benchmark is not a test: it fails with the reason
            raise RuntimeError(str(e))


class LineTopology(BenchTopology):
    """
    L{BenchTopology} with each card host behind an emulated line: same hub
    and host namespaces, same addresses, same sevpn helpers; a wan
    namespace and a wanem process per host in between.
    """

    def __init__(self, line: Line, wanem: str, hosts: int = 2, prefix: str = "wb") -> None:
        reason = line_skip_reason()
        if reason:
            raise RuntimeError(reason)
        self.line = line
        self.wanem = wanem
        self.wanem_procs: Dict[int, subprocess.Popen] = {}
        super().__init__(hosts, prefix)

    def wan(self, i: int) -> str:
        """The namespace of host C{i}'s line."""
        return f"{self.tag}-w{i}"

    def add_host(self, i: int) -> str:
        ns = self.host(i)
        self._ns(ns)
        self.hosts.append(ns)
        wan = self.wan(i)
        self._ns(wan)
        self.run(wan, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        hv = f"{self.tag}v{i}"[-15:]
        self.ip("link", "add", hv, "netns", self.hub_ns, "type", "veth", "peer", "name", "to-hub", "netns", wan)
        self.ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", "to-host", "netns", wan)
        for where, dev in ((self.hub_ns, hv), (ns, "eth0"), (wan, "to-hub"), (wan, "to-host")):
            self._offloads_off(where, dev)
        self.ip("-n", self.hub_ns, "addr", "add", f"{self.hub_addr(i)}/24", "dev", hv)
        self.ip("-n", ns, "addr", "add", f"{self.host_addr(i)}/24", "dev", "eth0")
        for where, dev in ((wan, "to-hub"), (wan, "to-host"), (self.hub_ns, hv), (ns, "eth0")):
            self.ip("-n", where, "link", "set", dev, "up")
        self._start_wanem(i)
        return ns

    def _offloads_off(self, ns: str, dev: str) -> None:
        args = []
        for feature in OFFLOADS:
            args += [feature, "off"]
        self.run(ns, "ethtool", "-K", dev, *args, check=False)
        shown = self.run(ns, "ethtool", "-k", dev)
        still = re.findall(r"^(tcp-segmentation-offload|generic-segmentation-offload|generic-receive-offload): on",
                           shown, re.M)
        if still:
            raise RuntimeError(f"ethtool could not switch off {', '.join(still)} on {dev} in {ns}")

    def _start_wanem(self, i: int) -> None:
        name = f"wanem{i}"
        proc = self.spawn(self.wan(i), name, self.wanem, "to-host", "to-hub", "--seed", str(i),
                          *self.line.wanem_args())
        self.wanem_procs[i] = proc
        wait_for(lambda: "<->" in self.log(name) or proc.poll() is not None, 10, f"wanem on line {i} to start")
        if proc.poll() is not None:
            raise RuntimeError(f"wanem on line {i} exited: {self.log(name)[-800:]}")

    def wanem_counters(self) -> Dict[int, Dict[str, Dict[str, int]]]:
        """Each line's counters now (wanem prints them on SIGUSR1), per host and direction."""
        before = {i: self.log(f"wanem{i}").count("wanem counters after") for i in self.wanem_procs}
        for proc in self.wanem_procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGUSR1)
        out = {}
        for i in self.wanem_procs:
            try:
                wait_for(lambda: self.log(f"wanem{i}").count("wanem counters after") > before[i], 5,
                         f"wanem {i}'s counters", interval=0.05)
            except AssertionError:
                pass  # a stopped wanem: its last block is what there is
            out[i] = parse_wanem_counters(self.log(f"wanem{i}"))
        return out
