"""
Real proxies and a real TLS echo server on loopback, for tests/test_proxy.py.

Each proxy is the program users run: tinyproxy (HTTP CONNECT), dante's
danted (SOCKS5) and squid (HTTP CONNECT), started in the foreground with
a config file in the test's temp dir, on a free 127.0.0.1 port, in a
process group of its own, and stopped (the group, by its id) by the
test's cleanup, which trial runs also when the test fails.  They need root
(they drop to C{nobody}/C{proxy} themselves; dante checks system
passwords); without root or without the program, the test is skipped with
the reason.  C{make test} installs them (Debian: tinyproxy, dante-server,
squid).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from typing import Iterable, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest

from sevpn.pki import ensure_pki, server_tls_options
from sevpn.tls import TLSFactory

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 and ::1 right now."""
    for _ in range(50):
        with socket.socket() as s4, socket.socket(socket.AF_INET6) as s6:
            s4.bind((LOOPBACK, 0))
            port = s4.getsockname()[1]
            try:
                s6.bind(("::1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port on loopback")


#: The Debian packages of the programs the tests run.
_PACKAGES = {"danted": "dante-server", "useradd": "passwd", "userdel": "passwd", "chpasswd": "passwd"}


def program(name: str) -> str:
    """The program's path; the test is skipped (saying why) without root or without it."""
    if os.geteuid() != 0:
        raise SkipTest(f"{name} runs as root in these tests (it drops privileges itself); not root")
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        package = _PACKAGES.get(name, name)
        raise SkipTest(f"{name} is not installed (Debian: apt-get install {package}; make test installs it)")
    return path


class RunningProgram:
    """A program in its own process group, its output in a log file."""

    def __init__(self, testcase, argv, directory: str, name: str) -> None:
        self.name = name
        self.log_path = os.path.join(directory, name + ".log")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=directory, start_new_session=True)
        testcase.addCleanup(self.stop)

    def log(self, limit: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-limit:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.process.pid, sig)  # the group this test started, by its id
            except ProcessLookupError:
                return
            try:
                self.process.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        # the children of a forking server (dante) leave with their parent;
        # make sure none of the group lingers
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    @inlineCallbacks
    def wait_listening(self, port: int, host: str = LOOPBACK, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with status {self.process.returncode}:\n{self.log()}")
            try:
                socket.create_connection((host, port), timeout=0.5).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not listen on {host}:{port} within {timeout:g} s:\n{self.log()}")
            yield deferLater(reactor, 0.05, lambda: None)


@inlineCallbacks
def start_tinyproxy(testcase, directory: str, connect_ports: Iterable[int], auth: Optional[tuple] = None):
    """tinyproxy on 127.0.0.1, allowing CONNECT to C{connect_ports} only; C{auth}: (user, password)."""
    path = program("tinyproxy")
    port = free_port()
    lines = [
        # as root it must be told whom to run as
        "User nobody", "Group nogroup",
        f"Port {port}", f"Listen {LOOPBACK}", "Timeout 60", "MaxClients 50",
        "LogLevel Info", f"Allow {LOOPBACK}", "DisableViaHeader Yes",
    ]
    # Without any ConnectPort line tinyproxy allows CONNECT to every port.
    lines += [f"ConnectPort {p}" for p in connect_ports]
    if auth is not None:
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    config = os.path.join(directory, "tinyproxy.conf")
    with open(config, "w") as f:
        f.write("\n".join(lines) + "\n")
    # -d: the foreground, logging to stderr (no LogFile, no PidFile)
    proxy = RunningProgram(testcase, [path, "-d", "-c", config], directory, "tinyproxy")
    yield proxy.wait_listening(port)
    proxy.port = port
    return proxy


@inlineCallbacks
def start_danted(testcase, directory: str, method: str = "none", blocked_ports: Iterable[int] = (),
                 internal: str = LOOPBACK):
    """
    danted (SOCKS5) listening on C{internal}, connecting out from the
    loopback interface (both families: a host name may resolve to ::1);
    C{method} C{"username"} checks system accounts' passwords.
    """
    path = program("danted")
    port = free_port()
    lines = [
        "logoutput: stderr",
        f"internal: {internal} port = {port}",
        # dante must be told where connections leave from; "lo" gives it
        # 127.0.0.1 and ::1
        "external: lo",
        f"socksmethod: {method}",
        "clientmethod: none",
        # root to read /etc/shadow for "username"; nobody for the rest
        "user.privileged: root",
        "user.unprivileged: nobody",
        "client pass { from: 127.0.0.0/8 to: 0/0 }",
        "client pass { from: ::1/128 to: 0/0 }",
    ]
    lines += [f"socks block {{ from: 0/0 to: 0/0 port = {p} }}" for p in blocked_ports]
    lines += [
        "socks pass { from: 127.0.0.0/8 to: 0/0 command: connect }",
        "socks pass { from: ::1/128 to: 0/0 command: connect }",
    ]
    config = os.path.join(directory, "danted.conf")
    with open(config, "w") as f:
        f.write("\n".join(lines) + "\n")
    # no -D: the foreground; -p: not the system's /run/danted.pid; -N 1: one process to accept
    proxy = RunningProgram(testcase, [path, "-f", config, "-p", os.path.join(directory, "danted.pid"), "-N", "1"],
                           directory, "danted")
    yield proxy.wait_listening(port, internal)
    proxy.port = port
    return proxy


@inlineCallbacks
def start_squid(testcase, directory: str, connect_ports: Iterable[int], auth: Optional[tuple] = None):
    """
    squid on 127.0.0.1, allowing CONNECT to C{connect_ports} only, caching
    nothing; C{auth}: (user, password), checked by squid's own
    basic_ncsa_auth helper against an htpasswd file (hashed by openssl).
    """
    path = program("squid")
    port = free_port()
    # squid drops to the "proxy" user and then writes its log and pid there
    squid_dir = os.path.join(directory, "squid")
    os.mkdir(squid_dir)
    shutil.chown(squid_dir, "proxy")
    os.chmod(directory, 0o711)
    ports = " ".join(str(p) for p in connect_ports)
    access = ["http_access allow local"]
    if auth is not None:
        helper = "/usr/lib/squid/basic_ncsa_auth"
        if not os.path.exists(helper):
            raise SkipTest(f"squid's {helper} is not installed")
        hashed = subprocess.run([program("openssl"), "passwd", "-apr1", "-stdin"], input=auth[1].encode(),
                                capture_output=True, check=True).stdout.decode().strip()
        passwords = os.path.join(squid_dir, "passwd")
        with open(passwords, "w") as f:
            f.write(f"{auth[0]}:{hashed}\n")
        shutil.chown(passwords, "proxy")
        access = [f"auth_param basic program {helper} {passwords}", "auth_param basic realm sevpn test",
                  "acl authenticated proxy_auth REQUIRED", "http_access allow local authenticated"]
    lines = [
        f"http_port {LOOPBACK}:{port}",
        f"pid_filename {squid_dir}/squid.pid",
        f"cache_log {squid_dir}/cache.log",
        f"coredump_dir {squid_dir}",
        "access_log none",
        "cache deny all",
        "cache_mem 8 MB",
        "pinger_enable off",  # no ICMP probes of anything
        "shutdown_lifetime 0 seconds",
        "acl local src 127.0.0.1/32",
        f"acl tunnel_ports port {ports}",
        "acl CONNECT method CONNECT",
        "http_access deny CONNECT !tunnel_ports",
        *access,
        "http_access deny all",
    ]
    config = os.path.join(directory, "squid.conf")
    with open(config, "w") as f:
        f.write("\n".join(lines) + "\n")
    # -N: the foreground, no worker processes
    proxy = RunningProgram(testcase, [path, "-N", "-f", config], directory, "squid")
    yield proxy.wait_listening(port)
    proxy.port = port
    return proxy


def system_user(testcase, password: str) -> str:
    """
    A throwaway system account (dante's C{username} method checks
    /etc/passwd and /etc/shadow), removed by the test's cleanup.
    """
    for tool in ("useradd", "userdel", "chpasswd"):
        program(tool)
    name = "pxsocks" + secrets.token_hex(4)
    _retry_locked([program("useradd"), "--no-create-home", "--no-user-group", "--home-dir", "/nonexistent",
                   "--shell", "/usr/sbin/nologin", name])
    testcase.addCleanup(_retry_locked, [program("userdel"), name])
    subprocess.run([program("chpasswd")], input=f"{name}:{password}\n".encode(), check=True, capture_output=True)
    return name


def _retry_locked(argv) -> None:
    """Run an account tool, waiting out another process's lock on /etc/passwd."""
    for attempt in range(50):
        done = subprocess.run(argv, capture_output=True)
        if done.returncode == 0:
            return
        if b"lock" not in done.stderr:
            break
        time.sleep(0.1)
    raise AssertionError(f"{' '.join(argv)} failed: {done.stderr.decode(errors='replace').strip()}")


class _Echo(Protocol):
    def connectionMade(self):
        self.factory.open.add(self)
        self.gone = Deferred()

    def dataReceived(self, data):
        self.factory.received += len(data)
        self.transport.write(bytes(data))

    def connectionLost(self, reason):
        self.factory.open.discard(self)
        self.gone.callback(None)


def _close_all(factory):
    """The server's side of what the test left open (the proxy may not have closed it yet)."""
    waits = []
    for echo in list(factory.open):
        echo.transport.abortConnection()
        waits.append(echo.gone)
    return gatherResults(waits)


@inlineCallbacks
def start_tls_echo(testcase, directory: str):
    """
    A TLS echo server (the hub's TLS: sevpn.pki's CA and certificate for
    localhost and 127.0.0.1, sevpn.tls's TLS) on 127.0.0.1 and ::1.

    @return: (port, CA file, factory); C{factory.received} counts the
        application bytes that reached the server.
    """
    cert, key = ensure_pki(os.path.join(directory, "pki"))
    factory = Factory.forProtocol(_Echo)
    factory.received = 0
    factory.open = set()
    testcase.addCleanup(_close_all, factory)
    tls = TLSFactory(server_tls_options(cert, key), False, factory)
    for _ in range(20):
        port = free_port()
        try:
            v4 = yield TCP4ServerEndpoint(reactor, port, interface=LOOPBACK).listen(tls)
        except Exception:
            continue
        testcase.addCleanup(v4.stopListening)
        try:
            v6 = yield TCP6ServerEndpoint(reactor, port, interface="::1").listen(tls)
        except Exception:
            continue
        testcase.addCleanup(v6.stopListening)
        return port, os.path.join(directory, "pki", "ca.pem"), factory
    raise AssertionError("no free port for the echo server")
