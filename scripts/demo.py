"""
make demo: a hub and two virtual LAN cards in network namespaces, on the
hub's and cards' default settings; ping and a TCP transfer across the
virtual LAN, the hub's view of it, and everything removed afterwards.
Then the main use: the hub bridged into a real LAN (a Linux bridge with a
DHCP server and a host), and a third card that gets its address from
that LAN's DHCP server through the VPN and pings the LAN's host.
"""

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.netns import Lan, addresses, script_topology, sevpn, start_card_on, wait_for  # noqa: E402


def step(text):
    print(f"\n== {text}", flush=True)


def show(cmd):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main():
    topo = script_topology("demo", hosts=3)
    lan = None
    try:
        step(f"namespaces {topo.hub_ns} (hub), {topo.host(1)} and {topo.host(2)} (cards), joined by veth pairs")
        lan = Lan(topo)
        lan.own_etc(topo.host(3))
        print(f"a LAN in {lan.ns}: Linux bridge br0 ({lan.router}, dnsmasq hands out {lan.prefix}.100-150), "
              f"host {lan.host} in {lan.host_ns}; the hub's {lan.hub_if} is plugged into it")
        topo.add_user("alice")
        topo.add_user("bob")
        topo.add_user("carol")
        print(f"users alice, bob and carol added to virtual hub DEFAULT in {topo.hub_state}")
        step(f"starting the virtual HUB (twistd sevpn-hub, TLS on tcp:5555, --bridge DEFAULT={lan.hub_if}) "
             "and two virtual LAN cards")
        topo.start_hub("--bridge", f"DEFAULT={lan.hub_if}")
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
        step(f"a third card, on {topo.host(3)}, with --dhcp: its address comes from the LAN's dnsmasq")
        start_card_on(topo, 3, "sv0", "--dhcp", user="carol")
        topo.wait_connected(3)
        lease = wait_for(lambda: [a for a in addresses(topo, topo.host(3), "sv0") if a.startswith(lan.prefix)],
                         60, "card 3's DHCP lease")[0]
        print(f"card 3: TAP sv0 got {lease} by DHCP, from the LAN, through the VPN")
        show(["ip", "netns", "exec", topo.host(3), "ping", "-c", "3", "-i", "0.2", lan.host])
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
        if lan is not None:
            lan.close()


if __name__ == "__main__":
    sys.exit(main())
