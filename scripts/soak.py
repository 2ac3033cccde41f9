"""
make soak: ten minutes of chaos against a real hub while two honest cards
move checksummed data and ping each other.

Chaos, at random every 10-30 s: a card's transport cut (its TCP killed on
both sides, its line down for 1-5 s), a card killed and restarted, the hub
restarted; all the time, a hostile logged-in user floods the virtual hub
with spoofed broadcast and lies about frame numbers.

Reported: every transfer's sha256 (all must be intact), frames lost from
resume buffers (must be 0 across resumes), pings lost per outage, the
hub's RSS over time (must be flat) and its CPU.  A measurement, not a test:
it prints figures and exits non-zero only if a transfer broke or a resume
lost frames.

    SOAK_SECONDS=600 make soak      (SOAK_JSON=FILE keeps every figure)
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.netns import script_topology, transfer, transfer_result  # noqa: E402

SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))


def proc_figures(pid: int):
    """(RSS in MiB, CPU seconds) of a process."""
    with open(f"/proc/{pid}/status") as f:
        rss = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hub_pid(topo) -> int:
    """The twistd hub process (not the ip netns exec in front of it)."""
    for pid in topo.run(None, "ip", "netns", "pids", topo.hub_ns, check=False).split():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"sevpn-hub" in f.read():
                    return int(pid)
        except OSError:
            pass
    raise RuntimeError("no hub process")


def cut(topo, i: int, seconds: float) -> None:
    host = topo.host(i)
    topo.run(host, "ip", "link", "set", "eth0", "down")
    topo.run(host, "ss", "-K", "dst", topo.hub_addr(i), check=False)
    topo.run(topo.hub_ns, "ss", "-K", "dst", topo.host_addr(i), check=False)
    time.sleep(seconds)
    topo.run(host, "ip", "link", "set", "eth0", "up")


def main() -> int:
    topo = script_topology("soak", hosts=3)
    report = {"events": [], "transfers": [], "rss": [], "cpu": [], "dropped": {}}
    stop = threading.Event()
    try:
        for user in ("u1", "u2", "mallory"):
            topo.add_user(user)
        topo.start_hub()
        for i in (1, 2):
            topo.start_card(i)
            topo.wait_connected(i)
        pw = os.path.join(topo.dir, "password")
        hostile = topo.spawn(topo.host(3), "hostile", sys.executable, "-m", "scripts.hostile_flood",
                             topo.hub_addr(3), "5555", os.path.join(topo.hub_state, "ca.pem"), "mallory", pw,
                             str(SECONDS))
        # to a file: ten minutes of ping lines would fill a pipe nobody reads until the end, and stop ping
        ping_path = os.path.join(topo.dir, "ping.out")
        with open(ping_path, "w") as ping_out:
            ping = subprocess.Popen(["ip", "netns", "exec", topo.host(1), "ping", "-D", "-O", "-i", "0.2", "-W", "1",
                                     topo.tap_addr(2)], stdout=ping_out, text=True)
        start = time.monotonic()

        def transfers():
            while not stop.is_set():
                run = transfer(topo, 1, 2, 50, rate=4 << 20)
                try:
                    result, expected = transfer_result(topo, *run, timeout=300)
                    ok = result["error"] is None and result["sha256"] == expected
                    report["transfers"].append({"t": round(time.monotonic() - start), "intact": ok,
                                                "bytes": result["bytes"], "error": result["error"]})
                except (AssertionError, OSError, ValueError) as e:
                    report["transfers"].append({"t": round(time.monotonic() - start), "intact": False,
                                                "error": str(e)[-300:]})

        def sampler():
            cpu0 = None
            while not stop.is_set():
                try:
                    rss, cpu = proc_figures(hub_pid(topo))
                    now = time.monotonic() - start
                    report["rss"].append((round(now), round(rss, 1)))
                    if cpu0 is not None and cpu >= cpu0[1]:
                        report["cpu"].append(round(100 * (cpu - cpu0[1]) / (now - cpu0[0]), 1))
                    cpu0 = (now, cpu)
                except (OSError, RuntimeError, AttributeError):
                    cpu0 = None
                stop.wait(10)

        threads = [threading.Thread(target=transfers, daemon=True), threading.Thread(target=sampler, daemon=True)]
        for t in threads:
            t.start()
        rng = random.Random(os.environ.get("SOAK_SEED", "1"))
        while time.monotonic() - start < SECONDS - 30:
            time.sleep(rng.uniform(10, 30))
            kind = rng.choice(["cut", "cut", "cut", "card restart", "hub restart"])
            at = round(time.monotonic() - start)
            if kind == "cut":
                i, seconds = rng.choice([1, 2]), rng.uniform(1, 5)
                cut(topo, i, seconds)
                report["events"].append({"t": at, "event": f"card {i} cut for {seconds:.1f} s"})
            elif kind == "card restart":
                topo.stop(topo.cards[2], signal.SIGKILL)
                topo.start_card(2)
                report["events"].append({"t": at, "event": "card 2 killed and restarted"})
            else:
                topo.stop(topo.hub_proc)
                topo.start_hub()
                report["events"].append({"t": at, "event": "hub restarted"})
            for i in (1, 2):
                topo.wait_connected(i, timeout=60)
        time.sleep(max(0, SECONDS - (time.monotonic() - start)))
        stop.set()
        for t in threads:
            t.join(330)
        ping.send_signal(signal.SIGINT)
        ping.wait(30)
        with open(ping_path) as f:
            out = f.read()
        hostile.wait(60)
        for i in (1, 2):
            status = topo.card_status(i)
            report["dropped"][f"card {i}"] = status["frames_dropped"]
        report["dropped"]["hub"] = sum(s["frames_dropped"] for s in topo.hub_sessions())
        report["pings"] = ping_outages(out, report["events"])
        report["hostile"] = topo.log("hostile").strip().splitlines()[-1:]
    finally:
        stop.set()
        topo.close()
    print_report(report)
    if os.environ.get("SOAK_JSON"):
        with open(os.environ["SOAK_JSON"], "w") as f:
            json.dump(report, f, indent=1)
    ok = all(t["intact"] for t in report["transfers"]) and not any(report["dropped"].values())
    return 0 if ok else 1


def ping_outages(out: str, events) -> dict:
    """Pings sent, answered, and the gaps (runs of unanswered pings)."""
    answered = {int(m.group(1)) for m in re.finditer(r"icmp_seq=(\d+) ttl", out)}
    sent = max(answered | {int(m.group(1)) for m in re.finditer(r"icmp_seq=(\d+)", out)} | {0})
    gaps, run = [], 0
    for seq in range(1, sent + 1):
        if seq in answered:
            if run:
                gaps.append(run)
            run = 0
        else:
            run += 1
    return {"sent": sent, "answered": len(answered), "gaps": gaps}


def print_report(r: dict) -> None:
    print(f"\nsevpn soak: {SECONDS:.0f} s, {len(r['events'])} events\n")
    for e in r["events"]:
        print(f"  t={e['t']:>4} s  {e['event']}")
    intact = sum(t["intact"] for t in r["transfers"])
    print(f"\ntransfers (50 MiB each, 4 MiB/s): {intact} of {len(r['transfers'])} intact (sha256)")
    for t in r["transfers"]:
        if not t["intact"]:
            print(f"  t={t['t']} s: {t.get('error')}")
    print(f"frames lost from resume buffers: {r['dropped']}")
    p = r.get("pings", {})
    if p:
        print(f"pings (every 0.2 s): {p['answered']} of {p['sent']} answered; outages (pings lost each): {p['gaps']}")
    if r["rss"]:
        values = [v for _, v in r["rss"]]
        print(f"hub RSS MiB: first {values[0]}, max {max(values)}, last {values[-1]} ({len(values)} samples)")
    if r["cpu"]:
        print(f"hub CPU % of a core: mean {sum(r['cpu']) / len(r['cpu']):.1f}, max {max(r['cpu'])}")
    print(f"hostile user: {r.get('hostile')}")


if __name__ == "__main__":
    sys.exit(main())
