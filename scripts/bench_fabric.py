"""
The fabric's cost, measured: iperf3 TCP (both directions) and ping between
two cards on different hub nodes (card -> node 1 -> VXLAN -> node 2 ->
card) beside two cards on one node (card -> node 1 -> card), and the bare
access network between the card hosts for reference; in one run, with
the ratios.  A benchmark, not a test: it prints figures and asserts
nothing.  Run it on a quiet machine:

    make bench-fabric              (or: .venv/bin/python scripts/bench_fabric.py)
    DUR=10                         seconds per iperf3 run (default 10; about 2 minutes in all)
    SEVPN_NIC_ARGS="..."           extra flags for every card

Two nodes in network namespaces (scripts/fabric_hubs.py): FRR, 'sevpn
fabric up', a hub with --fabric DEFAULT=100 on each; card 1 and card 3
on node 1, card 2 on node 2.
"""

import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.bench import DUR, iperf, ping  # noqa: E402
from scripts.fabric_hubs import FabricHubs  # noqa: E402
from scripts.fabric_topology import skip_reason  # noqa: E402


def measure(topo, dst: int, addr: str) -> dict:
    return {
        "ping_ms": ping(topo, 1, addr),
        "tcp_mbps": iperf(topo, 1, dst, addr),
        "tcp_reverse_mbps": iperf(topo, 1, dst, addr, reverse=True),
    }


def main() -> int:
    reason = skip_reason()
    if reason:
        print(f"bench-fabric: cannot run: {reason}", file=sys.stderr)
        return 1
    extra = tuple(shlex.split(os.environ.get("SEVPN_NIC_ARGS", "")))
    topo = FabricHubs(2)
    results = {}
    try:
        for n in (1, 2):
            topo.fabric_up(n)
        for i in (1, 2, 3):
            topo.add_user(f"u{i}")
        for n in (1, 2):
            topo.start_frr(n)
        topo.wait_converged()
        for n in (1, 2):
            topo.start_node_hub(n)
        topo.add_host(3)  # a second card host, for a card beside card 1 on node 1
        for i, node in ((1, 1), (2, 2), (3, 1)):
            topo.start_card(i, hub=f"{topo.node_addr(node)}:5555", extra=extra)
        for i in (1, 2, 3):
            topo.wait_connected(i)
        topo.ping(1, 2)
        topo.ping(1, 3)
        time.sleep(1)
        results["bare access network"] = measure(topo, 2, topo.host_addr(2))
        results["one node (card 1 -> node 1 -> card 3)"] = measure(topo, 3, topo.tap_addr(3))
        results["two nodes (card 1 -> node 1 -> VXLAN -> node 2 -> card 2)"] = measure(topo, 2, topo.tap_addr(2))
    finally:
        topo.close()
    cols = ["ping_ms", "tcp_mbps", "tcp_reverse_mbps"]
    print(f"\nsevpn fabric bench ({DUR} s per iperf3 run; hub nodes and card hosts in namespaces)\n")
    print("| path | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if c.endswith("ms") else f"{r[c]:.0f}" for c in cols) + " |")
    one, two = (results[k] for k in list(results)[1:])
    print(f"\ntwo nodes / one node: TCP {two['tcp_mbps'] / one['tcp_mbps']:.3f}, "
          f"TCP -R {two['tcp_reverse_mbps'] / one['tcp_reverse_mbps']:.3f}, "
          f"ping {two['ping_ms'] / one['ping_ms']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
