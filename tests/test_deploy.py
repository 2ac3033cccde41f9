"""
The README's section "Deploy: one hub, two cards", followed as written: the
test reads the section's fenced code blocks and runs their commands on
three test machines (a hub and two card hosts, each a network namespace)
with the launchers `make install-system` installed, and fails when the
README's commands stop working.

What a test machine cannot do literally is substituted, and only that:

 - `make install-system` ("on every machine") is one staged installation
   (L{tests.staging}, shared with test_units) that every machine sees at
   the installed paths.
 - Every command runs in its machine's network namespace and in a private
   mount namespace of its own, where the paths the README names
   (/var/lib/sevpn, /etc/default, /etc/sevpn, /opt/sevpn, /usr/local/bin,
   /etc/hosts) are bind mounts of that machine's temporary directories, so
   nothing touches this host's files.  Where such a path does not exist
   here, its mount point is made in a read-only overlay of the nearest
   parent that exists, whose added layer lies in the temporary directory.
 - systemd is not PID 1 here, so `systemctl enable --now UNIT` runs the
   installed unit's ExecStart= the way systemd would (L{tests.systemd}:
   specifiers, EnvironmentFile= word-split into $SEVPN_HUB_ARGS,
   StateDirectory=, UMask=, a clean environment) with NOTIFY_SOCKET on a
   socket the test binds; the unit has started when READY=1 arrives from
   its main process (the hub: listening; the card: its TAP exists).
   The hub runs as root: the unit's User=sevpn names a user the staged
   installation does not make.
 - `vpn.example.org` (the host the cards dial) is the hub's address on each
   card host's veth, through that machine's /etc/hosts.
 - `ping` runs until three replies arrive, then gets Ctrl-C (SIGINT), as a
   user stops it.

Steps the README leaves to the operator are done here explicitly: the
password files the commands name (alice.pw, bob.pw: one password per file
name, on the hub and on the card that uses it), and copying the hub's CA
certificate (the file `sevpn hub ca` names) to the path the card's
`--ca-file` names.

The card block is alice's; "bob's the same with his name and address": the
test derives bob's commands from alice's by swapping her name for the other
user the hub block adds, and her `--address` for the address her `ping`
dials (so bob pings alice).  Each card's `ping` runs once both cards'
other commands have run.

Then it checks what a user would: every command exits 0 (so `sevpn nic
connect ... --wait` saw its card connected), each TAP carries the address
its account was given with --address, the pings are answered, and the
fingerprint `sevpn hub ca` prints is the one `sevpn account add` printed
on each card.

SEVPN_DEPLOY_README=PATH follows another copy of the README (to check that
a broken section fails this test).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from scripts.netns import REPO, Topology
from tests.staging import PREFIX, Staged, staging_unavailable
from tests.systemd import (
    DEFAULT_PATH, STATE_ROOT, NotifySocket, UnitFile, Unsupported, environment_file, exec_argv, seconds, unit_name,
)

SECTION = "## Deploy: one hub, two cards"
#: The labels of the section's blocks: the bold words leading the paragraph before each.
HUB_BLOCK, CARD_BLOCK = "The hub", "Each card"
#: Where `make install-system` puts the units and links the commands (the Makefile's UNITDIR, BINDIR).
UNITDIR, BINDIR = "/etc/systemd/system", "/usr/local/bin"
#: The paths the README's commands and the units use, each a directory of the machine's own (or the staged install's).
MACHINE_PATHS = ("/var/lib/sevpn", "/etc/default", "/etc/sevpn")
#: A root login's environment (the operator's shell).
OPERATOR_ENV = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "LOGNAME": "root", "USER": "root"}
PING_REPLIES = 3


def readme_path() -> str:
    return os.environ.get("SEVPN_DEPLOY_README") or os.path.join(REPO, "README.md")


# -- reading the README --------------------------------------------------------------------------


def section(text: str, heading: str = SECTION) -> str:
    """The text of the section under C{heading}, up to the next heading of its level or above."""
    lines = text.splitlines()
    try:
        start = lines.index(heading)
    except ValueError:
        raise AssertionError(f"the README has no section {heading!r}")
    level = len(heading.split()[0])
    end, fenced = len(lines), False
    for i in range(start + 1, len(lines)):
        if lines[i].strip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,%d} " % level, lines[i]):
            end = i
            break
    return "\n".join(lines[start + 1:end])


def code_blocks(text: str) -> Dict[str, List[str]]:
    """
    The fenced code blocks of a section by the bold words leading the
    paragraph before each (C{**The hub** (...)} labels the next block
    C{"The hub"}), each block as its commands: lines joined where one ends
    with a backslash.
    """
    blocks: Dict[str, List[str]] = {}
    label, inside, commands, pending = None, False, [], ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            if inside:
                if label is None:
                    raise AssertionError("a code block in the deploy section has no bold lead before it")
                if label in blocks:
                    raise AssertionError(f"two code blocks follow {label!r}")
                blocks[label] = commands
                label, commands = None, []
            inside = not inside
            continue
        if inside:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1].rstrip() + " "
                continue
            command, pending = (pending + line.strip()).strip(), ""
            if command and not command.startswith("#"):
                commands.append(command)
        else:
            lead = re.match(r"\*\*([^*]+)\*\*", line.strip())
            if lead:
                label = lead.group(1).strip()
    if inside:
        raise AssertionError("a code block in the deploy section is not closed")
    return blocks


def option(argv: List[str], name: str) -> Optional[str]:
    """The value of C{--name VALUE} or C{--name=VALUE} in a command, or None."""
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def find(commands: List[str], *start: str) -> List[List[str]]:
    """The argument vectors of the commands that begin with the words C{start}."""
    found = []
    for command in commands:
        argv = shlex.split(command)
        if argv[:len(start)] == list(start):
            found.append(argv)
    return found


def the(commands: List[str], *start: str) -> List[str]:
    found = find(commands, *start)
    if len(found) != 1:
        raise AssertionError(f"expected one '{' '.join(start)}' command in the deploy section, found {len(found)}")
    return found[0]


def swap(commands: List[str], pairs: Dict[str, str]) -> List[str]:
    """C{commands} with every whole-word occurrence of a key and of a value of C{pairs} swapped for the other."""
    table = dict(pairs, **{v: k for k, v in pairs.items()})
    pattern = re.compile(r"(?<![\w.])(" + "|".join(re.escape(k) for k in sorted(table, key=len, reverse=True))
                         + r")(?![\w]|\.\d)")
    return [pattern.sub(lambda m: table[m.group(1)], command) for command in commands]


@dataclass
class CardPlan:
    """One card host's commands and what a user expects of them."""

    user: str
    commands: List[str]
    address: str  # the --address of its account, a.b.c.d/len
    tap: str
    ca_file: str
    hub_host: str
    hub_port: int

    @classmethod
    def of(cls, user: str, commands: List[str]) -> "CardPlan":
        """The card of C{user} that C{commands} set up."""
        add = the(commands, "sevpn", "account", "add")
        host, _, port = (option(add, "--hub") or "").rpartition(":")
        if not host or not port.isdigit():
            raise AssertionError(f"the card's 'sevpn account add' has no --hub HOST:PORT: {add}")
        if not option(add, "--tap") or not option(add, "--ca-file"):
            raise AssertionError(f"the card's 'sevpn account add' has no --tap or no --ca-file: {add}")
        return cls(user=user, commands=commands, address=option(add, "--address"), tap=option(add, "--tap"),
                   ca_file=option(add, "--ca-file"), hub_host=host.strip("[]"), hub_port=int(port))


