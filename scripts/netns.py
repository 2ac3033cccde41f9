"""
Test hosts for the system tests: network namespaces joined by veth pairs,
made by the tests themselves and removed afterwards, also on failure.

The topology mirrors the benchmark's: the hub in its own namespace, each
card host on a veth pair to it, no route anywhere else.  Traffic goes only
to addresses inside these namespaces.
"""

from __future__ import annotations

import hashlib
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
PASSWORD = "test-password"


def skip_reason() -> Optional[str]:
    if os.geteuid() != 0:
        return "system tests need root (they create network namespaces and TAP devices)"
    if not os.path.exists("/dev/net/tun"):
        return "system tests need /dev/net/tun"
    if shutil.which("ip") is None:
        return "system tests need iproute2's ip command"
    if shutil.which("ping") is None:
        return "system tests need ping (iputils-ping)"
    return None


def script_topology(script: str, hosts: int = 2) -> "Topology":
    """A topology for make demo and the benchmarks; exit 1 with the reason if none can be made."""
    reason = skip_reason() or (dnsmasq_unavailable() or dhclient_unavailable() if script == "demo" else None)
    if reason:
        print(f"{script}: cannot run: {reason}", file=sys.stderr)
        sys.exit(1)
    return Topology(hosts)


def env() -> Dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def sevpn(*args: str, check: bool = True, input: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run the sevpn command as a user would."""
    result = subprocess.run(
        [sys.executable, "-m", "sevpn.cli", *args], capture_output=True, text=True, env=env(), input=input,
        timeout=60,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"sevpn {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def two_cards(topo, hub_args=(), card_args=()):
    """Users u1 and u2, the hub, and a connected card on hosts 1 and 2."""
    topo.add_user("u1")
    topo.add_user("u2")
    topo.start_hub(*hub_args)
    for i in (1, 2):
        topo.start_card(i, extra=card_args)
        topo.wait_connected(i)


class Topology:
    """A hub namespace and card-host namespaces, each on its own veth."""

    #: The first letters of every namespace and device name.
    prefix = "sv"
    #: The first letters of the temporary directory's name.
    dir_prefix = "sevpn-system-"

    def __init__(self, hosts: int) -> None:
        reason = skip_reason()
        if reason:
            raise SkipTest(reason)
        self.tag = f"{self.prefix}{os.getpid() % 100000}{int(time.time() * 1000) % 1000}"
        self.dir = tempfile.mkdtemp(prefix=self.dir_prefix)
        self.hub_ns = f"{self.tag}-hub"
        self.hosts: List[str] = []
        self.processes: List[subprocess.Popen] = []
        self.namespaces: List[str] = []
        self.hub_proc: Optional[subprocess.Popen] = None
        self.cards: Dict[int, subprocess.Popen] = {}
        self.subnet = 200 + (os.getpid() % 50)
        try:
            self._ns(self.hub_ns)
            for i in range(1, hosts + 1):
                self.add_host(i)
        except Exception:
            self.close()
            raise

    # namespaces --------------------------------------------------------------

    def _ns(self, name: str) -> None:
        self.ip("netns", "add", name)
        self.namespaces.append(name)
        self.ip("-n", name, "link", "set", "lo", "up")

    def ip(self, *args: str) -> str:
        return self.run(None, "ip", *args)

    def run(self, ns: Optional[str], *cmd: str, check: bool = True, timeout: float = 120) -> str:
        full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
        result = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=env())
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(full)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def host(self, i: int) -> str:
        return f"{self.tag}-h{i}"

    def hub_addr(self, i: int) -> str:
        return f"10.{self.subnet}.{i}.1"

    def host_addr(self, i: int) -> str:
        return f"10.{self.subnet}.{i}.2"

    def tap_addr(self, i: int) -> str:
        return f"192.168.{self.subnet}.{i}"

    def hub_of(self, i: int) -> str:
        """The namespace of the hub card host C{i} is wired to."""
        return self.hub_ns

    def add_host(self, i: int) -> str:
        ns = self.host(i)
        hub_ns = self.hub_of(i)
        self._ns(ns)
        self.hosts.append(ns)
        hv = f"{self.tag}v{i}"[-15:]
        self.ip("link", "add", hv, "netns", hub_ns, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self.ip("-n", hub_ns, "addr", "add", f"{self.hub_addr(i)}/24", "dev", hv)
        self.ip("-n", ns, "addr", "add", f"{self.host_addr(i)}/24", "dev", "eth0")
        self.ip("-n", hub_ns, "link", "set", hv, "up")
        self.ip("-n", ns, "link", "set", "eth0", "up")
        return ns

    # processes ---------------------------------------------------------------

    def spawn(self, ns: str, name: str, *cmd: str) -> subprocess.Popen:
        log = open(os.path.join(self.dir, f"{name}.log"), "ab")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd], stdout=log, stderr=subprocess.STDOUT, env=env(),
            start_new_session=True,
        )
        log.close()
        self.processes.append(proc)
        return proc

    def log(self, name: str) -> str:
        try:
            with open(os.path.join(self.dir, f"{name}.log"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    @property
    def hub_state(self) -> str:
        return os.path.join(self.dir, "hub")

    def card_state(self, i: int) -> str:
        return os.path.join(self.dir, f"card{i}")

    def add_user(self, user: str, hub: str = "DEFAULT") -> None:
        pw = os.path.join(self.dir, "password")
        with open(pw, "w") as f:
            f.write(PASSWORD + "\n")
        if hub != "DEFAULT":
            sevpn("hub", "create", hub, "--state-dir", self.hub_state, check=False)
        sevpn("hub", "user", "add", user, "--hub", hub, "--state-dir", self.hub_state, "--password-file", pw)

    def start_hub(self, *extra: str, listen: Optional[str] = "tcp:5555") -> subprocess.Popen:
        """Start the hub (C{listen=None}: on its default listening address)."""
        hostnames = []
        for i in range(1, len(self.hosts) + 1):
            hostnames += ["--hostname", self.hub_addr(i)]
        stale = os.path.join(self.hub_state, "control.sock")
        if os.path.exists(stale):
            os.unlink(stale)
        self.hub_proc = self.spawn(
            self.hub_ns, "hub", os.path.join(BIN, "twistd"), "-n", "--pidfile=", "sevpn-hub",
            "--state-dir", self.hub_state, *(["--listen", listen] if listen else []), *hostnames, *extra,
        )
        wait_for(lambda: os.path.exists(os.path.join(self.hub_state, "control.sock")), 30, "the hub to start")
        return self.hub_proc

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def start_card(self, i: int, user: Optional[str] = None, connect: bool = True, hub_name: str = "DEFAULT",
                   hub: Optional[str] = None,
                   password_file: Optional[str] = None, extra=()) -> subprocess.Popen:
        args = [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "sevpn-nic", "--state-dir", self.card_state(i),
                "--tap", "sv0"]
        if connect:
            args += ["--hub", hub or f"{self.hub_addr(i)}:5555", "--hub-name", hub_name, "--user", user or f"u{i}",
                     "--password-file", password_file or os.path.join(self.dir, "password"),
                     "--ca-file", self.ca_file(i)]
        stale = os.path.join(self.card_state(i), "control.sock")
        if os.path.exists(stale):
            os.unlink(stale)
        proc = self.cards[i] = self.spawn(self.host(i), f"card{i}", *args, *extra)
        ns = self.host(i)
        wait_for(lambda: os.path.exists(os.path.join(self.card_state(i), "control.sock")) or proc.poll() is not None,
                 30, f"card {i} to start")
        if proc.poll() is not None:
            raise AssertionError(f"card {i} exited: {self.log(f'card{i}')[-2000:]}")
        self.run(ns, "ip", "addr", "replace", f"{self.tap_addr(i)}/24", "dev", "sv0")
        return proc

    def ca_file(self, i: int) -> str:
        """The CA certificate of the hub card C{i} dials."""
        return os.path.join(self.hub_state, "ca.pem")

    def card_status(self, i: int) -> dict:
        return json.loads(sevpn("nic", "status", "--json", "--state-dir", self.card_state(i)).stdout)

    def hub_sessions(self) -> list:
        return json.loads(sevpn("hub", "sessions", "--json", "--state-dir", self.hub_state).stdout)

    def carrier(self, i: int) -> str:
        return self.run(self.host(i), "cat", "/sys/class/net/sv0/carrier", check=False).strip()

    def wait_connected(self, i: int, timeout: float = 30) -> dict:
        return wait_for(lambda: (lambda s: s if s["state"] == "connected" else None)(self.card_status(i)),
                        timeout, f"card {i} to connect (log: {self.log(f'card{i}')[-1500:]})")

    def ping(self, src: int, dst: int, count: int = 3, check: bool = True) -> bool:
        out = subprocess.run(
            ["ip", "netns", "exec", self.host(src), "ping", "-c", str(count), "-i", "0.2", "-W", "2",
             self.tap_addr(dst)], capture_output=True, text=True, timeout=60,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"ping {src}->{dst} failed: {out.stdout[-500:]}\n"
                                 f"card{src}: {self.log(f'card{src}')[-1500:]}\nhub: {self.log('hub')[-1500:]}")
        return out.returncode == 0

    # teardown ----------------------------------------------------------------

    def close(self) -> None:
        for proc in reversed(self.processes):
            try:
                self.stop(proc)
            except (ProcessLookupError, PermissionError):
                pass
        for ns in self.namespaces:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces = []
        if os.environ.get("SEVPN_KEEP_LOGS"):
            print(f"system test logs kept in {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def transfer(topo, src: int, dst: int, size_mb: int, rate: float = 0):
    """Start a TCP transfer of random data from card host src to dst."""
    data = os.path.join(topo.dir, f"data-{size_mb}")
    if not os.path.exists(data):
        with open(data, "wb") as f:
            for _ in range(size_mb):
                f.write(os.urandom(1 << 20))
    report = os.path.join(topo.dir, f"report-{time.monotonic_ns()}.json")
    port = "7001"
    server = topo.spawn(topo.host(dst), "transfer-serve", sys.executable, "-m", "scripts.transfer", "serve",
                        topo.tap_addr(dst), port, report)
    time.sleep(0.5)
    sender = topo.spawn(topo.host(src), "transfer-send", sys.executable, "-m", "scripts.transfer", "send",
                        topo.tap_addr(dst), port, data, str(rate))
    return data, report, server, sender


def transfer_result(topo, data, report, server, sender, timeout=180):
    assert sender.wait(timeout) == 0, topo.log("transfer-send")
    server.wait(30)
    with open(report) as f:
        result = json.load(f)
    return result, sha256_file(data)


# -- entering a namespace from this process, and a LAN behind a hub (local bridges) --


class _Setns:
    """libc's setns(2), resolved once (Python 3.11 has no os.setns)."""

    CLONE_NEWNET = 0x40000000

    def __init__(self) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)

    def __call__(self, fd: int) -> None:
        import ctypes

        if self._libc.setns(fd, self.CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))


