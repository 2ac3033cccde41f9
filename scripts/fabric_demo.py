"""
make demo-fabric: three hub nodes in network namespaces joined into one
layer-2 segment (VNI 100) by the kernel's VXLAN and FRR's BGP-EVPN, a full
iBGP mesh; a stand-in card host on nodes 1 and 2 and a stand-in hub worker
port on node 3 that reflects a MAC into its bridge.  Shows each node's
fabric view, pings across, removes everything.

Until the hub's own fabric ports exist the "card hosts" are veth ports
of the node bridges, where the hub's TAP ports will be.
"""

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sevpn.fabric import format_status, frr_conf  # noqa: E402
from scripts.fabric_topology import VNI, FabricTopology, skip_reason  # noqa: E402
from scripts.netns import wait_for  # noqa: E402


def step(text):
    print(f"\n== {text}", flush=True)


def main():
    reason = skip_reason()
    if reason:
        print(f"demo-fabric: cannot run: {reason}", file=sys.stderr)
        sys.exit(1)
    topo = FabricTopology(3)
    try:
        step(f"underlay {topo.underlay}: a bridge; nodes {', '.join(topo.node_ns(i) for i in (1, 2, 3))} "
             f"with VTEPs {', '.join(topo.vtep(i) for i in (1, 2, 3))}; br-{VNI} + vx-{VNI} on each")
        for i in (1, 2):
            topo.add_card_host(i)
            print(f"card host {topo.host_ns(i)}: {topo.host_addr(i)} on port c{i} of node {i}'s bridge")
        port = topo.add_hub_port(3, "demo")
        print(f"node 3: stand-in hub worker with TAP {topo.nodes[3].segment(VNI).tap_name(0)} in br-{VNI}")
        step(f"FRR for node 1 ({topo.node_ns(1)}): frr.conf")
        print(frr_conf(topo.nodes[1]).replace(topo.nodes[1].password, "********"))
        start = time.monotonic()
        topo.start_frr()
        for i in (1, 2, 3):
            print(f"$ ip netns exec {topo.node_ns(i)} /usr/lib/frr/zebra -d -N {topo.node_ns(i)} -f .../zebra.conf "
                  f"-P 0 ...; ... bgpd -d -N {topo.node_ns(i)} -f .../frr.conf -P 0 ...")
        wait_for(topo.converged, 30, "the BGP-EVPN sessions and flood lists")
        print(f"all sessions up after {time.monotonic() - start:.1f} s")
        step("ping from card host 1 to card host 2, across VXLAN")
        subprocess.run(["ip", "netns", "exec", topo.host_ns(1), "ping", "-c", "3", "-i", "0.2",
                        topo.host_addr(2)], check=True)
        step("the hub on node 3 reflects a MAC of one of its cards: 02:fb:de:00:00:01")
        port.command("add 02:fb:de:00:00:01")
        print(port.command("sync"))
        wait_for(lambda: "02:fb:de:00:00:01" in topo.frr[1].vtysh("show evpn mac vni all"), 10,
                 "node 1 to learn it")
        print(f"$ vtysh -N {topo.node_ns(1)} -c 'show evpn mac vni all'")
        print(topo.frr[1].vtysh("show evpn mac vni all"))
        for i in (1, 2, 3):
            step(f"sevpn hub fabric, node {i}")
            print(format_status(topo.frr[i].status(topo.runner(i))))
    finally:
        step("removing FRR, the namespaces and the temporary files")
        topo.close()


if __name__ == "__main__":
    main()