@dataclass
class Plan:
    hub: List[str]
    cards: List[CardPlan] = field(default_factory=list)

    @classmethod
    def from_readme(cls, text: str) -> "Plan":
        """The hub's commands, alice's as written, and bob's derived from hers as the README says."""
        body = section(text)
        if "`make install-system`" not in body:
            raise AssertionError("the deploy section no longer says to run `make install-system` on every machine")
        blocks = code_blocks(body)
        missing = {HUB_BLOCK, CARD_BLOCK} - set(blocks)
        if missing:
            raise AssertionError(f"the deploy section has no code block after {sorted(missing)} "
                                 f"(blocks: {sorted(blocks)})")
        plan = cls(hub=blocks[HUB_BLOCK])
        first = blocks[CARD_BLOCK]
        add = the(first, "sevpn", "account", "add")
        user, address = option(add, "--user"), option(add, "--address")
        if not user or not address:
            raise AssertionError(f"the card's 'sevpn account add' gives no --user or no --address: {add}")
        peers = [argv[-1] for argv in find(first, "ping")]
        if len(peers) != 1:
            raise AssertionError(f"expected one 'ping ADDRESS' in the card's block, found {peers}")
        others = [argv[4] for argv in find(plan.hub, "sevpn", "hub", "user", "add") if argv[4] != user]
        if len(others) != 1:
            raise AssertionError(f"expected the hub block to add {user} and one more user, found others {others}")
        own = address.split("/")[0]
        if ipaddress.ip_address(peers[0]) not in ipaddress.ip_interface(address).network or peers[0] == own:
            raise AssertionError(f"{user}'s card pings {peers[0]}, which is not another address in {address}")
        plan.cards.append(CardPlan.of(user, first))
        plan.cards.append(CardPlan.of(others[0], swap(first, {user: others[0], own: peers[0]})))
        return plan


