"""
The hub with many idle sessions (issue: a hub that scales): its memory
with COUNT authenticated idle cards keeping their keepalives, how long
they took to join, and two real cards' TCP throughput without and with
those sessions.  The idle cards log in with a client certificate (a
password login spends a deliberate ~25 ms of scrypt each) from SOURCES
loopback addresses (default 100), under the hub's default bounds except
the per-user session limit, lifted for their one user.

    COUNT=10000 DUR=10 python scripts/bench_sessions.py
"""

import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.bench import iperf  # noqa: E402
from scripts.netns import script_topology, sevpn, two_cards, wait_for  # noqa: E402

COUNT = int(os.environ.get("COUNT", "10000"))
SOURCES = os.environ.get("SOURCES", "100")


def rss_mib(topo) -> float:
    pids = topo.run(None, "ip", "netns", "pids", topo.hub_ns).split()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"sevpn-hub" not in f.read():
                    continue
            with open(f"/proc/{pid}/status") as f:
                return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024
        except (FileNotFoundError, AttributeError):
            continue
    return float("nan")


def sessions(topo) -> int:
    import json

    return json.loads(sevpn("hub", "status", "--json", "--state-dir", topo.hub_state).stdout)["sessions"]


def main():
    topo = script_topology("bench")
    try:
        two_cards(topo, hub_args=("--max-sessions-per-user", "0"))
        sevpn("hub", "user", "add", "idle", "--cert", "--out", topo.dir, "--state-dir", topo.hub_state)
        identity = f"{os.path.join(topo.dir, 'idle.pem')}:{os.path.join(topo.dir, 'idle.key')}"
        topo.ping(1, 2)
        before_rss = rss_mib(topo)
        before = iperf(topo, 1, 2, topo.tap_addr(2))
        start = time.monotonic()
        topo.spawn(topo.hub_ns, "idle-cards", "env", f"SOURCES={SOURCES}", sys.executable, "scripts/idle_cards.py",
                   str(COUNT), "127.0.0.1:5555", "idle", identity, os.path.join(topo.hub_state, "ca.pem"))
        wait_for(lambda: sessions(topo) >= COUNT + 2, 600, f"{COUNT} idle sessions", interval=2)
        joined = time.monotonic() - start
        time.sleep(15)  # a round of keepalives
        after_rss = rss_mib(topo)
        after = iperf(topo, 1, 2, topo.tap_addr(2))
        held = sessions(topo)
    finally:
        topo.close()
    print(f"\nhub with {held - 2} idle sessions (+2 busy cards); all joined in {joined:.0f} s")
    print(f"hub RSS: {before_rss:.1f} MiB with 2 cards, {after_rss:.1f} MiB with {held} sessions")
    print(f"TCP between the two cards: {before:.0f} Mbit/s alone, {after:.0f} Mbit/s beside the idle sessions "
          f"({after / before:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
