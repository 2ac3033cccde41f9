"""
make demo: a hub and two virtual LAN cards in network namespaces, on the
hub's and cards' default settings; ping and a TCP transfer across the
virtual LAN, the hub's view of it, and everything removed afterwards.
"""

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.netns import script_topology, sevpn  # noqa: E402


def step(text):
    print(f"\n== {text}", flush=True)


def show(cmd):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main():
    topo = script_topology("demo")
    try:
        step(f"namespaces {topo.hub_ns} (hub), {topo.host(1)} and {topo.host(2)} (cards), joined by veth pairs")
        topo.add_user("alice")
        topo.add_user("bob")
        print(f"users alice and bob added to virtual hub DEFAULT in {topo.hub_state}")
        step("starting the virtual HUB (twistd sevpn-hub, TLS on tcp:5555) and two virtual LAN cards")
        topo.start_hub()
        topo.start_card(1, user="alice")
        topo.start_card(2, user="bob")
        for i in (1, 2):
            s = topo.wait_connected(i)
            print(f"card {i}: {s['state']} as {s['user']}, TAP sv0 MAC {s['mac']}, "
                  f"address {topo.tap_addr(i)}, carrier {topo.carrier(i)}")
        step("ping across the virtual LAN")
        show(["ip", "netns", "exec", topo.host(1), "ping", "-c", "4", "-i", "0.2", topo.tap_addr(2)])
        step("20 MB over TCP through the hub (iperf3)")
        server = topo.spawn(topo.host(2), "iperf3", "iperf3", "-s", "-1", "-B", topo.tap_addr(2))
        import time

        time.sleep(0.5)
        show(["ip", "netns", "exec", topo.host(1), "iperf3", "-c", topo.tap_addr(2), "-n", "20M", "-f", "m"])
        server.wait(10)
        step("the hub's sessions (sevpn hub sessions)")
        print(sevpn("hub", "sessions", "--state-dir", topo.hub_state).stdout)
        step("the hub's MAC table (sevpn hub macs)")
        print(sevpn("hub", "macs", "--state-dir", topo.hub_state).stdout)
        step("card 1's status (sevpn nic status)")
        print(sevpn("nic", "status", "--state-dir", topo.card_state(1)).stdout)
        step("demo done: cleaning up")
        return 0
    finally:
        topo.close()


if __name__ == "__main__":
    sys.exit(main())