class in_netns:
    """
    C{with in_netns(NAME):} the calling thread is in network namespace
    NAME; sockets and TAP devices opened inside stay there after it
    leaves.  For tests that run a port in this process on a real veth.
    """

    _setns = None

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self):
        if in_netns._setns is None:
            in_netns._setns = _Setns()
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
        try:
            in_netns._setns(target)
        finally:
            os.close(target)
        return self

    def __exit__(self, *exc) -> None:
        try:
            in_netns._setns(self._home)
        finally:
            os.close(self._home)


def dnsmasq_unavailable() -> Optional[str]:
    if shutil.which("dnsmasq") is None:
        return "needs dnsmasq (apt-get install dnsmasq-base)"
    return None


def dhclient_unavailable() -> Optional[str]:
    if shutil.which("dhclient") is None:
        return "needs dhclient (apt-get install isc-dhcp-client)"
    return None


class Lan:
    """
    A real LAN behind the hub, for local bridges: namespace LAN with a
    Linux bridge C{br0} (the LAN's router, C{.1} or C{router}, where dnsmasq hands out
    C{.100}-C{.150}), a host behind the bridge (C{.10}), and a veth from
    the hub's namespace into the bridge, without an address, for
    C{--bridge DEFAULT=<hub_if>}.  Its namespaces belong to the topology
    (removed with it); L{close} removes what it adds outside namespaces.
    """

    def __init__(self, topo: Topology, prefix: str = "10.77.0", dhcp: bool = True, router: int = 1) -> None:
        self.topo = topo
        self.tag = "tb" + topo.tag[2:]
        self.prefix = prefix
        self.ns = f"{self.tag}-lan"
        self.host_ns = f"{self.tag}-lh"
        self.hub_if = f"{self.tag}l"[:15]
        self.router = f"{prefix}.{router}"
        self.host = f"{prefix}.10"
        self._etc: List[str] = []
        topo._ns(self.ns)
        topo._ns(self.host_ns)
        ip = topo.ip
        ip("-n", self.ns, "link", "add", "br0", "type", "bridge")
        ip("-n", self.ns, "addr", "add", f"{self.router}/24", "dev", "br0")
        ip("-n", self.ns, "link", "set", "br0", "up")
        ip("link", "add", "h0", "netns", self.ns, "type", "veth", "peer", "name", "eth0", "netns", self.host_ns)
        ip("link", "add", "hub0", "netns", self.ns, "type", "veth", "peer", "name", self.hub_if, "netns",
           topo.hub_ns)
        for port in ("h0", "hub0"):
            ip("-n", self.ns, "link", "set", port, "master", "br0", "up")
        ip("-n", self.host_ns, "addr", "add", f"{self.host}/24", "dev", "eth0")
        ip("-n", self.host_ns, "link", "set", "eth0", "up")
        ip("-n", topo.hub_ns, "link", "set", self.hub_if, "up")
        self.dnsmasq = None
        if dhcp:
            self.dnsmasq = topo.spawn(
                self.ns, "dnsmasq", "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
                "--interface=br0", "--bind-interfaces", "--user=root", "--pid-file=", "--log-facility=-",
                "--log-dhcp", "--dhcp-authoritative", f"--dhcp-range={prefix}.100,{prefix}.150,255.255.255.0,10m",
                f"--dhcp-leasefile={os.path.join(topo.dir, 'dnsmasq.leases')}",
            )

    def mac(self, ns: str, dev: str = "eth0") -> str:
        return json.loads(self.topo.run(ns, "ip", "-j", "link", "show", dev))[0]["address"]

    def own_etc(self, ns: str) -> None:
        """
        Give namespace C{ns} its own /etc/resolv.conf (C{ip netns exec}
        mounts /etc/netns/NS/ over /etc), so a DHCP client there never
        writes the machine's.
        """
        path = f"/etc/netns/{ns}"
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "resolv.conf"), "w"):
            pass
        self._etc.append(path)

    def close(self) -> None:
        for path in self._etc:
            shutil.rmtree(path, ignore_errors=True)
        self._etc = []


