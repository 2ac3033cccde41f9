"""
make bench-workers: what C{--workers} buys on this machine.  Aggregate
iperf3 TCP of PAIRS card pairs at once (card 2p-1 sends to card 2p),
through a hub of 1 worker, then of each count in WORKERS, with the cards
placed by address (scripts.workers_topology):

 - C{same}: both cards of a pair on one worker, the pairs spread over the
   workers (the best case: no frame crosses the node's bridge);
 - C{across}: the two cards of a pair on different workers (every frame
   crosses the bridge: two workers and the kernel carry each frame).

Prints each run's aggregate and per-pair Mbit/s, the hub processes' CPU
(% of one core each) and the ratio to one worker.  A benchmark, not a
test: it asserts nothing.  Run it on a quiet machine with cores to spare
(each card is a process too: 2 x PAIRS cards, plus the workers).

    make bench-workers WORKERS=1,2 DUR=10 PAIRS=2
    WORKERS=1,2,4 PAIRS=4 DUR=20 python scripts/bench_workers.py

The hub's namespace gets net.bridge.bridge-nf-call-*=0 (the test's own
namespace: bridged frames skip iptables, as the hub's start-up warning
advises for production).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.procstat import cpu_seconds  # noqa: E402
from scripts.workers_topology import PlacedTopology  # noqa: E402
from scripts.netns import skip_reason  # noqa: E402

DUR = int(os.environ.get("DUR", "10"))
PAIRS = int(os.environ.get("PAIRS", "2"))


def placement(workers: int, layout: str) -> dict:
    """Card host -> worker: pair p is hosts 2p+1 (sender) and 2p+2 (receiver)."""
    out = {}
    for p in range(PAIRS):
        if layout == "same":
            out[2 * p + 1] = out[2 * p + 2] = p % workers
        else:
            out[2 * p + 1] = (2 * p) % workers
            out[2 * p + 2] = (2 * p + 1) % workers
    return out


def hub_pids(topo) -> list:
    pids = []
    for pid in topo.run(None, "ip", "netns", "pids", topo.hub_ns).split():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"sevpn" in f.read():
                    pids.append(int(pid))
        except FileNotFoundError:
            continue
    return sorted(pids)


def run(workers: int, layout: str) -> dict:
    place = placement(workers, layout)
    topo = PlacedTopology(2 * PAIRS, workers, place)
    try:
        for family in ("iptables", "ip6tables", "arptables"):
            topo.run(topo.hub_ns, "sysctl", "-qw", f"net.bridge.bridge-nf-call-{family}=0", check=False)
        for i in place:
            topo.add_user(f"u{i}")
        topo.start_workers()
        for i in place:
            topo.start_card(i)
        for i in place:
            topo.wait_connected(i)
        if workers > 1:
            landed = {s["user"]: s["worker"] for s in topo.hub_sessions()}
            wrong = {u: w for u, w in landed.items() if w != place[int(u[1:])]}
            if wrong:
                raise SystemExit(f"bench-workers: cards landed on unexpected workers: {wrong}")
        for p in range(PAIRS):
            topo.ping(2 * p + 1, 2 * p + 2)
        servers = [topo.spawn(topo.host(2 * p + 2), f"iperf3-server-{p}", "iperf3", "-s", "-1", "-B",
                              topo.tap_addr(2 * p + 2)) for p in range(PAIRS)]
        time.sleep(0.5)
        pids = hub_pids(topo)
        cpu0 = {pid: cpu_seconds(pid) for pid in pids}
        t0 = time.monotonic()
        clients = [subprocess.Popen(
            ["ip", "netns", "exec", topo.host(2 * p + 1), "iperf3", "-c", topo.tap_addr(2 * p + 2), "-t", str(DUR),
             "-J"], stdout=subprocess.PIPE, text=True) for p in range(PAIRS)]
        outputs = [c.communicate(timeout=DUR + 60)[0] for c in clients]
        elapsed = time.monotonic() - t0
        cpu = {pid: (cpu_seconds(pid) - cpu0[pid]) / elapsed * 100 for pid in pids}
        for server in servers:
            server.wait(20)
        per_pair = []
        for out in outputs:
            try:
                per_pair.append(json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6)
            except (ValueError, KeyError):
                per_pair.append(float("nan"))
        return {"workers": workers, "layout": layout, "total": sum(per_pair), "pairs": per_pair,
                "cpu": [cpu[pid] for pid in pids]}
    finally:
        topo.close()


def main() -> int:
    reason = skip_reason()
    if reason:
        print(f"bench-workers: cannot run: {reason}", file=sys.stderr)
        return 1
    counts = sorted({int(n) for n in os.environ.get("WORKERS", "1,2").split(",") if n.strip()} | {1})
    results = [run(1, "same")]
    for workers in counts[1:]:
        for layout in ("same", "across"):
            results.append(run(workers, layout))
    base = results[0]["total"]
    print(f"\nsevpn bench-workers: {PAIRS} card pairs at once, iperf3 TCP {DUR} s, {os.cpu_count()} CPUs\n")
    print("| workers | cards of a pair | aggregate Mbit/s | per pair | hub CPU % per process | vs 1 worker |")
    print("|---|---|---|---|---|---|")
    for r in results:
        layout = "one worker" if r["workers"] == 1 else ("same worker" if r["layout"] == "same" else "two workers")
        print(f"| {r['workers']} | {layout} | {r['total']:.0f} | {' / '.join(f'{x:.0f}' for x in r['pairs'])} | "
              f"{' / '.join(f'{c:.0f}' for c in r['cpu'])} | {r['total'] / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
