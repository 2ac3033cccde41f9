"""
System test of C{--workers}: the real hub (twistd, two workers) and real
cards in namespaces this test makes (prefix C{wk}).  The card hosts'
addresses are chosen with L{sevpn.reuseport.worker_for}, the function the
kernel's BPF program agrees with, so that cards 1 and 3 land on worker 0
and card 2 on worker 1; everything between them crosses the node's bridge.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from scripts.netns import BIN, Topology, env, sevpn, transfer, transfer_result, wait_for
from scripts.workers_topology import PlacedTopology
from sevpn.reuseport import worker_for
from tests.test_system import SystemTestCase

WORKERS = 2
#: The worker each card host's address maps to.
PLACEMENT = {1: 0, 2: 1, 3: 0}


def capture(topo, i: int, marker: str, seconds: float = 4.0) -> subprocess.Popen:
    """Frames carrying C{marker} that card host C{i}'s TAP receives (scripts.rawframe), started and ready."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", topo.host(i), sys.executable, "-m", "scripts.rawframe", "capture", "sv0", marker,
         str(seconds)], stdout=subprocess.PIPE, text=True, env=env(),
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def alive(pid: int) -> bool:
    """Whether process C{pid} runs (a zombie waiting for init to reap it does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Workers(SystemTestCase):
    """Three cards on a hub of two workers: 1 and 3 on worker 0, 2 on worker 1."""

    hosts = 3

    @classmethod
    def make_topology(cls) -> Topology:
        return PlacedTopology(cls.hosts, WORKERS, PLACEMENT)

    @classmethod
    def start(cls, topo):
        for i in PLACEMENT:
            topo.add_user(f"u{i}")
        topo.start_workers("--metrics", "tcp:9100:interface=127.0.0.1")
        for i in PLACEMENT:
            topo.start_card(i)
        for i in PLACEMENT:
            topo.wait_connected(i)

    def test_a_cards_land_on_the_worker_their_address_picks(self):
        topo = self.topo
        sessions = topo.hub_sessions()
        self.assertEqual({s["user"]: s["worker"] for s in sessions}, {f"u{i}": w for i, w in PLACEMENT.items()})
        self.assertEqual({s["peer"].rsplit(":", 1)[0] for s in sessions}, {topo.host_addr(i) for i in PLACEMENT})
        # the operator's view: one hub, every worker's sessions
        text = sevpn("hub", "sessions", "--state-dir", topo.hub_state)
        self.assertEqual(text.stderr, "")
        lines = text.stdout.splitlines()
        self.assertEqual(lines[0].split()[:2], ["ID", "WORKER"])
        self.assertEqual(len(lines), 1 + len(PLACEMENT))
        status = topo.hub_status()
        self.assertEqual(status["sessions"], 3)
        self.assertEqual([(w["worker"], w["sessions"]) for w in status["workers"]], [(0, 2), (1, 1)])
        self.assertEqual([w["backplane"][0]["port"] for w in status["workers"]], ["vs-DEFAULT-0", "vs-DEFAULT-1"])
        # each worker's lines in the one log, saying which
        log = topo.log("hub")
        self.assertRegex(log, r"\[worker 1 sevpn\.hub\.Hub#info\] u2 joined virtual hub DEFAULT")
        self.assertRegex(log, r"\[worker 0 sevpn\.hub\.Hub#info\] u1 joined virtual hub DEFAULT")

    def test_b_ping_across_workers(self):
        self.topo.ping(1, 2)
        self.topo.ping(2, 3)
        self.topo.ping(3, 1)  # the same worker

    def test_c_transfer_across_workers_arrives_intact(self):
        result, expected = transfer_result(self.topo, *transfer(self.topo, 2, 1, 20))
        self.assertIsNone(result["error"])
        self.assertEqual(result["bytes"], 20 << 20)
        self.assertEqual(result["sha256"], expected)

    def test_d_a_broadcast_reaches_every_card_once(self):
        topo = self.topo
        for sender in (1, 2):  # from worker 0, then from worker 1
            marker = f"wk-broadcast-from-{sender}-{time.monotonic_ns()}"
            others = [i for i in PLACEMENT if i != sender]
            captures = {i: capture(topo, i, marker) for i in PLACEMENT}
            frame = bytes.fromhex("ffffffffffff" + topo.mac(sender).replace(":", "") + "88b5") + marker.encode()
            frame += bytes(max(0, 60 - len(frame)))
            topo.run(topo.host(sender), sys.executable, "-m", "scripts.rawframe", "send", "sv0",
                     *[frame.hex()] * 5)
            seen = {i: json.loads(proc.communicate(timeout=30)[0]) for i, proc in captures.items()}
            for i in others:
                self.assertEqual(len(seen[i]), 5, f"card {i} got {len(seen[i])} of 5 broadcasts from card {sender}")
            self.assertEqual(seen[sender], [], f"card {sender} got its own broadcast back")

    def test_e_hub_macs_show_each_card_once_where_it_is(self):
        topo = self.topo
        topo.ping(1, 2)
        topo.ping(2, 3)
        macs = json.loads(sevpn("hub", "macs", "--json", "--state-dir", topo.hub_state).stdout)["DEFAULT"]["macs"]
        for i, worker in PLACEMENT.items():
            rows = [m for m in macs if m["mac"] == topo.mac(i)]
            self.assertEqual(len(rows), 1, rows)
            self.assertEqual(rows[0]["worker"], worker)
            self.assertFalse(rows[0]["port"].startswith("backplane:"))

    def test_f_a_cut_card_resumes_on_its_worker_losing_nothing(self):
        topo = self.topo
        before = topo.card_status(2)
        [held] = [s for s in topo.hub_sessions() if s["user"] == "u2"]
        run = transfer(topo, 2, 1, 30, rate=3 << 20)  # still flowing when the cut comes
        time.sleep(2)
        out = topo.run(topo.host(2), "ss", "-K", "dst", topo.hub_addr(2), "dport", "=", "5555")
        self.assertIn(topo.hub_addr(2), out)  # a connection was killed
        wait_for(lambda: topo.card_status(2)["resumes"] > before["resumes"], 30, "card 2 to resume")
        result, expected = transfer_result(topo, *run)
        self.assertIsNone(result["error"])
        self.assertEqual(result["bytes"], 30 << 20)
        self.assertEqual(result["sha256"], expected)
        after = topo.wait_connected(2)
        self.assertEqual(after["session"], before["session"])  # resumed: the same worker held it
        self.assertEqual(after["frames_dropped"], 0)
        [resumed] = [s for s in topo.hub_sessions() if s["user"] == "u2"]
        self.assertEqual((resumed["id"], resumed["worker"]), (held["id"], 1))
        self.assertEqual(resumed["resumes"], held["resumes"] + 1)
        self.assertEqual(resumed["frames_dropped"], 0)
        self.assertRegex(topo.log("hub"), rf"\[worker 1 sevpn\.hub\.Hub#info\] session {held['id']} of u2 "
                                          r"on DEFAULT resumed")

    def test_g_metrics_cover_every_worker(self):
        topo = self.topo
        fetch = ("import sys, urllib.request; "
                 "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:9100' + sys.argv[1]).read().decode())")
        reading = json.loads(topo.run(topo.hub_ns, sys.executable, "-c", fetch, "/status.json"))
        self.assertEqual(reading["hub"]["sessions"], 3)
        [vhub] = reading["virtual_hubs"]
        self.assertEqual(sorted((s["user"], s["worker"]) for s in vhub["sessions"]), [("u1", 0), ("u2", 1), ("u3", 0)])
        [u2] = [s for s in vhub["sessions"] if s["user"] == "u2"]
        metrics = topo.run(topo.hub_ns, sys.executable, "-c", fetch, "/metrics")
        self.assertRegex(metrics, rf'sevpn_session_frames_total{{[^}}]*session="{u2["id"]}"')
        self.assertIn('sevpn_sessions{hub="DEFAULT",state="connected"} 3.0', metrics)

    def test_h_a_card_that_changes_address_moves_to_its_new_worker(self):
        topo = self.topo
        host = topo.host(2)
        old_address = topo.host_addr(2)
        subnet = old_address.rsplit(".", 1)[0]
        for back in (False, True):  # to worker 0, then home to worker 1
            if not back:
                new_address = next(f"{subnet}.{n}" for n in range(100, 250) if worker_for(f"{subnet}.{n}", WORKERS) == 0)
                topo.run(host, "ip", "addr", "add", f"{new_address}/24", "dev", "eth0")
                source, worker = new_address, 0
            else:
                source, worker = old_address, 1
            topo.run(host, "ip", "route", "replace", f"{subnet}.0/24", "dev", "eth0", "src", source)
            [old] = [s for s in topo.hub_sessions() if s["user"] == "u2"]
            topo.run(host, "ss", "-K", "dst", topo.hub_addr(2), "dport", "=", "5555")
            # its new worker cannot resume a session it does not hold: a fresh one there
            wait_for(lambda: [(s["worker"], s["peer"].rsplit(":", 1)[0]) for s in topo.hub_sessions()
                              if s["user"] == "u2"] == [(worker, source)], 30, f"card 2 on worker {worker} alone")
            topo.wait_connected(2)
            # its frames pass on its new worker at once, and reach the other worker's cards
            topo.ping(2, 1)
            topo.ping(3, 2)
            log = topo.log("hub")
            self.assertRegex(log, rf"\[worker {old['worker']} sevpn\.hub\.Hub#info\] session {old['id']} of u2 on DEFAULT "
                                  r"ended: its card logged in again on another worker of this hub")
            self.assertRegex(log, rf"\[worker {worker} sevpn\.workers\.(MainRole|WorkerRole)#info\] the card of u2 "
                                  rf"\(MAC {topo.mac(2)}\) moved to this worker")
        topo.run(host, "ip", "addr", "del", f"{new_address}/24", "dev", "eth0")

    def test_i_a_worker_that_dies_is_replaced_and_its_cards_come_back(self):
        topo = self.topo
        [old] = [s for s in topo.hub_sessions() if s["user"] == "u2"]
        pid = {w["worker"]: w["pid"] for w in topo.hub_status()["workers"]}[1]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: [(w["state"], w["restarts"]) for w in topo.hub_status()["workers"]][1] == ("running", 1),
                 30, "worker 1 to be restarted")
        # its card could not resume (the session died with the worker): a fresh one, on the new worker 1
        wait_for(lambda: [(s["worker"], s["id"] != old["id"]) for s in topo.hub_sessions() if s["user"] == "u2"]
                 == [(1, True)], 60, "card 2 back on worker 1")
        topo.wait_connected(2)
        topo.ping(1, 2)
        log = topo.log("hub")
        self.assertIn(f"worker 1 (pid {pid}) was killed by signal 9 (SIGKILL): the sessions it held are gone", log)
        self.assertRegex(log, r"\[worker 1 sevpn\.hub\.Hub#info\] u2 from [\d.:]+ asked to resume a session this "
                              "hub does not hold; starting a fresh one")

    def test_y_stopping_the_main_process_stops_every_worker(self):
        topo = self.topo
        topo.hub_proc.send_signal(signal.SIGTERM)  # the main process alone, not its process group
        topo.hub_proc.wait(30)
        self.assertEqual(topo.run(None, "ip", "netns", "pids", topo.hub_ns).split(), [])
        self.assertEqual(topo.run(topo.hub_ns, "ip", "-o", "link", "show", "type", "bridge"), "")
        self.assertEqual(topo.run(topo.hub_ns, "ip", "-o", "link", "show", "type", "tun"), "")
        log = topo.log("hub")
        self.assertRegex(log, r"\[worker 1 sevpn\.hub\.Hub#info\] session \w+ of u2 on DEFAULT ended: .*the hub is "
                              "shutting down")
        self.assertIn("removed bridge br-DEFAULT", log)

    def test_z_killing_the_main_process_leaves_no_worker(self):
        topo = self.topo
        if topo.hub_proc.poll() is None:  # run alone: the hub of the other tests still runs
            topo.stop(topo.hub_proc)
        topo.start_workers()
        for i in PLACEMENT:
            topo.wait_connected(i, timeout=60)
        pids = {w["worker"]: w["pid"] for w in topo.hub_status()["workers"]}
        os.kill(topo.hub_proc.pid, signal.SIGKILL)
        wait_for(lambda: not topo.run(None, "ip", "netns", "pids", topo.hub_ns).split(), 15,
                 "every worker to exit")
        self.assertFalse(alive(pids[1]))
        # the worker said goodbye to its card on its way out
        wait_for(lambda: topo.card_status(2)["state"] != "connected", 15, "card 2 to lose its hub")
        self.assertIn("[worker 1 sevpn.worker.Lifeline#warn] the main process is gone: stopping", topo.log("hub"))


class AWorkerCannotStart(SystemTestCase):
    """A worker that cannot start fails the whole start, with its sentence, leaving nothing behind."""

    hosts = 0

    @classmethod
    def make_topology(cls) -> Topology:
        return PlacedTopology(cls.hosts, WORKERS, {})

    @classmethod
    def start(cls, topo):
        # worker 1's TAP name is taken by a device of another kind
        topo.run(topo.hub_ns, "ip", "link", "add", "vs-DEFAULT-1", "type", "veth", "peer", "name", "wk-peer")

    def test_the_hub_exits_saying_why(self):
        topo = self.topo
        proc = topo.spawn(topo.hub_ns, "hub", os.path.join(BIN, "twistd"), "-n", "--pidfile=", "sevpn-hub",
                          "--state-dir", topo.hub_state, "--listen", "tcp:5555", "--workers", str(WORKERS))
        self.assertEqual(proc.wait(60), 1)
        self.assertIn("sevpn-hub: worker 1 could not start: virtual hub DEFAULT's backplane port: cannot use "
                      "vs-DEFAULT-1 as a TAP device: a network interface of another kind has that name",
                      topo.log("hub"))
        self.assertEqual(topo.run(None, "ip", "netns", "pids", topo.hub_ns).split(), [])
        self.assertEqual(topo.run(topo.hub_ns, "ip", "-o", "link", "show", "type", "bridge"), "")


class WorkersInTheFabric(SystemTestCase):
    """
    C{--workers 2 --fabric DEFAULT=100} on one node (no FRR needed for one):
    each worker's fabric port is its backplane port, in the segment's
    bridge C{br-100}; no second bridge, and each worker reflects its own
    cards' MACs on its own TAP.
    """

    hosts = 2

    @classmethod
    def make_topology(cls) -> Topology:
        return PlacedTopology(cls.hosts, WORKERS, {1: 0, 2: 1})

    @classmethod
    def start(cls, topo):
        topo.run(topo.hub_ns, "ip", "addr", "add", "10.99.0.1/32", "dev", "lo")
        topo.run(topo.hub_ns, sys.executable, "-m", "sevpn.cli", "fabric", "up", "--vtep", "10.99.0.1",
                 "--fabric", "DEFAULT=100")
        for i in (1, 2):
            topo.add_user(f"u{i}")
        topo.start_workers("--fabric", "DEFAULT=100")
        for i in (1, 2):
            topo.start_card(i)
        for i in (1, 2):
            topo.wait_connected(i)

    def test_cards_on_two_workers_meet_in_the_segments_bridge(self):
        topo = self.topo
        self.assertEqual(sorted((s["user"], s["worker"]) for s in topo.hub_sessions()), [("u1", 0), ("u2", 1)])
        topo.ping(1, 2)
        topo.ping(2, 1)
        ports = {e["ifname"] for e in json.loads(topo.run(topo.hub_ns, "ip", "-j", "link", "show", "master", "br-100"))}
        self.assertEqual(ports, {"vx-100", "vt100-0", "vt100-1"})
        self.assertEqual(topo.run(topo.hub_ns, "ip", "-o", "link", "show", "br-DEFAULT", check=False), "")
        # each worker put its own card's MAC on its own TAP, for FRR
        fdb = json.loads(topo.run(topo.hub_ns, "bridge", "-j", "fdb", "show", "br", "br-100"))
        static = {(e["mac"], e["ifname"]) for e in fdb if e.get("state") == "static"}
        self.assertIn((topo.mac(1), "vt100-0"), static)
        self.assertIn((topo.mac(2), "vt100-1"), static)
        # and the hub's view of its fabric ports is every worker's (what 'sevpn hub fabric' reads; its full
        # view asks FRR too)
        rows = json.loads(topo.run(None, sys.executable, "-c", (
            "import json, sys; from sevpn import control; "
            "print(json.dumps(control.call(sys.argv[1], 'fabric')))"), topo.hub_state))["segments"]
        self.assertEqual(sorted((r["worker"], r["tap"]) for r in rows), [(0, "vt100-0"), (1, "vt100-1")])
