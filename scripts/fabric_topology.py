"""
Test hosts for the fabric system tests: hub nodes in network namespaces on
a shared underlay, FRR on each, made by the tests and removed afterwards,
also on failure.

    underlay namespace U: bridge "ul" (MTU 9000)
      | veth per node, 10.X.0.N/24
    node namespaces N1..Nn: eth0 (the VTEP), FRR (zebra + bgpd), the
      segment's bridge br-100 with vx-100, and the stand-ins for hub ports:
        - a "card host" (its own namespace, 192.168.X.N/24) on a veth
          port, where the hub's TAP port will be;
        - or a stand-in hub worker (scripts/fabric_port.py): a TAP held open
          by a process that reflects MACs into the bridge over rtnetlink.

Traffic goes only to addresses inside these namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

from twisted.trial.unittest import SkipTest

from sevpn.fabric import FabricNode, Segment, fabric, fabric_attach, fabric_up
from sevpn.frr import FrrInstance, command_runner, frr_unavailable
from scripts.netns import env, wait_for

VNI = 100
PASSWORD = "fabric-test-secret"


def skip_reason(need_frr: bool = True) -> Optional[str]:
    if os.geteuid() != 0:
        return "fabric tests need root (they create network namespaces, bridges and VXLAN devices)"
    if shutil.which("ip") is None or shutil.which("bridge") is None:
        return "fabric tests need iproute2's ip and bridge commands"
    if not os.path.exists("/dev/net/tun"):
        return "fabric tests need /dev/net/tun"
    if need_frr:
        return frr_unavailable()
    return None


def run(ns: Optional[str], *argv: str, check: bool = True, timeout: float = 60) -> str:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    result = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=env())
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(full)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


class HubPort:
    """A stand-in hub worker (scripts/fabric_port.py) in a node namespace, driven over its stdin."""

    def __init__(self, ns: str, tap: str, marker: str, log_path: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "scripts.fabric_port", tap, marker],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env(), start_new_session=True,
        )
        wait_for(lambda: tap in run(ns, "ip", "-o", "link", "show", check=False) or self.proc.poll() is not None,
                 15, f"the stand-in hub port to open {tap}")
        if self.proc.poll() is not None:
            raise AssertionError(f"the stand-in hub port exited: {self.log()[-1500:]}")

    def command(self, line: str) -> dict:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise AssertionError(f"the stand-in hub port ended: {self.log()[-1500:]}")
        return json.loads(answer)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


class FabricTopology:
    """
    C{count} hub nodes on one underlay, segment VNI 100 up on each, FRR on
    each (unless C{frr} is false); C{reflectors}: node numbers that are
    route reflectors (none: a full mesh).
    """

    #: The first letters of every namespace and device name.
    prefix = "fb"

    def __init__(self, count: int = 3, reflectors=(), frr: bool = True) -> None:
        reason = skip_reason(need_frr=frr)
        if reason:
            raise SkipTest(reason)
        self.tag = f"{self.prefix}{os.getpid() % 10000}{int(time.time() * 1000) % 100}"
        self.x = 100 + os.getpid() % 100
        self.dir = tempfile.mkdtemp(prefix="sevpn-fabric-")
        self.namespaces: List[str] = []
        self.frr: Dict[int, FrrInstance] = {}
        self.ports: Dict[int, HubPort] = {}
        self.processes: List[subprocess.Popen] = []
        self.count = count
        #: How long each node's fabric_up took.
        self.up_seconds: Dict[int, float] = {}
        try:
            nodes = fabric({self.node_ns(i): self.vtep(i) for i in range(1, count + 1)}, [Segment("DEFAULT", VNI)],
                           reflectors=[self.node_ns(i) for i in reflectors], password=PASSWORD)
            self.nodes: Dict[int, FabricNode] = {i: nodes[self.node_ns(i)] for i in range(1, count + 1)}
            self._netns(self.underlay)
            run(self.underlay, "ip", "link", "add", "ul", "mtu", "9000", "type", "bridge")
            run(self.underlay, "ip", "link", "set", "ul", "up")
            for i in range(1, count + 1):
                ns = self.node_ns(i)
                self._netns(ns)
                run(None, "ip", "link", "add", f"{self.tag}u{i}", "mtu", "9000", "netns", self.underlay, "type",
                    "veth", "peer", "name", "eth0", "mtu", "9000", "netns", ns)
                run(self.underlay, "ip", "link", "set", f"{self.tag}u{i}", "master", "ul", "up")
                run(ns, "ip", "addr", "add", f"{self.vtep(i)}/24", "dev", "eth0")
                run(ns, "ip", "link", "set", "eth0", "up")
                self.up_seconds[i] = self._up(i)
        except BaseException:
            self.close()
            raise

    # names and addresses -----------------------------------------------------

    @property
    def underlay(self) -> str:
        return f"{self.tag}-u"

    def node_ns(self, i: int) -> str:
        return f"{self.tag}-n{i}"

    def host_ns(self, i: int) -> str:
        return f"{self.tag}-h{i}"

    def vtep(self, i: int) -> str:
        return f"10.{self.x}.0.{i}"

    def host_addr(self, i: int) -> str:
        return f"192.168.{self.x}.{i}"

    @property
    def broadcast(self) -> str:
        return f"192.168.{self.x}.255"

    def runner(self, i: int):
        return command_runner(self.node_ns(i))

    # building ----------------------------------------------------------------

    def _netns(self, name: str) -> None:
        run(None, "ip", "netns", "add", name)
        self.namespaces.append(name)
        run(name, "ip", "link", "set", "lo", "up")

    def _up(self, i: int) -> float:
        start = time.monotonic()
        fabric_up(self.nodes[i], VNI, self.runner(i))
        return time.monotonic() - start

    def start_frr(self) -> None:
        for i in range(1, self.count + 1):
            self.frr[i] = FrrInstance(self.nodes[i], netns=self.node_ns(i))
            self.frr[i].start()

    def converged(self) -> bool:
        """Every node's sessions are up and it floods to every other node, and nothing disagrees."""
        for i in self.frr:
            view = self.frr[i].status(self.runner(i))
            if view["problems"] or len(view["segments"][0]["remote_vteps"]) != self.count - 1:
                return False
        return True

    def add_card_host(self, i: int) -> str:
        """A stand-in card host on node i: its own namespace, on a veth port of the node bridge."""
        ns = self.host_ns(i)
        self._netns(ns)
        port = f"c{i}"
        run(None, "ip", "link", "add", port, "netns", self.node_ns(i), "type", "veth", "peer", "name", "eth0",
            "netns", ns)
        fabric_attach(self.nodes[i], VNI, port, self.runner(i))
        run(ns, "ip", "addr", "add", f"{self.host_addr(i)}/24", "dev", "eth0")
        run(ns, "ip", "link", "set", "eth0", "up")
        return ns

    def add_hub_port(self, i: int, marker: str) -> HubPort:
        """A stand-in hub worker on node i: a TAP port held open, reflecting MACs over rtnetlink."""
        seg = self.nodes[i].segment(VNI)
        tap = seg.tap_name(0)
        port = self.ports[i] = HubPort(self.node_ns(i), tap, marker, os.path.join(self.dir, f"port{i}.log"))
        fabric_attach(self.nodes[i], VNI, tap, self.runner(i))
        return port

    def host_mac(self, i: int) -> str:
        return json.loads(run(self.host_ns(i), "ip", "-j", "link", "show", "eth0"))[0]["address"]

    def spawn(self, ns: str, name: str, *argv: str) -> subprocess.Popen:
        with open(os.path.join(self.dir, f"{name}.log"), "ab") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE, stderr=log,
                                    env=env(), start_new_session=True)
        self.processes.append(proc)
        return proc

    def log(self, name: str) -> str:
        try:
            with open(os.path.join(self.dir, f"{name}.log"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # teardown ----------------------------------------------------------------

    def close(self) -> None:
        for port in self.ports.values():
            port.close()
        for proc in self.processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        for instance in self.frr.values():
            instance.stop()
        for ns in reversed(self.namespaces):
            for pid in run(None, "ip", "netns", "pids", ns, check=False).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces = []
        if os.environ.get("SEVPN_KEEP_LOGS"):
            print(f"fabric test logs kept in {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
