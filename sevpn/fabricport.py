"""
A hub's virtual hubs in its node's fabric: C{twistd sevpn-hub --fabric HUB=VNI}.

For each such virtual hub the hub (each hub worker) has one TAP port,
named L{sevpn.fabric.Segment.tap_name} of its worker number, in the node
bridge C{br-VNI} that C{sevpn fabric up} made with its VXLAN device
(docs/fabric.md).  Frames to stations on other workers or nodes leave
through it and the kernel's bridge and VXLAN carry them; FRR tells the
other nodes which MACs are here.

So that FRR knows at once, and not only after the bridge sees a frame,
the MACs the virtual hub learns on its own ports (cards, cascades, local
bridges) are I{reflected} into the bridge's FDB as static entries on the
TAP (L{sevpn.netlink.FdbReflector}), through the switch's C{on_learn} and
C{on_forget} hooks: added when learned, removed when aged out or their
port goes, moved when they move.  Never the MACs learned on the fabric
port itself: those are other workers' and nodes' stations, and claiming
them here would make two nodes advertise them.  The fabric port
I{yields} its MACs (L{sevpn.port.Port.yields_macs}): a station that was
elsewhere and now joins this hub takes its MAC along without a conflict.

What the hub needs and finds on the node, or refuses to start without (a
sentence naming C{sevpn fabric up}): the bridge, its VXLAN device and
that device's MTU (the segment's, which the TAP takes) and local address
(the VTEP, for status).  Needs C{CAP_NET_ADMIN}.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

from twisted.logger import Logger

from sevpn.fabric import LINKS_COMMAND, FabricError, Runner, Segment, apply, parse_links, plan_attach, segment_on_node
from sevpn.switch import VirtualHub


class MacReflection:
    """
    Keeps the node bridge's FDB entries on a virtual hub's fabric port in
    step with the virtual hub's local MACs: the switch's C{on_learn} and
    C{on_forget} hooks.  Pure: C{reflector} is anything with C{add(mac)}
    and C{remove(mac)} (an L{sevpn.netlink.FdbReflector}).
    """

    def __init__(self, vhub: VirtualHub, fabric_port, reflector) -> None:
        self.vhub = vhub
        self.port = fabric_port
        self.reflector = reflector

    def start(self) -> None:
        """Hook into the switch, and reflect the local MACs it already knows."""
        vhub = self.vhub
        if vhub.on_learn is not None or vhub.on_forget is not None:
            raise FabricError(f"virtual hub {vhub.name} already has a table observer")
        vhub.on_learn, vhub.on_forget = self.learned, self.forgot
        for mac, entry in list(vhub.table.items()):
            if entry.port is not self.port:
                self.reflector.add(mac)

    def stop(self) -> None:
        if self.vhub.on_learn == self.learned:
            self.vhub.on_learn = self.vhub.on_forget = None

    def learned(self, mac: bytes, port) -> None:
        if port is not self.port:
            self.reflector.add(mac)

    def forgot(self, mac: bytes, port) -> None:
        if port is not self.port:
            self.reflector.remove(mac)


class FabricMember:
    """One virtual hub in the fabric: its segment, its TAP port, its reflection."""

    def __init__(self, vhub: VirtualHub, segment: Segment, vtep: str, port, reflector, worker: int) -> None:
        self.vhub = vhub
        self.segment = segment
        self.vtep = vtep
        self.port = port
        self.reflector = reflector
        self.worker = worker
        self.reflection = MacReflection(vhub, port, reflector)

    def describe(self) -> dict:
        """For C{sevpn hub fabric}: the segment, the TAP, the MACs on each side, the reflection's counters."""
        seg = self.segment
        local = sum(1 for e in self.vhub.table.values() if e.port is not self.port)
        info = {
            "hub": seg.hub, "vni": seg.vni, "bridge": seg.bridge, "vxlan": seg.vxlan, "vtep": self.vtep,
            "mtu": seg.mtu, "tap": self.port.device_name, "worker": self.worker,
            "local_macs": local, "remote_macs": len(self.port.macs),
            "reflection": self.reflector.stats(),
        }
        info.update({f"port_{k}": v for k, v in self.port.counters().items()})
        return info

    def close(self) -> None:
        """
        Leave the fabric: stop reflecting MACs, take the port off the virtual
        hub, then close the FDB reflector and the TAP.
        """
        self.reflection.stop()
        self.vhub.remove_port(self.port)
        self.reflector.close()
        self.port.close()


log = Logger(namespace="sevpn.fabricport")


def attach_fabric(
    vhub_for: Callable[[str], VirtualHub], reactor, fabric: Sequence[Tuple[str, int]], worker: int = 0,
    run: Optional[Runner] = None, open_port=None, reflector_for=None,
) -> List[FabricMember]:
    """
    Give each virtual hub of C{fabric} (C{(hub, vni)} pairs) its fabric
    port: find its segment on the node, open the worker's TAP (carrier on,
    the segment's MTU, no IPv6 address of its own), put it into the
    bridge, attach it to the virtual hub and start reflecting.  On a
    L{FabricError} (a sentence) nothing stays attached.

    @param run: runs C{ip} (L{sevpn.frr.command_runner} by default).
    @param open_port: C{open_port(name, max_macs)} -> the TAP port (tests).
    @param reflector_for: C{reflector_for(tap_name)} -> an FDB reflector (tests).
    """
    if run is None:
        from sevpn.frr import command_runner

        run = command_runner()
    if open_port is None:
        open_port = _tap_opener(reactor)
    if reflector_for is None:
        from sevpn.netlink import FdbReflector

        def reflector_for(name):
            return FdbReflector(name, reactor)

    members: List[FabricMember] = []
    try:
        for hub_name, vni in fabric:
            segment, vtep = segment_on_node(hub_name, vni, parse_links(run(LINKS_COMMAND)))
            vhub = vhub_for(hub_name)
            name = segment.tap_name(worker)
            port = open_port(name, vhub.max_entries)
            try:
                port.yields_macs = True
                apply(plan_attach(segment, name, parse_links(run(LINKS_COMMAND))), run)
                port.set_carrier(True)  # after addrgenmode none: the kernel says nothing into the segment
                reflector = reflector_for(name)
            except BaseException:
                port.close()
                raise
            member = FabricMember(vhub, segment, vtep, port, reflector, worker)
            members.append(member)
            vhub.add_port(port)
            member.reflection.start()
            port.start_reading()
            log.info(
                "virtual hub {hub} is in the fabric as VNI {vni}: TAP {tap} (MTU {mtu}) in bridge {bridge}, "
                "VXLAN from VTEP {vtep}; its stations' MACs are reflected into the bridge for FRR",
                hub=hub_name, vni=vni, tap=name, mtu=segment.mtu, bridge=segment.bridge, vtep=vtep,
            )
    except BaseException:
        detach_fabric(members)
        raise
    return members


def _tap_opener(reactor):
    from sevpn.tapdevice import TapError, TapPort

    def open_port(name: str, max_macs: int):
        try:
            return TapPort(name, None, reactor, offload=True, backpressure=True, max_macs=max_macs,
                           label=f"fabric:{name}")
        except TapError as e:
            raise FabricError(f"cannot open the fabric port: {e}")

    return open_port


def detach_fabric(members: Sequence[FabricMember]) -> None:
    """Take the fabric ports off their virtual hubs and close them (the TAP and its FDB entries go)."""
    for member in members:
        member.close()


def describe_fabric(members: Sequence[FabricMember]) -> List[dict]:
    """Each fabric member's L{FabricMember.describe}, for C{sevpn hub fabric}."""
    return [m.describe() for m in members]