def start_card_on(topo: Topology, i: int, tap: str, *extra: str, user: Optional[str] = None) -> subprocess.Popen:
    """
    Card C{i} on TAP C{tap}, connecting at start, with C{extra} options
    (its interface settings are its own: no address is set for it).
    """
    args = [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "sevpn-nic", "--state-dir", topo.card_state(i),
            "--tap", tap, "--hub", f"{topo.hub_addr(i)}:5555", "--user", user or f"u{i}",
            "--password-file", os.path.join(topo.dir, "password"), "--ca-file", os.path.join(topo.hub_state, "ca.pem"),
            *extra]
    stale = os.path.join(topo.card_state(i), "control.sock")
    if os.path.exists(stale):
        os.unlink(stale)
    proc = topo.cards[i] = topo.spawn(topo.host(i), f"card{i}", *args)
    wait_for(lambda: os.path.exists(stale) or proc.poll() is not None, 30, f"card {i} to start")
    if proc.poll() is not None:
        raise AssertionError(f"card {i} exited: {topo.log(f'card{i}')[-2000:]}")
    return proc


def link(topo: Topology, ns: str, dev: str) -> dict:
    """C{ip -j -d addr show DEV} in C{ns} (flags, master, addresses), or {} if there is no such device."""
    out = topo.run(ns, "ip", "-j", "-d", "addr", "show", "dev", dev, check=False).strip()
    return json.loads(out)[0] if out.startswith("[{") else {}


def addresses(topo: Topology, ns: str, dev: str) -> List[str]:
    return [f"{a['local']}/{a['prefixlen']}" for a in link(topo, ns, dev).get("addr_info", [])
            if a.get("scope") != "link"]
