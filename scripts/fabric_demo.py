"""
make demo-fabric: one virtual hub served by two hub nodes, the way two
top-of-rack switches make one layer-2 segment.  Two nodes in network
namespaces on one underlay; on each, 'sevpn fabric up' (bridge + VXLAN),
FRR from 'sevpn fabric frr-config' (BGP-EVPN), and a real hub with
--fabric DEFAULT=100.  A card on each node; a ping and a transfer across;
what the nodes know; then node 1 dies and its card moves to node 2.
Everything is removed at the end.
"""

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.fabric_hubs import HUB, VNI, FabricHubs  # noqa: E402
from scripts.fabric_topology import skip_reason  # noqa: E402
from scripts.netns import wait_for  # noqa: E402


def step(text):
    print(f"\n== {text}", flush=True)


def show(topo, n, *args):
    print(f"[node {n}]$ sevpn {' '.join(args)}")
    print(topo.node_command(n, *args).rstrip())


def main():
    reason = skip_reason()
    if reason:
        print(f"demo-fabric: cannot run: {reason}", file=sys.stderr)
        sys.exit(1)
    topo = FabricHubs(2, password=None)
    try:
        step(f"two hub nodes, {topo.node_ns(1)} and {topo.node_ns(2)}: underlay addresses (VTEPs) "
             f"{topo.vtep(1)} and {topo.vtep(2)}, addresses for the cards {topo.node_addr(1)} and {topo.node_addr(2)}")
        step("on each node, as root, before FRR and the hub (a oneshot unit): the segment's bridge and VXLAN device")
        for n in (1, 2):
            print(f"[node {n}]$ sevpn fabric up --vtep {topo.vtep(n)} --fabric {HUB}={VNI}")
            print(topo.fabric_up(n).rstrip())
        step("FRR on each node: bgpd speaks BGP-EVPN to the other node")
        show(topo, 1, "fabric", "frr-config", "--name", topo.node_ns(1), "--vtep", topo.vtep(1), "--peer", topo.vtep(2))
        start = time.monotonic()
        for n in (1, 2):
            topo.start_frr(n)
        topo.wait_converged()
        print(f"(zebra + bgpd started on both nodes; the EVPN session is up after {time.monotonic() - start:.1f} s)")
        step("one CA and the same users on both nodes (copied before the hubs first start)")
        topo.add_user("alice")
        topo.add_user("bob")
        print(f"ca.pem and ca.key copied into {topo.node_state(1)} and {topo.node_state(2)}; "
              "'sevpn hub user add' for alice and bob on each")
        step(f"the hubs: twistd sevpn-hub --fabric {HUB}={VNI} on each node")
        for n in (1, 2):
            topo.start_node_hub(n)
            line = next(ln for ln in topo.log(f"hub{n}").splitlines() if "is in the fabric" in ln)
            print(f"[node {n}] {line.split('] ', 1)[1]}")
        step("a card on each node; alice's account lists node 1, then node 2")
        topo.start_card_on_nodes(1, [1, 2], user="alice")
        topo.start_card_on_nodes(2, [2], user="bob")
        for i, who in ((1, "alice"), (2, "bob")):
            s = topo.wait_connected(i)
            print(f"card {i} ({who}): {s['state']} to {s['hub']}, MAC {s['mac']}, address {topo.tap_addr(i)}")
        step("card 1 (node 1) pings card 2 (node 2): across VXLAN")
        print(topo.run(topo.host(1), "ping", "-c", "3", "-i", "0.2", topo.tap_addr(2)).rstrip())
        step("20 MB over TCP across the nodes (iperf3)")
        server = topo.spawn(topo.host(2), "iperf3", "iperf3", "-s", "-1", "-B", topo.tap_addr(2))
        time.sleep(0.5)
        out = topo.run(topo.host(1), "iperf3", "-c", topo.tap_addr(2), "-n", "20M", "-f", "m")
        print("\n".join(ln for ln in out.splitlines() if "sender" in ln or "receiver" in ln))
        server.wait(10)
        step("what node 2 knows: card 1's MAC as an EVPN route from node 1's VTEP")
        print(f"[node 2]$ vtysh -N {topo.node_ns(2)} -c 'show evpn mac vni all'")
        print(topo.evpn_macs(2).strip())
        step("the fabric as node 1's operator sees it")
        show(topo, 1, "hub", "fabric", "--state-dir", topo.node_state(1), "--frr-pathspace", topo.node_ns(1))
        step("node 1 dies (its hub and FRR killed): card 1 dials node 2 by itself")
        pinger = subprocess.Popen(["ip", "netns", "exec", topo.host(1), "ping", "-D", "-i", "0.1", "-W", "1",
                                   topo.tap_addr(2)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(1)
        killed = time.time()
        topo.kill_node(1)
        wait_for(lambda: topo.card_status(1)["hub"].startswith(topo.node_addr(2)), 60, "card 1 to move")
        time.sleep(1)
        pinger.terminate()
        replies = [float(ln[1:ln.index("]")]) for ln in pinger.communicate()[0].splitlines()
                   if ln.startswith("[") and "bytes from" in ln]
        back = [t - killed for t in replies if t > killed]
        print(f"card 1 is now on {topo.card_status(1)['hub']}; its pings to card 2 were answered again "
              f"{back[0]:.2f} s after node 1 died" if back else "card 1's pings were not answered again")
        step("demo done: removing FRR, the hubs, the cards and the namespaces")
        return 0
    finally:
        topo.close()


if __name__ == "__main__":
    sys.exit(main())
