"""
What an idle VPN costs the machine: a hub with two connected cards (real
TAPs, on veth pairs in namespaces), the CPU each process uses over
IDLE_SECS (default 60) seconds of nothing, then over as long with one ping
a second from card 1 to card 2.  CPU is user + system time of all the
process's threads from /proc/PID/stat, as % of one core; wakeups are its
threads' context switches per second.  A benchmark: it prints figures and
asserts nothing (the target is printed beside them).

    IDLE_SECS=60 python scripts/idle_cpu.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts import procstat  # noqa: E402
from scripts.bench_wan import last_error  # noqa: E402
from scripts.netns import skip_reason, two_cards  # noqa: E402
from scripts.wan import BenchTopology  # noqa: E402

IDLE_SECS = int(os.environ.get("IDLE_SECS", "60"))
SETTLE_SECS = 10
#: The lead's target: a hub with two idle cards, averaged over a minute.
HUB_TARGET_PCT = 1.0


def measure(pids: Dict[str, int], seconds: float) -> Dict[str, dict]:
    """CPU % of a core and wakeups/s of each process over C{seconds}."""
    cpu0 = procstat.snapshot(pids)
    cs0 = {k: procstat.context_switches(p) for k, p in pids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    cpu1 = procstat.snapshot(pids)
    cs1 = {k: procstat.context_switches(p) for k, p in pids.items()}
    return {k: {"cpu_pct": 100 * (cpu1[k] - cpu0[k]) / elapsed, "wakeups": (cs1[k] - cs0[k]) / elapsed}
            for k in pids}


def main() -> int:
    reason = skip_reason()
    if reason:
        print(f"idle_cpu: cannot run: {reason}", file=sys.stderr)
        return 1
    topo = BenchTopology(2)
    results = {}
    try:
        two_cards(topo)
        if not topo.ping(1, 2, check=False):
            print(f"idle_cpu: the cards connected, but no ping crosses sevpn{last_error(topo)}", file=sys.stderr)
            return 1
        pids = {"hub": procstat.find_pid(topo.hub_ns, b"sevpn-hub"),
                "card 1": procstat.find_pid(topo.host(1), b"sevpn-nic"),
                "card 2": procstat.find_pid(topo.host(2), b"sevpn-nic")}
        missing = [k for k, v in pids.items() if v is None]
        if missing:
            print(f"idle_cpu: no process found for {', '.join(missing)}", file=sys.stderr)
            return 1
        print(f"hub and two cards connected; settling {SETTLE_SECS} s, then {IDLE_SECS} s idle and "
              f"{IDLE_SECS} s with one ping a second", flush=True)
        time.sleep(SETTLE_SECS)  # the kernel's IPv6 start-up chatter on the TAPs, the first keepalives
        results["idle"] = measure(pids, IDLE_SECS)
        pinger = subprocess.Popen(["ip", "netns", "exec", topo.host(1), "ping", "-q", "-i", "1",
                                   "-c", str(IDLE_SECS + 5), topo.tap_addr(2)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(2)
            results["1 ping/s"] = measure(pids, IDLE_SECS)
        finally:
            pinger.kill()
            pinger.wait()
    finally:
        topo.close()
    names = ["hub", "card 1", "card 2"]
    print(f"\nidle cost: CPU % of one core (wakeups/s), averaged over {IDLE_SECS} s\n")
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for phase, r in results.items():
        print(f"| {phase} | " + " | ".join(f"{r[n]['cpu_pct']:.2f} ({r[n]['wakeups']:.1f})" for n in names) + " |")
    hub = results["idle"]["hub"]["cpu_pct"]
    print(f"\ntarget: hub with two idle cards <= {HUB_TARGET_PCT:g}% of a core: "
          f"{hub:.2f}% ({'met' if hub <= HUB_TARGET_PCT else 'not met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
