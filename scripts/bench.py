"""
make bench: iperf3 TCP (both directions) and ping through sevpn between
two namespaces, beside the same over the bare veth path through the hub's
namespace; then the same card to card over three emulated internet lines
(scripts/bench_wan.py, docs/bench-real-lines.md).  Also card 1 to a
host on a real LAN behind the hub (a Linux bridge the hub joins with
--bridge, as an office LAN would be).  A benchmark, not a
test: it prints figures and asserts nothing.

    make bench DUR=10          seconds per iperf3 run (about 7 minutes in all at 10)
    make bench LINES=0         the veth table only (about 2 minutes)
    make bench LINES=A,C       the veth table and lines A and C only
    SEVPN_NIC_ARGS="..."       extra flags for both cards
    SEVPN_HUB_ARGS="..."       extra flags for the hub
    BENCH_JSON=FILE            the lines' figures and ss samples as JSON
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts import bench_wan  # noqa: E402
from scripts.netns import Lan, script_topology, two_cards  # noqa: E402
from scripts.wan import select_lines  # noqa: E402

DUR = int(os.environ.get("DUR", "10"))


def _ns(topo, where) -> str:
    """A namespace: card host C{where} of the topology, or a namespace by name."""
    return where if isinstance(where, str) else topo.host(where)


def ping(topo, src, addr, count=20, interval="0.05"):
    out = topo.run(_ns(topo, src), "ping", "-q", "-c", str(count), "-i", interval, addr, check=False)
    m = re.search(r"= [\d.]+/([\d.]+)/([\d.]+)", out)
    return float(m.group(1)) if m else float("nan")


def iperf(topo, src, dst, addr, reverse=False, udp64=False):
    server = topo.spawn(_ns(topo, dst), "iperf3-server", "iperf3", "-s", "-1", "-B", addr)
    time.sleep(0.5)
    args = ["iperf3", "-c", addr, "-t", str(DUR), "-J"] + (["-R"] if reverse else [])
    if udp64:
        args += ["-u", "-l", "64", "-b", "0"]
    out = topo.run(_ns(topo, src), *args, check=False, timeout=DUR + 60)
    server.wait(20)
    try:
        end = json.loads(out)["end"]
        if udp64:
            s = end["sum"]
            return (s["packets"] - s["lost_packets"]) / s["seconds"]
        return end["sum_received"]["bits_per_second"] / 1e6
    except (ValueError, KeyError):
        return float("nan")


def loaded_ping(topo, src, dst, addr):
    server = topo.spawn(_ns(topo, dst), "iperf3-server", "iperf3", "-s", "-1", "-B", addr)
    time.sleep(0.5)
    load = subprocess.Popen(["ip", "netns", "exec", _ns(topo, src), "iperf3", "-c", addr, "-t", str(DUR)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    rtt = ping(topo, src, addr, count=max(5, (DUR - 3) * 5), interval="0.2")
    load.wait(DUR + 30)
    server.wait(20)
    return rtt


def measure(topo, addr, dst=2):
    """Every figure from card host 1 to C{addr} in C{dst} (card host 2, or a namespace's name)."""
    return {
        "ping_ms": ping(topo, 1, addr),
        "tcp_mbps": iperf(topo, 1, dst, addr),
        "tcp_reverse_mbps": iperf(topo, 1, dst, addr, reverse=True),
        "udp64_pps": iperf(topo, 1, dst, addr, udp64=True),
        "loaded_ping_ms": loaded_ping(topo, 1, dst, addr),
    }


def main():
    try:
        lines = select_lines(os.environ.get("LINES"))
    except ValueError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    topo = script_topology("bench")
    results = {}
    try:
        # bare veth: host 1 -> hub namespace (forwarding) -> host 2
        topo.run(topo.hub_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        topo.run(topo.host(1), "ip", "route", "add", f"10.{topo.subnet}.2.0/24", "via", topo.hub_addr(1))
        topo.run(topo.host(2), "ip", "route", "add", f"10.{topo.subnet}.1.0/24", "via", topo.hub_addr(2))
        results["bare veth"] = measure(topo, topo.host_addr(2))
        topo.run(topo.hub_ns, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        # through sevpn: card to card, and card to a host on a real LAN the hub bridges (--bridge)
        lan = Lan(topo, prefix=f"192.168.{topo.subnet}", dhcp=False, router=254)  # host .10, beside the cards
        extra = tuple(shlex.split(os.environ.get("SEVPN_NIC_ARGS", "")))
        hub_extra = tuple(shlex.split(os.environ.get("SEVPN_HUB_ARGS", "")))
        two_cards(topo, hub_args=hub_extra + ("--bridge", f"DEFAULT={lan.hub_if}"), card_args=extra)
        topo.ping(1, 2)
        results["sevpn"] = measure(topo, topo.tap_addr(2))
        results["sevpn to a bridged LAN host"] = measure(topo, lan.host, dst=lan.host_ns)
    finally:
        topo.close()
    cols = ["ping_ms", "tcp_mbps", "tcp_reverse_mbps", "udp64_pps", "loaded_ping_ms"]
    print(f"\nsevpn bench ({DUR} s per iperf3 run; hub in its own namespace, cards in two others)\n")
    print("| path | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if c.endswith("ms") else f"{r[c]:.0f}" for c in cols) + " |")
    if "sevpn" in results and "bare veth" in results:
        b, s = results["bare veth"], results["sevpn"]
        print(f"\nsevpn/bare: TCP {s['tcp_mbps'] / b['tcp_mbps']:.3f}, "
              f"TCP -R {s['tcp_reverse_mbps'] / b['tcp_reverse_mbps']:.3f}")
    sys.stdout.flush()
    return bench_wan.main(lines)


if __name__ == "__main__":
    sys.exit(main())
