"""
The card's interface: the addresses, MTU and DHCP client of its TAP.

A card owns its interface's configuration (C{--address}, C{--mtu},
C{--dhcp}, or the same fields of an account), so that a card restart, or
a persistent TAP that outlives it, leaves the interface as configured:

 - B{static addresses and the MTU are set when the card starts} (and when
   an account with its own is connected), not when the carrier comes up:
   the OS keeps addresses on an interface without carrier, so they are
   there for applications and routes at once, and a link that breaks and
   resumes (or a carrier bounce) does not touch them.  C{ip addr replace}
   is idempotent: a persistent TAP that kept them from the last run is
   left as it is.  The card removes only addresses it set itself and no
   longer wants (another account's); it never removes them when it stops,
   so a persistent TAP keeps them.
 - B{DHCP starts when the carrier first comes up}: C{dhclient} (ISC) runs
   on the TAP as the card's child, with its lease and pid files in the
   card's state dir, and the system's C{dhclient-script} sets what the
   lease says.  When the card stops it releases the lease (C{dhclient
   -r}), while the link to the hub is still up for the DHCPRELEASE.

Pure parts (L{InterfaceConfig}: parsing, merging, the C{ip} commands) are
plain code; commands run through L{ProcessRunner}, which spawns them on
the reactor (no blocking, no threads) and turns failures into sentences.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

Address = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]

MIN_MTU = 68
#: The largest MTU a TAP takes (and a plain frame the hub carries fits).
MAX_MTU = 65521
#: IPv6 needs links of at least this MTU (RFC 8200).
MIN_MTU_IPV6 = 1280
#: Output kept from one command, at most.
OUTPUT_LIMIT = 64 * 1024
DHCP_CLIENT = "dhclient"
#: Seconds the DHCP release may take when the card stops.
RELEASE_TIMEOUT = 5.0


class ConfigError(ValueError):
    """An interface setting that cannot work; the message is the sentence."""


class CommandFailed(Exception):
    """A command failed; the message says which and why."""


def parse_address(text: str, where: str = "--address") -> Address:
    """C{ADDRESS/PREFIX}, IPv4 or IPv6, as an interface address; L{ConfigError} otherwise."""
    text = str(text).strip()
    if "/" not in text:
        raise ConfigError(f"{where} {text}: give the prefix length too, e.g. 192.168.30.2/24 or fd00::2/64")
    try:
        address = ipaddress.ip_interface(text)
    except ValueError:
        raise ConfigError(f"{where} {text}: not an IPv4 or IPv6 address with a prefix length (ADDRESS/PREFIX)")
    ip = address.ip
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback:
        raise ConfigError(f"{where} {text}: a multicast, unspecified or loopback address cannot be an interface's")
    return address


def check_mtu(mtu: int, where: str = "--mtu") -> int:
    """C{mtu}, if it is a whole number from L{MIN_MTU} to L{MAX_MTU}; else a L{ConfigError} naming C{where}."""
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_MTU <= mtu <= MAX_MTU:
        raise ConfigError(f"{where} {mtu}: an MTU is {MIN_MTU} to {MAX_MTU} bytes")
    return mtu


@dataclass(frozen=True)
class InterfaceConfig:
    """What the card sets on its TAP."""

    addresses: Tuple[Address, ...] = ()
    mtu: Optional[int] = None
    dhcp: bool = False

    def check(self, mtu_where: str = "--mtu") -> "InterfaceConfig":
        """Itself, if it can work; L{ConfigError} naming C{mtu_where} if not."""
        if self.mtu is not None:
            check_mtu(self.mtu, mtu_where)
            if self.mtu < MIN_MTU_IPV6 and any(a.version == 6 for a in self.addresses):
                raise ConfigError(f"{mtu_where} {self.mtu}: IPv6 addresses need an MTU of at least {MIN_MTU_IPV6}")
        return self

    @classmethod
    def parse(cls, addresses: Iterable[str] = (), mtu: Optional[int] = None, dhcp: bool = False,
              where: str = "--address", mtu_where: str = "--mtu") -> "InterfaceConfig":
        """From option or account values; L{ConfigError} naming C{where}/C{mtu_where}."""
        parsed: List[Address] = []
        for text in addresses:
            address = parse_address(text, where)
            if address not in parsed:
                parsed.append(address)
        return cls(tuple(parsed), mtu, bool(dhcp)).check(mtu_where)

    def merged(self, other: "InterfaceConfig") -> "InterfaceConfig":
        """This (the card's) with C{other} (an account's): both sets of addresses, its MTU first, DHCP if either."""
        addresses = list(self.addresses) + [a for a in other.addresses if a not in self.addresses]
        return InterfaceConfig(tuple(addresses), other.mtu or self.mtu, self.dhcp or other.dhcp).check()

    def commands(self, device: str, drop: Iterable[Address] = ()) -> List[List[str]]:
        """The C{ip} commands that set this on C{device} (and remove C{drop})."""
        argv = []
        if self.mtu is not None:
            argv.append(["ip", "link", "set", "dev", device, "mtu", str(self.mtu)])
        for address in drop:
            if address not in self.addresses:
                argv.append(["ip", "addr", "del", str(address), "dev", device])
        for address in self.addresses:
            argv.append(["ip", "addr", "replace", str(address), "dev", device])
        return argv

    def describe(self) -> dict:
        return {"addresses": [str(a) for a in self.addresses], "mtu": self.mtu, "dhcp": self.dhcp}


# running commands on the reactor ---------------------------------------------------


class _Collect(ProcessProtocol):
    def __init__(self, argv: Sequence[str], done: Deferred) -> None:
        self.argv = argv
        self.done = done
        self.out = bytearray()
        self.err = bytearray()

    def outReceived(self, data: bytes) -> None:
        if len(self.out) < OUTPUT_LIMIT:
            self.out += data[: OUTPUT_LIMIT - len(self.out)]

    def errReceived(self, data: bytes) -> None:
        if len(self.err) < OUTPUT_LIMIT:
            self.err += data[: OUTPUT_LIMIT - len(self.err)]

    def processEnded(self, reason) -> None:
        """The command ended: its output if it succeeded, else a L{CommandFailed} quoting its last line of errors."""
        code = getattr(reason.value, "exitCode", None)
        if code == 0:
            self.done.callback(self.out.decode("utf-8", "replace"))
            return
        lines = self.err.decode("utf-8", "replace").strip().splitlines()
        why = lines[-1] if lines else (f"exit status {code}" if code is not None else "killed")
        self.done.errback(CommandFailed(f"'{' '.join(self.argv)}' failed: {why}"))


class ProcessRunner:
    """
    Runs commands on the reactor without blocking: C{run(argv)} is a
    Deferred that fires with the command's output or fails with
    L{CommandFailed} (a sentence).  A missing program is a sentence too.
    """

    def __init__(self, reactor, env: Optional[dict] = None) -> None:
        self.reactor = reactor
        self.env = dict(os.environ if env is None else env)

    def find(self, program: str) -> str:
        path = shutil.which(program, path=self.env.get("PATH", os.defpath) + ":/usr/sbin:/sbin")
        if path is None:
            raise CommandFailed(f"the {program} command is not installed")
        return path

    def run(self, argv: Sequence[str]) -> Deferred:
        """
        Run C{argv} to its end: a Deferred of its standard output (cut at
        L{OUTPUT_LIMIT}), or of a L{CommandFailed}.
        """
        done: Deferred = Deferred()
        try:
            path = self.find(argv[0])
        except CommandFailed as e:
            done.errback(e)
            return done
        self.reactor.spawnProcess(_Collect(argv, done), path, list(argv), env=self.env)
        return done

    def spawn(self, protocol: ProcessProtocol, argv: Sequence[str]):
        """Start a long-running program; its transport."""
        return self.reactor.spawnProcess(protocol, self.find(argv[0]), list(argv), env=self.env)


# the DHCP client ------------------------------------------------------------------------


class _DhcpProtocol(ProcessProtocol):
    def __init__(self, client: "DhcpClient") -> None:
        self.client = client
        self.buffer = b""

    def errReceived(self, data: bytes) -> None:
        self.buffer = (self.buffer + data)[-OUTPUT_LIMIT:]
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self.client.said(line.decode("utf-8", "replace").strip())

    outReceived = errReceived

    def processEnded(self, reason) -> None:
        self.client.ended(getattr(reason.value, "exitCode", None))


class DhcpClient:
    """
    ISC C{dhclient} on the card's TAP, as the card's child (C{-d}): its
    lease and pid files in the card's state dir.  L{stop} releases the
    lease and stops it.
    """

    log = Logger()

    def __init__(self, device: str, state_dir: str, runner: ProcessRunner, clock,
                 program: str = DHCP_CLIENT) -> None:
        self.device = device
        self.runner = runner
        self.clock = clock
        self.program = program
        self.pid_file = os.path.join(state_dir, f"dhclient.{device}.pid")
        self.lease_file = os.path.join(state_dir, f"dhclient.{device}.leases")
        self.process = None
        #: "off", "running", "bound", "stopped" or "failed".
        self.state = "off"
        self.address: Optional[str] = None
        self.error: Optional[str] = None
        self._ended: List[Deferred] = []

    def argv(self, *extra: str) -> List[str]:
        return [self.program, *extra, "-pf", self.pid_file, "-lf", self.lease_file, self.device]

    def start(self) -> None:
        """
        Start C{dhclient} in the foreground, unless it runs; a failure to
        start it is logged and shown in status, not raised.
        """
        if self.process is not None:
            return
        try:
            self.process = self.runner.spawn(_DhcpProtocol(self), self.argv("-d"))
        except (CommandFailed, OSError) as e:
            self.state, self.error = "failed", f"cannot run the DHCP client: {e}"
            self.log.error("card {tap}: {error}", tap=self.device, error=self.error)
            return
        self.state = "running"
        self.log.info("card {tap}: asking for an address by DHCP ({program})", tap=self.device, program=self.program)

    def said(self, line: str) -> None:
        """A line of the client's output: the lease it got is worth a log line."""
        if line.startswith("bound to "):
            self.address = line[len("bound to "):].split(" ", 1)[0]
            self.state = "bound"
            self.log.info("card {tap}: DHCP lease {address} ({line})", tap=self.device, address=self.address,
                          line=line[:120])

    def ended(self, code: Optional[int]) -> None:
        """
        The client exited: a failure (logged once) unless L{stop} asked for it;
        whoever waits in L{stop} is told.
        """
        self.process = None
        if self.state not in ("stopped",):
            self.state = "failed"
            self.error = f"the DHCP client exited (status {code})"
            self.log.warn("card {tap}: {error}", tap=self.device, error=self.error)
        waiters, self._ended = self._ended, []
        for d in waiters:
            d.callback(None)

    def stop(self, timeout: float = RELEASE_TIMEOUT) -> Deferred:
        """
        Release the lease (C{dhclient -r}, which also ends the running
        client); fires when the client is gone, at most C{timeout} seconds
        (and a moment) later.
        """
        process = self.process
        if process is None:
            return succeed(None)
        self.state = "stopped"
        ended: Deferred = Deferred()
        self._ended.append(ended)
        release = self.runner.run(self.argv("-r"))
        release.addTimeout(timeout, self.clock)
        release.addCallbacks(
            lambda _: self.log.info("card {tap}: DHCP lease released", tap=self.device),
            lambda failure: self.log.warn("card {tap}: releasing the DHCP lease failed: {why}", tap=self.device,
                                          why=failure.getErrorMessage() or "it took too long"),
        )

        def make_sure_it_ended(_):
            if self.process is process:
                self._signal(process, "TERM")
                ended.addTimeout(2, self.clock).addErrback(lambda _: self._signal(process, "KILL"))
            return ended

        return release.addCallback(make_sure_it_ended)

    @staticmethod
    def _signal(process, name: str) -> None:
        try:
            process.signalProcess(name)
        except Exception:  # ProcessExitedAlready: nothing to do
            pass

    def describe(self) -> dict:
        return {"state": self.state, "address": self.address, "error": self.error}


