"""
Hub nodes with real hubs and real cards, for the fabric's system tests,
C{make demo-fabric} and the fabric benchmark: made by the caller and
removed afterwards, also on failure.

    wire namespace W (the base class's "hub" namespace): two bridges,
      "ul": the underlay, MTU 9000 (VTEPs 10.S.0.N, VXLAN and BGP)
      "acc": the access network the cards reach the nodes over (10.S.1.N;
             card hosts 10.S.1.100+i), standing in for the internet
    node namespaces N1..Nn: eth0 on "ul", pub0 on "acc"; br-100 with vx-100
      made by 'sevpn fabric up'; FRR (zebra + bgpd); a sevpn hub with
      --fabric DEFAULT=100, whose TAP vt100-0 is in br-100
    card host namespaces H1..Hn: eth0 on "acc"; a card (TAP sv0,
      192.168.S.i) dialling its node, and the next nodes after it

The nodes share one CA (made once, copied into each node's state dir
before its hub first starts) and the same users, as docs/fabric.md tells
an operator to do.  Traffic goes only to addresses inside these
namespaces.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, Optional, Sequence

from twisted.trial.unittest import SkipTest

from sevpn.fabric import FabricNode, Segment, fabric
from sevpn.frr import FrrInstance, command_runner
from sevpn.pki import CA_FILE, CA_KEY, ensure_pki
from scripts.fabric_topology import skip_reason
from scripts.netns import BIN, PASSWORD, Topology, env, sevpn, wait_for

VNI = 100
HUB = "DEFAULT"
BGP_PASSWORD = "fabric-hubs-secret"


class FabricHubs(Topology):
    """
    C{nodes} hub nodes, FRR on each (a full mesh unless C{reflectors}
    names route-reflector nodes), a card host per node.
    """

    prefix = "ff"

    def __init__(self, nodes: int = 3, reflectors: Sequence[int] = (), password: Optional[str] = BGP_PASSWORD) -> None:
        reason = skip_reason(need_frr=True)
        if reason:
            raise SkipTest(reason)
        super().__init__(0)
        self.count = nodes
        self.frr: Dict[int, FrrInstance] = {}
        self.hub_procs: Dict[int, subprocess.Popen] = {}
        try:
            described = fabric({self.node_ns(i): self.vtep(i) for i in self.node_numbers},
                               [Segment(HUB, VNI)], reflectors=[self.node_ns(i) for i in reflectors],
                               password=password)
            self.nodes: Dict[int, FabricNode] = {i: described[self.node_ns(i)] for i in self.node_numbers}
            for bridge, mtu in (("ul", "9000"), ("acc", "1500")):
                self.ip("-n", self.hub_ns, "link", "add", bridge, "mtu", mtu, "type", "bridge")
                self.ip("-n", self.hub_ns, "link", "set", bridge, "up")
            for i in self.node_numbers:
                ns = self.node_ns(i)
                self._ns(ns)
                self._plug(ns, f"{self.tag}u{i}", "eth0", "ul", f"{self.vtep(i)}/24", "9000")
                self._plug(ns, f"{self.tag}p{i}", "pub0", "acc", f"{self.node_addr(i)}/24")
            self._make_ca()
            for i in self.node_numbers:
                self.add_host(i)
        except BaseException:
            self.close()
            raise

    # names and addresses -----------------------------------------------------

    @property
    def node_numbers(self):
        return range(1, self.count + 1)

    def node_ns(self, n: int) -> str:
        return f"{self.tag}-n{n}"

    def vtep(self, n: int) -> str:
        return f"10.{self.subnet}.0.{n}"

    def node_addr(self, n: int) -> str:
        """Node C{n}'s address on the access network: what cards dial."""
        return f"10.{self.subnet}.1.{n}"

    def hub_addr(self, i: int) -> str:
        """The address card C{i} dials first: its own node's."""
        return self.node_addr(i)

    def host_addr(self, i: int) -> str:
        return f"10.{self.subnet}.1.{100 + i}"

    def hub_of(self, i: int) -> str:
        return self.node_ns(i)

    def node_state(self, n: int) -> str:
        return os.path.join(self.dir, f"node{n}")

    @property
    def hub_state(self) -> str:
        return self.node_state(1)

    def ca_file(self, i: int) -> str:
        return os.path.join(self.dir, "ca", CA_FILE)

    def runner(self, n: int):
        return command_runner(self.node_ns(n))

    # building ----------------------------------------------------------------

    def _plug(self, ns: str, outside: str, inside: str, bridge: str, address: str, mtu: str = "1500") -> None:
        """A veth from namespace C{ns} (C{inside}, with C{address}) into the wire namespace's C{bridge}."""
        self.ip("link", "add", outside, "mtu", mtu, "netns", self.hub_ns, "type", "veth",
                "peer", "name", inside, "mtu", mtu, "netns", ns)
        self.ip("-n", self.hub_ns, "link", "set", outside, "master", bridge, "up")
        self.ip("-n", ns, "addr", "add", address, "dev", inside)
        self.ip("-n", ns, "link", "set", inside, "up")

    def add_host(self, i: int) -> str:
        """Card host C{i} on the access network."""
        ns = self.host(i)
        self._ns(ns)
        self.hosts.append(ns)
        self._plug(ns, f"{self.tag}h{i}", "eth0", "acc", f"{self.host_addr(i)}/24")
        return ns

    def _make_ca(self) -> None:
        """One CA for every node: made once, copied into each node's state dir (the operator's step)."""
        ca_dir = os.path.join(self.dir, "ca")
        os.makedirs(ca_dir, mode=0o700)
        ensure_pki(ca_dir)
        for n in self.node_numbers:
            state = self.node_state(n)
            os.makedirs(state, mode=0o700)
            for name, mode in ((CA_FILE, 0o644), (CA_KEY, 0o600)):
                shutil.copyfile(os.path.join(ca_dir, name), os.path.join(state, name))
                os.chmod(os.path.join(state, name), mode)

    def add_user(self, user: str, hub: str = HUB) -> None:
        """The same user on every node (until a shared user store exists)."""
        pw = os.path.join(self.dir, "password")
        with open(pw, "w") as f:
            f.write(PASSWORD + "\n")
        for n in self.node_numbers:
            sevpn("hub", "user", "add", user, "--hub", hub, "--state-dir", self.node_state(n), "--password-file", pw)

    def fabric_up(self, n: int) -> str:
        """'sevpn fabric up' on node C{n}, as its boot-time unit would run it; its output."""
        return self.node_command(n, "fabric", "up", "--vtep", self.vtep(n), "--fabric", f"{HUB}={VNI}")

    def node_command(self, n: int, *args: str, check: bool = True) -> str:
        """The sevpn command, run in node C{n}'s namespace."""
        result = subprocess.run(["ip", "netns", "exec", self.node_ns(n), sys.executable, "-m", "sevpn.cli", *args],
                                capture_output=True, text=True, timeout=60, env=env())
        if check and result.returncode != 0:
            raise AssertionError(f"sevpn {' '.join(args)} on node {n} failed: {result.stderr.strip()}")
        return result.stdout if check else result

    def start_frr(self, n: int) -> FrrInstance:
        instance = self.frr[n] = FrrInstance(self.nodes[n], netns=self.node_ns(n))
        instance.start()
        return instance

    def start_node_hub(self, n: int, *extra: str) -> subprocess.Popen:
        state = self.node_state(n)
        stale = os.path.join(state, "control.sock")
        if os.path.exists(stale):
            os.unlink(stale)
        proc = self.hub_procs[n] = self.spawn(
            self.node_ns(n), f"hub{n}", os.path.join(BIN, "twistd"), "-n", "--pidfile=", "sevpn-hub",
            "--state-dir", state, "--listen", "tcp:5555", "--hostname", self.node_addr(n),
            "--fabric", f"{HUB}={VNI}", *extra,
        )
        wait_for(lambda: os.path.exists(stale) or proc.poll() is not None, 30, f"the hub on node {n} to start")
        if proc.poll() is not None:
            raise AssertionError(f"the hub on node {n} exited: {self.log(f'hub{n}')[-2000:]}")
        return proc

    def start_card_on_nodes(self, i: int, nodes: Sequence[int], user: Optional[str] = None) -> subprocess.Popen:
        """Card C{i} (user C{ui} unless C{user}), whose account lists nodes C{nodes} in order (tried in turn)."""
        more = [a for n in nodes[1:] for a in ("--hub", f"{self.node_addr(n)}:5555")]
        return self.start_card(i, user=user, hub=f"{self.node_addr(nodes[0])}:5555", extra=more)

    def converged(self) -> bool:
        """Every running node's sessions are up, it floods to every other running node, nothing disagrees."""
        running = [n for n in self.frr if self.frr[n].dir is not None]
        for n in running:
            view = self.frr[n].status(self.runner(n))
            if view["problems"] or len(view["segments"][0]["remote_vteps"]) != len(running) - 1:
                return False
        return True

    def wait_converged(self, timeout: float = 60) -> None:
        wait_for(self.converged, timeout, "the BGP-EVPN sessions and flood lists of the running nodes", interval=0.1)

    def evpn_macs(self, n: int) -> str:
        return self.frr[n].vtysh("show evpn mac vni all")

    def kill_node(self, n: int) -> None:
        """Node C{n} dies: its hub and its FRR are killed at once (SIGKILL)."""
        proc = self.hub_procs.pop(n, None)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        self.frr[n].kill()

    def revive_node(self, n: int) -> None:
        """Node C{n} back: FRR (its files cleaned up after the kill) and its hub started again."""
        self.frr[n].stop()
        self.start_frr(n)
        self.start_node_hub(n)

    # teardown ----------------------------------------------------------------

    def close(self) -> None:
        for instance in getattr(self, "frr", {}).values():
            instance.stop()
        super().close()


def wait_pings(topo: Topology, src: int, dst: int, timeout: float) -> float:
    """Seconds until card host C{src} gets a ping answer from card C{dst}'s address (one ping at a time)."""
    start = time.monotonic()
    while True:
        if topo.ping(src, dst, count=1, check=False):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"card {src} could not reach card {dst} within {timeout:g} s")