# -- the machines ----------------------------------------------------------------------------------


def mount_plan(paths: Dict[str, str], layers: str, exists=os.path.lexists) -> List[List[str]]:
    """
    The mount commands that make each path in C{paths} (a directory or a
    file) show the source C{paths} maps it to, for a private mount
    namespace: a bind mount.  Where the path does not exist on this host,
    its mount point is made in a read-only overlay of its nearest existing
    parent, whose top layer (a directory under C{layers}) holds just that
    mount point: the host's own tree is never written.
    """
    overlays: Dict[str, str] = {}
    binds = []
    for target, source in sorted(paths.items(), key=lambda item: item[0].count("/")):
        if not exists(target):
            parent = os.path.dirname(target)
            while not exists(parent):
                parent = os.path.dirname(parent)
            if parent == "/":
                raise AssertionError(f"cannot make a mount point for {target}: no parent of it but / exists here")
            layer = overlays.setdefault(parent, os.path.join(layers, parent.strip("/").replace("/", "-")))
            point = os.path.join(layer, os.path.relpath(target, parent))
            if os.path.isdir(source):
                os.makedirs(point, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(point), exist_ok=True)
                open(point, "a").close()
        binds.append(["mount", "--bind", source, target])
    for parent, layer in overlays.items():
        os.makedirs(layer, exist_ok=True)
        if any(c in layer + parent for c in ",:"):
            raise AssertionError(f"an overlay layer path may not contain ',' or ':': {layer}")
        for other in paths:
            if parent.startswith(other.rstrip("/") + "/"):
                raise AssertionError(f"{parent} needs an overlay but lies under the bind mount {other}")
    overlay_commands = [["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={layer}:{parent}", parent]
                        for parent, layer in sorted(overlays.items())]
    return overlay_commands + binds


@dataclass
class Service:
    unit: str
    process: subprocess.Popen
    notify: NotifySocket
    log: str
    #: What it said with READY=1 (systemctl status shows it).
    status: str = ""