# the card's interface ----------------------------------------------------------------------


class CardInterface:
    """
    Keeps the card's TAP configured (see the module docstring): static
    settings when told (L{configure}), DHCP from the first carrier
    (L{carrier_changed}), the lease released at L{stop}.
    """

    log = Logger()

    def __init__(self, device: str, runner: ProcessRunner, dhcp: Callable[[], DhcpClient]) -> None:
        self.device = device
        self.runner = runner
        self.make_dhcp = dhcp
        self.config = InterfaceConfig()
        self.dhcp: Optional[DhcpClient] = None
        self.carrier = False
        #: Addresses this card set (it removes only these).
        self.applied: Tuple[Address, ...] = ()
        self.errors: List[str] = []

    def configure(self, config: InterfaceConfig) -> Deferred:
        """Set C{config} on the TAP: each command in turn; failures are logged sentences (and in status)."""
        previous, self.config = self.applied, config
        self.applied = config.addresses
        commands = config.commands(self.device, drop=previous)
        self.errors = []
        if self.dhcp is not None and not config.dhcp:
            self.dhcp.stop()
            self.dhcp = None
        elif config.dhcp and self.carrier:
            self._start_dhcp()
        d = succeed(None)
        for argv in commands:
            d.addCallback(lambda _, argv=argv: self.runner.run(argv))
            d.addErrback(self._failed)
        if commands:
            d.addCallback(lambda _: self._configured())
        return d

    def _failed(self, failure) -> None:
        failure.trap(CommandFailed)
        sentence = f"card {self.device}: cannot configure the interface: {failure.getErrorMessage()}"
        self.errors.append(sentence)
        self.log.error("{sentence}", sentence=sentence)

    def _configured(self) -> None:
        if self.errors:
            return
        parts = [str(a) for a in self.config.addresses]
        if self.config.mtu is not None:
            parts.append(f"MTU {self.config.mtu}")
        self.log.info("card {tap}: {what} set", tap=self.device, what=", ".join(parts))

    def carrier_changed(self, on: bool) -> None:
        self.carrier = on
        if on and self.config.dhcp:
            self._start_dhcp()

    def _start_dhcp(self) -> None:
        if self.dhcp is None:
            self.dhcp = self.make_dhcp()
        self.dhcp.start()

    def stop(self) -> Deferred:
        """The card stops: release the DHCP lease (static settings stay)."""
        dhcp, self.dhcp = self.dhcp, None
        return dhcp.stop() if dhcp is not None else succeed(None)

    def status(self) -> dict:
        """
        For C{sevpn nic status}: the interface's settings, the DHCP client's
        state, and the errors met setting them.
        """
        info = self.config.describe()
        info["dhcp_client"] = self.dhcp.describe() if self.dhcp is not None else None
        info["errors"] = list(self.errors)
        return info