class Machine:
    """
    A test machine: a network namespace of the topology, and in a fresh
    private mount namespace per command, the installed sevpn (the staged
    one) and directories of its own at the paths the README names.  The
    operator works as root in a home directory of the machine's.
    """

    def __init__(self, topo: Topology, ns: str, name: str, staged: Staged, hosts: Optional[str] = None) -> None:
        self.topo, self.ns, self.name, self.staged = topo, ns, name, staged
        self.dir = os.path.join(topo.dir, name)
        self.home = os.path.join(self.dir, "root")
        os.makedirs(self.home)
        paths = {PREFIX: staged.path(PREFIX), BINDIR: staged.path(BINDIR)}
        for path in MACHINE_PATHS:
            paths[path] = os.path.join(self.dir, path.strip("/").replace("/", "-"))
            os.makedirs(paths[path])
        # `make install-system` on this machine installed the defaults files.
        for entry in os.listdir(staged.path("/etc/default")):
            shutil.copy(staged.path("/etc/default", entry), paths["/etc/default"])
        if hosts is not None:
            paths["/etc/hosts"] = os.path.join(self.dir, "hosts")
            with open("/etc/hosts") as f, open(paths["/etc/hosts"], "w") as out:
                out.write(f.read().rstrip("\n") + "\n" + hosts)
        self.paths = paths
        self.mounts = mount_plan(paths, os.path.join(self.dir, "layers"))
        self.transcript: List[str] = []
        self.services: List[Service] = []

    def command(self, argv: List[str], cwd: str, umask: str = "0022") -> List[str]:
        script = "\n".join(["set -e", *(shlex.join(m) for m in self.mounts), f"umask {umask}",
                            f"cd {shlex.quote(cwd)}", 'exec "$@"'])
        return [shutil.which("ip"), "netns", "exec", self.ns, shutil.which("unshare"), "--mount",
                "--propagation", "private", "sh", "-c", script, "sh", *argv]

    def run(self, argv: List[str], input: Optional[str] = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
        """Run C{argv} as the operator, in the home directory."""
        r = subprocess.run(self.command(argv, self.home), capture_output=True, text=True, env=OPERATOR_ENV,
                           input=input, timeout=timeout)
        self.transcript.append(f"[{self.name}]# {shlex.join(argv)}\n{r.stdout}{r.stderr}(exit {r.returncode})")
        if check and r.returncode != 0:
            raise AssertionError(f"on {self.name}: {shlex.join(argv)} exited {r.returncode}:\n{r.stdout}{r.stderr}"
                                 f"{self.logs()}")
        return r

    def shell(self, line: str) -> subprocess.CompletedProcess:
        """A line of the README, as typed into a root shell."""
        return self.run(["sh", "-c", line])

    def write_home(self, name: str, text: str) -> None:
        path = os.path.join(self.home, name)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(text)

    # systemctl --------------------------------------------------------------------------------

    def systemctl(self, argv: List[str]) -> List["Service"]:
        """C{systemctl enable --now UNIT...}: start each unit as systemd would, and wait until it is ready."""
        words = [w for w in argv[1:] if w != "--now"]
        if words[:1] != ["enable"] or "--now" not in argv or len(words) < 2:
            raise Unsupported(f"only 'systemctl enable --now UNIT' is followed here (systemd is not PID 1): "
                              f"{shlex.join(argv)}")
        return [self.start(name) for name in words[1:]]

    def start(self, name: str) -> Service:
        full, template, _ = unit_name(name)
        with open(self.staged.path(UNITDIR, template)) as f:
            unit = UnitFile(f.read(), full)
        if unit.one("Type") != "notify" or unit.one("NotifyAccess", "main") != "main":
            raise Unsupported(f"{template}: only Type=notify with NotifyAccess=main is followed here")
        env = {"PATH": DEFAULT_PATH}
        for setting in unit.all("EnvironmentFile"):
            path = setting[1:] if setting.startswith("-") else setting
            r = self.run(["cat", path], check=False)
            if r.returncode == 0:
                env.update(environment_file(r.stdout))
            elif not setting.startswith("-"):
                raise AssertionError(f"{full}: its EnvironmentFile={path} cannot be read: {r.stderr}")
        mode = unit.one("StateDirectoryMode", "0755")
        state = [os.path.join(STATE_ROOT, d) for s in unit.all("StateDirectory") for d in s.split()]
        for path in state:
            self.run(["sh", "-c", 'mkdir -p "$1" && chmod "$2" "$1"', "sh", path, mode])
        if state:
            env["STATE_DIRECTORY"] = ":".join(state)
        commands = unit.all("ExecStart")
        if len(commands) != 1:
            raise Unsupported(f"{full}: {len(commands)} ExecStart= lines; a Type=notify unit has one")
        argv = exec_argv(commands[0], env)
        notify = NotifySocket(os.path.join(self.dir, f"{full}.notify"))
        env["NOTIFY_SOCKET"] = notify.path
        log = os.path.join(self.dir, f"{full}.log")
        with open(log, "ab") as out:
            process = subprocess.Popen(self.command(argv, "/", unit.one("UMask", "0022")), env=env,
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.topo.processes.append(process)
        service = Service(full, process, notify, log)
        self.services.append(service)
        self.transcript.append(f"[{self.name}] started {full}: {shlex.join(argv)}")
        try:
            status = notify.wait_ready(process.pid, lambda: process.poll() is not None,
                                       seconds(unit.one("TimeoutStartSec"), 90))
        except AssertionError as e:
            raise AssertionError(f"on {self.name}: systemctl start {full}: {e}{self.logs()}")
        self.transcript.append(f"[{self.name}] {full} is ready: STATUS={status}")
        service.status = status
        return service

    def logs(self) -> str:
        out = []
        for service in self.services:
            with open(service.log, errors="replace") as f:
                out.append(f"\n--- {self.name}: {service.unit} ---\n{f.read()[-2500:]}")
        return "".join(out)

    # ping -------------------------------------------------------------------------------------

    def ping(self, argv: List[str], replies: int = PING_REPLIES, timeout: float = 30) -> str:
        """Run the README's ping until C{replies} replies arrive, then press Ctrl-C."""
        target = argv[-1]
        process = subprocess.Popen(self.command(argv, self.home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env=OPERATOR_ENV, start_new_session=True)
        self.topo.processes.append(process)
        output, seen = b"", 0
        deadline = time.monotonic() + timeout
        os.set_blocking(process.stdout.fileno(), False)
        while seen < replies and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
            output += process.stdout.read() or b""
            seen = output.count(f"bytes from {target}".encode())
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        os.set_blocking(process.stdout.fileno(), True)
        output += process.communicate(timeout=15)[0]
        text = output.decode(errors="replace")
        self.transcript.append(f"[{self.name}]# {shlex.join(argv)}  (Ctrl-C after {seen} replies)\n{text}")
        if process.returncode != 0 or seen < replies:
            raise AssertionError(f"on {self.name}: {shlex.join(argv)} got {seen} replies in {timeout:g} s "
                                 f"(exit {process.returncode}):\n{text}")
        return text

    def stop(self) -> None:
        for service in reversed(self.services):
            self.topo.stop(service.process)
            service.notify.close()


class DeployTopology(Topology):
    prefix = "dt"


def overlay_unavailable(scratch: str) -> Optional[str]:
    """Why a read-only overlay cannot be mounted here (to make mount points), or None."""
    lower = [os.path.join(scratch, n) for n in ("a", "b", "m")]
    for path in lower:
        os.makedirs(path, exist_ok=True)
    r = subprocess.run([shutil.which("unshare"), "--mount", "--propagation", "private", "mount", "-t", "overlay",
                        "overlay", "-o", f"lowerdir={lower[0]}:{lower[1]}", lower[2]],
                       capture_output=True, text=True, timeout=30)
    return None if r.returncode == 0 else f"overlayfs cannot be mounted here: {r.stderr.strip()}"


def fingerprints(output: str) -> List[str]:
    return [f.replace(":", "").lower() for f in re.findall(r"SHA-256 fingerprint:?\s+([0-9A-Fa-f:]{64,})", output)]


class Deploy(SynchronousTestCase):
    def setUp(self):
        if os.geteuid() != 0:
            raise SkipTest("the deploy test needs root (namespaces, mounts, TAP devices)")
        if shutil.which("unshare") is None:
            raise SkipTest("the deploy test needs unshare (util-linux) for private mount namespaces")
        reason = staging_unavailable()
        if reason:
            raise SkipTest(f"the staged `make install-system` cannot be built: {reason}")
        scratch = tempfile.mkdtemp(prefix="dt-overlay-")
        try:
            reason = overlay_unavailable(scratch)
        finally:
            shutil.rmtree(scratch)
        if reason:
            raise SkipTest(reason)
        try:
            self.staged = Staged.get()
        except AssertionError as e:
            raise SkipTest(f"the staged `make install-system` cannot be built (test_units says more): {e}")

    def test_readme_deploy(self):
        """The README's deploy section brings up a hub and two cards that reach each other."""
        with open(readme_path()) as f:
            try:
                plan = Plan.from_readme(f.read())
            except AssertionError as e:
                self.fail(f"{readme_path()}: {e}")
        topo = DeployTopology(len(plan.cards))
        machines: List[Machine] = []
        self.addCleanup(topo.close)
        self.addCleanup(lambda: [m.stop() for m in machines])
        self.addCleanup(lambda: _save_transcript(topo.dir, machines))
        hub = Machine(topo, topo.hub_ns, "hub", self.staged)
        machines.append(hub)
        cards = []
        for i, card in enumerate(plan.cards, 1):
            hosts = "" if _is_address(card.hub_host) else f"{topo.hub_addr(i)} {card.hub_host}\n"
            cards.append(Machine(topo, topo.host(i), card.user, self.staged, hosts=hosts))
        machines.extend(cards)
        try:
            self._follow(plan, hub, cards)
        except AssertionError as e:
            transcript = "\n\n".join(t for m in machines for t in m.transcript)
            self.fail(f"{e}\n\n=== what ran ===\n{transcript}")

    def _follow(self, plan: Plan, hub: Machine, cards: List[Machine]) -> None:
        # The operator's part: a password per password file, on the hub and on the card that uses it.
        passwords: Dict[str, str] = {}
        for machine, commands in [(hub, plan.hub)] + [(m, c.commands) for m, c in zip(cards, plan.cards)]:
            for command in commands:
                name = option(shlex.split(command), "--password-file")
                if name and name != "-":
                    machine.write_home(name, passwords.setdefault(name, os.urandom(12).hex()) + "\n")

        port = plan.cards[0].hub_port

        def hub_started(service: Service) -> None:
            listening = hub.run(["ss", "-Hltn", f"sport = :{port}"]).stdout
            self.assertTrue(listening.strip(), f"the hub, once ready, listens on port {port} (the cards' --hub)")

        outputs = run_block(hub, plan.hub, hub_started)
        ca = [o for argv, o in outputs if argv[:3] == ["sevpn", "hub", "ca"]]
        self.assertEqual(len(ca), 1, "the hub's block runs 'sevpn hub ca' once")
        hub_fingerprint = fingerprints(ca[0])
        self.assertEqual(len(hub_fingerprint), 1, f"'sevpn hub ca' prints one fingerprint:\n{ca[0]}")
        ca_path = re.search(r"^CA certificate:\s+(\S+)", ca[0], re.M)
        self.assertIsNotNone(ca_path, f"'sevpn hub ca' names the CA file:\n{ca[0]}")

        # The operator's part: the hub's CA file to each card, over a channel the test trusts.
        certificate = hub.run(["cat", ca_path.group(1)]).stdout
        for machine, card in zip(cards, plan.cards):
            machine.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", card.ca_file],
                        input=certificate)

        pings: List[Tuple[Machine, List[str]]] = []
        account_outputs: Dict[str, str] = {}
        for machine, card in zip(cards, plan.cards):
            later = [c for c in card.commands if shlex.split(c)[0] == "ping"]
            pings += [(machine, shlex.split(c)) for c in later]

            def card_started(service: Service, machine=machine, card=card) -> None:
                self.assertEqual(machine.run(["ip", "link", "show", card.tap], check=False).returncode, 0,
                                 f"{card.user}'s card, once ready, has its TAP {card.tap}")
                self.assertIn(f"{card.hub_host}:{card.hub_port}", service.status,
                              f"{card.user}'s card, started with the README's defaults file, dials its account's hub")

            for argv, output in run_block(machine, [c for c in card.commands if c not in later], card_started):
                if argv[:3] == ["sevpn", "account", "add"]:
                    account_outputs[card.user] = output

        for machine, argv in pings:
            machine.ping(argv)

        for machine, card in zip(cards, plan.cards):
            self.assertEqual(fingerprints(account_outputs[card.user]), hub_fingerprint,
                             f"the fingerprint {card.user}'s card prints is the hub's")
            addresses = [f"{a['local']}/{a['prefixlen']}" for link in
                         json.loads(machine.run(["ip", "-j", "addr", "show", "dev", card.tap]).stdout)
                         for a in link.get("addr_info", []) if a.get("family") == "inet"]
            self.assertEqual(addresses, [card.address], f"{card.user}'s TAP {card.tap} has the account's --address")


def run_block(machine: Machine, commands: List[str], started=None) -> List[Tuple[List[str], str]]:
    """
    Run a block's commands in order on C{machine}; each must succeed.
    C{started(service)} checks each unit once it is ready.  Their outputs.
    """
    outputs = []
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "systemctl":
            for service in machine.systemctl(argv):
                if started:
                    started(service)
            outputs.append((argv, ""))
        else:
            r = machine.shell(command)
            outputs.append((argv, r.stdout + r.stderr))
    return outputs


def _save_transcript(directory: str, machines: List[Machine]) -> None:
    """What ran, beside the logs (kept with SEVPN_KEEP_LOGS=1)."""
    with open(os.path.join(directory, "transcript.txt"), "w") as f:
        f.write("\n\n".join(t for m in machines for t in m.transcript) + "\n")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


# -- the emulation's own checks (no root needed) --------------------------------------------------

SAMPLE = """\
# sevpn

## Deploy: one hub, two cards

On every machine, as root: `make install-system`.

**The hub** (reached as `vpn.example.org`):

```
echo 'SEVPN_HUB_ARGS="--hostname vpn.example.org"' > /etc/default/sevpn-hub
systemctl enable --now sevpn-hub
sevpn hub user add alice --password-file alice.pw
sevpn hub user add bob --password-file bob.pw
sevpn hub ca
```

**Each card** (alice's here; bob's the same with his name and address):

```
sevpn account add office --tap sevpn0 --hub vpn.example.org:5555 --user alice \\
      --password-file alice.pw --ca-file /etc/sevpn/ca.pem --address 192.168.30.1/24
systemctl enable --now sevpn-nic@sevpn0
# the other card answers
ping 192.168.30.2
```

## Running a hub

```
sevpn hub status
```
"""


class ReadingTheReadme(SynchronousTestCase):
    def test_blocks_by_lead(self):
        blocks = code_blocks(section(SAMPLE))
        self.assertEqual(sorted(blocks), [CARD_BLOCK, HUB_BLOCK])
        self.assertEqual(blocks[HUB_BLOCK][1], "systemctl enable --now sevpn-hub")
        self.assertEqual(blocks[CARD_BLOCK][0],
                         "sevpn account add office --tap sevpn0 --hub vpn.example.org:5555 --user alice "
                         "--password-file alice.pw --ca-file /etc/sevpn/ca.pem --address 192.168.30.1/24")
        self.assertNotIn("sevpn hub status", section(SAMPLE), "the section ends at the next heading")

    def test_bob_is_alice_with_his_name_and_address(self):
        plan = Plan.from_readme(SAMPLE)
        alice, bob = plan.cards
        self.assertEqual((alice.user, alice.address, bob.user, bob.address),
                         ("alice", "192.168.30.1/24", "bob", "192.168.30.2/24"))
        self.assertIn("--user bob --password-file bob.pw", bob.commands[0])
        self.assertEqual(bob.commands[1:], ["systemctl enable --now sevpn-nic@sevpn0", "ping 192.168.30.1"])
        self.assertEqual((bob.tap, bob.ca_file, bob.hub_host, bob.hub_port),
                         ("sevpn0", "/etc/sevpn/ca.pem", "vpn.example.org", 5555))

    def test_swap_whole_words(self):
        self.assertEqual(swap(["malice alice.pw 192.168.30.10 192.168.30.1/24 10.192.168.30.1"],
                              {"alice": "bob", "192.168.30.1": "192.168.30.2"}),
                         ["malice bob.pw 192.168.30.10 192.168.30.2/24 10.192.168.30.1"])

    def test_broken_sections(self):
        for broken, why in [
            (SAMPLE.replace("--address", "--adress"), "no --address"),
            (SAMPLE.replace("**Each card**", "Each card"), "has no bold lead before it"),
            (SAMPLE.replace("**The hub**", "**Hub**"), "no code block after ['The hub']"),
            (SAMPLE.replace("ping 192.168.30.2", "ping 10.0.0.2"), "not another address in 192.168.30.1/24"),
            (SAMPLE.replace("## Deploy: one hub, two cards", "## Deploy"), "no section"),
        ]:
            e = self.assertRaises(AssertionError, Plan.from_readme, broken)
            self.assertIn(why, str(e))


class MountPlan(SynchronousTestCase):
    def test_bind_existing_overlay_missing(self):
        layers = tempfile.mkdtemp(prefix="dt-layers-")
        self.addCleanup(shutil.rmtree, layers)
        source = tempfile.mkdtemp(prefix="dt-source-")
        self.addCleanup(shutil.rmtree, source)
        here = {"/etc", "/etc/default", "/var", "/var/lib"}
        plan = mount_plan({"/etc/default": source, "/etc/sevpn": source, "/var/lib/sevpn/x": source},
                          layers, exists=lambda p: p in here or p == "/")
        self.assertEqual(plan, [
            ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={layers}/etc:/etc", "/etc"],
            ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={layers}/var-lib:/var/lib", "/var/lib"],
            ["mount", "--bind", source, "/etc/default"],
            ["mount", "--bind", source, "/etc/sevpn"],
            ["mount", "--bind", source, "/var/lib/sevpn/x"],
        ])
        self.assertTrue(os.path.isdir(os.path.join(layers, "etc", "sevpn")))
        self.assertTrue(os.path.isdir(os.path.join(layers, "var-lib", "sevpn", "x")))
        self.assertFalse(os.path.exists(os.path.join(layers, "etc", "default")))
        e = self.assertRaises(AssertionError, mount_plan, {"/nowhere": source}, layers, exists=lambda p: p == "/")
        self.assertIn("no parent of it but / exists", str(e))


class Emulation(SynchronousTestCase):
    def test_unit_names(self):
        self.assertEqual(unit_name("sevpn-hub"), ("sevpn-hub.service", "sevpn-hub.service", None))
        self.assertEqual(unit_name("sevpn-nic@sevpn0"), ("sevpn-nic@sevpn0.service", "sevpn-nic@.service", "sevpn0"))
        self.assertEqual(unit_name("sevpn-nic@sevpn0.service")[1], "sevpn-nic@.service")

    def test_unit_file(self):
        unit = UnitFile("[Unit]\nDescription=card %i\n[Service]\n# a comment\nType=notify\n"
                        "ExecStart=/bin/nic --tap %i \\\n  --name %n --prefix %p 100%%\n"
                        "StateDirectory=sevpn/nic-%i\nCapabilityBoundingSet=X\nCapabilityBoundingSet=\n",
                        "sevpn-nic@sevpn0")
        self.assertEqual(unit.all("ExecStart"),
                         ["/bin/nic --tap sevpn0  --name sevpn-nic@sevpn0.service --prefix sevpn-nic 100%"])
        self.assertEqual(unit.one("StateDirectory"), "sevpn/nic-sevpn0")
        self.assertEqual(unit.all("CapabilityBoundingSet"), [], "an empty assignment resets")
        self.assertIsNone(unit.one("Description"), "other sections are not the service's")
        self.assertRaises(Unsupported, UnitFile, "[Service]\nExecStart=/bin/x %H\n", "x")

    def test_environment_file(self):
        self.assertEqual(environment_file(
            '# comment\n; comment\n\nSEVPN_HUB_ARGS="--hostname vpn.example.org"\n'
            "B='single $quoted'\nC=plain  words \nD=\"a \\\"q\\\"\"\nnot an assignment\n"),
            {"SEVPN_HUB_ARGS": "--hostname vpn.example.org", "B": "single $quoted", "C": "plain words",
             "D": 'a "q"'})

    def test_exec_start(self):
        env = {"ARGS": "--hostname vpn.example.org  --hostname 10.0.0.1", "ONE": "a b"}
        self.assertEqual(exec_argv("/bin/hub --state-dir /x $ARGS", env),
                         ["/bin/hub", "--state-dir", "/x", "--hostname", "vpn.example.org", "--hostname", "10.0.0.1"])
        self.assertEqual(exec_argv("/bin/hub ${ONE} x${ONE}y $UNSET '$$' \"c d\"", env),
                         ["/bin/hub", "a b", "xa by", "$", "c d"])
        self.assertRaises(Unsupported, exec_argv, "-/bin/hub", env)

    def test_seconds(self):
        self.assertEqual([seconds("60", 0), seconds("30s", 0), seconds("1min 30s", 0), seconds(None, 9)],
                         [60, 30, 90, 9])

    def test_notify_main_pid_only(self):
        """READY=1 counts from the main process alone (NotifyAccess=main), as systemd has it."""
        directory = tempfile.mkdtemp(prefix="dt-notify-")
        self.addCleanup(shutil.rmtree, directory)
        sock = NotifySocket(os.path.join(directory, "notify"))
        self.addCleanup(sock.close)
        send = ("import os, sys; from sevpn.sdnotify import notify; "
                "sys.exit(0 if notify('READY=1', 'STATUS=from a child') else 1)")
        child = subprocess.run([sys.executable, "-c", send], env=dict(os.environ, NOTIFY_SOCKET=sock.path,
                                                                       PYTHONPATH=REPO), timeout=60)
        self.assertEqual(child.returncode, 0)
        e = self.assertRaises(AssertionError, sock.wait_ready, os.getpid(), lambda: False, 0.5)
        self.assertIn("not ready within", str(e))
        from sevpn.sdnotify import notify
        self.assertTrue(notify("READY=1", "STATUS=listening", environ={"NOTIFY_SOCKET": sock.path}))
        self.assertEqual(sock.wait_ready(os.getpid(), lambda: False, 5), "listening")
