"""
The hub nodes' layer-2 fabric: a top-of-rack switch's design, in Linux.

Per virtual hub in the fabric (C{--fabric HUB=VNI}) every hub node has a
Linux bridge holding a VXLAN device for the VNI (the data plane, the
kernel's) and the TAP ports of the hub's workers.  FRR's bgpd, speaking
BGP-EVPN to the other nodes, is the control plane: zebra sees the MACs in
the bridge and bgpd advertises them (EVPN type 2) and the node's VTEP for
the VNI (type 3, which builds the flood list); what it learns from the
other nodes it writes into the VXLAN device's FDB.  sevpn writes no MAC
distribution of its own: the hub reflects the MACs of its cards into the
bridge as static entries (L{sevpn.netlink.FdbReflector}) and FRR does the
rest.  docs/fabric.md has the picture.

This module is pure -- it describes, plans and parses, and runs nothing:
 - L{FabricNode}, L{Segment} and L{fabric}: what a node is;
 - L{frr_conf} / L{zebra_conf}: FRR's configuration for a node;
 - L{plan_up} / L{plan_down} / L{plan_attach}: the C{ip} and C{bridge}
   commands that make the kernel match the description, computed from
   what C{ip -j -d link show} says is there, so running them is idempotent;
 - L{describe} and L{format_status}: the C{sevpn hub fabric} view, from
   what C{vtysh} and C{bridge -j fdb show} print.

BGP sessions: iBGP within one AS.  By default a full mesh: every node
peers with every other, so losing a node loses only that node's MACs,
and N nodes need N(N-1)/2 sessions -- nothing for BGP at the tens of
nodes a hub fabric has.  For more, name route reflectors: a reflector
peers with every node (non-reflectors as its C{route-reflector-client}s,
other reflectors as plain iBGP peers), the others peer only with the
reflectors.  Name two: while the only reflector is down every session is
down and every node forgets every remote MAC.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

DEFAULT_ASN = 65000
VXLAN_PORT = 4789
#: IPv4 + UDP + VXLAN + inner Ethernet: what the underlay's MTU must exceed the segment's by.
VXLAN_OVERHEAD = 50
MAX_VNI = (1 << 24) - 1
IFNAMSIZ = 16
#: Flood-list entries in a VXLAN device's FDB have this MAC.
FLOOD_MAC = "00:00:00:00:00:00"

_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_PASSWORD = re.compile(r"^[\x21-\x7e]{1,80}$")

Argv = List[str]


class FabricError(Exception):
    """A fabric description or a node's state that cannot work; the message says why."""


def check_ifname(name: str, what: str = "device name") -> str:
    """A Linux interface name: 1-15 bytes, no slash, colon or white space, not "." or ".."."""
    if not isinstance(name, str) or not name or len(name.encode()) >= IFNAMSIZ:
        raise FabricError(f"{what} {name!r} must be 1 to {IFNAMSIZ - 1} characters (Linux's limit)")
    if name in (".", "..") or re.search(r"[/:\s]", name):
        raise FabricError(f"{what} {name!r} may not contain '/', ':' or white space")
    return name


def check_vni(vni: int) -> int:
    """
    C{vni}, if it is a VXLAN network identifier (1 to L{MAX_VNI}, an C{int},
    not a C{bool}); else a L{FabricError}.
    """
    if not isinstance(vni, int) or isinstance(vni, bool) or not 1 <= vni <= MAX_VNI:
        raise FabricError(f"VNI {vni!r} is out of range: a VXLAN network identifier is 1 to {MAX_VNI}")
    return vni


def check_address(address: str, what: str = "address") -> str:
    """
    C{address} in its normal form if it is an IPv4 address (the fabric's
    underlay is IPv4); else a L{FabricError}.
    """
    try:
        return str(ipaddress.IPv4Address(address))
    except (ipaddress.AddressValueError, ValueError):
        raise FabricError(f"{what} {address!r} is not an IPv4 address")


def parse_fabric_option(text: str) -> Tuple[str, int]:
    """C{--fabric HUB=VNI} -> (hub, vni)."""
    hub, sep, vni = text.partition("=")
    if not sep or not hub or not vni.strip().isdigit():
        raise FabricError(f"--fabric {text!r}: expected HUB=VNI, e.g. --fabric DEFAULT=100")
    return hub, check_vni(int(vni))


@dataclass(frozen=True)
class Segment:
    """A virtual hub's Ethernet segment on one node: its VNI, bridge and VXLAN device."""

    hub: str
    vni: int
    bridge: str = ""
    vxlan: str = ""
    #: The segment's MTU: the VXLAN device's, and so what the bridge allows.
    mtu: int = 1500

    def __post_init__(self) -> None:
        check_vni(self.vni)
        if not self.bridge:
            object.__setattr__(self, "bridge", f"br-{self.vni}")
        if not self.vxlan:
            object.__setattr__(self, "vxlan", f"vx-{self.vni}")
        check_ifname(self.bridge, "bridge name")
        check_ifname(self.vxlan, "VXLAN device name")
        if self.bridge == self.vxlan:
            raise FabricError(f"VNI {self.vni}: the bridge and the VXLAN device cannot both be {self.bridge}")
        if not 68 <= self.mtu <= 65535 - VXLAN_OVERHEAD:
            raise FabricError(f"VNI {self.vni}: MTU {self.mtu} is out of range")

    def tap_name(self, worker: int) -> str:
        """The name for hub worker C{worker}'s TAP port on this segment (at most 14 characters)."""
        return check_ifname(f"vt{self.vni}-{worker}", "TAP name")


@dataclass(frozen=True)
class FabricNode:
    """
    One hub node: its VTEP (the underlay address its VXLAN packets and BGP
    sessions come from), its segments, and its BGP neighbours.

    @ivar peers: the VTEPs of the nodes it has BGP sessions with.
    @ivar clients: those of C{peers} that are its route-reflector clients.
    @ivar password: TCP-MD5 key for every session, or None.
    """

    name: str
    vtep: str
    segments: Tuple[Segment, ...] = ()
    peers: Tuple[str, ...] = ()
    clients: Tuple[str, ...] = ()
    asn: int = DEFAULT_ASN
    password: Optional[str] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NODE_NAME.match(self.name):
            raise FabricError(f"node name {self.name!r}: use letters, digits, '.', '-' and '_' (at most 63)")
        object.__setattr__(self, "vtep", check_address(self.vtep, f"node {self.name}'s VTEP"))
        object.__setattr__(self, "peers", tuple(check_address(p, f"node {self.name}'s peer") for p in self.peers))
        object.__setattr__(self, "clients", tuple(check_address(p, f"node {self.name}'s client") for p in self.clients))
        object.__setattr__(self, "segments", tuple(self.segments))
        if not isinstance(self.asn, int) or not 1 <= self.asn <= 0xFFFFFFFF:
            raise FabricError(f"AS number {self.asn!r} is out of range (1 to 4294967295)")
        if self.vtep in self.peers:
            raise FabricError(f"node {self.name} cannot peer with its own VTEP {self.vtep}")
        if len(set(self.peers)) != len(self.peers):
            raise FabricError(f"node {self.name} lists a peer twice")
        stray = set(self.clients) - set(self.peers)
        if stray:
            raise FabricError(f"node {self.name}: route-reflector clients {sorted(stray)} are not among its peers")
        if self.password is not None and not _PASSWORD.match(self.password):
            raise FabricError("the BGP password must be 1 to 80 printable characters without spaces")
        seen: Dict[str, str] = {}
        vnis: Dict[int, str] = {}
        for seg in self.segments:
            for dev in (seg.bridge, seg.vxlan):
                if dev in seen:
                    raise FabricError(f"node {self.name}: device {dev} is used twice ({seen[dev]} and VNI {seg.vni})")
                seen[dev] = f"VNI {seg.vni}"
            if seg.vni in vnis or seg.hub in vnis.values():
                raise FabricError(f"node {self.name}: VNI {seg.vni} or virtual hub {seg.hub} appears twice")
            vnis[seg.vni] = seg.hub

    @property
    def reflector(self) -> bool:
        return bool(self.clients)

    def segment(self, key) -> Segment:
        """The segment for a VNI (int) or a virtual hub's name (str)."""
        for seg in self.segments:
            if seg.vni == key or seg.hub == key:
                return seg
        raise FabricError(f"node {self.name} has no fabric segment for {key!r}")


def fabric(
    vteps: Mapping[str, str], segments: Iterable[Segment], reflectors: Iterable[str] = (),
    asn: int = DEFAULT_ASN, password: Optional[str] = None,
) -> Dict[str, FabricNode]:
    """
    Every node of a fabric, with its BGP neighbours worked out.

    @param vteps: node name -> VTEP address.
    @param reflectors: names of route-reflector nodes; none means a full mesh.
    """
    segments = tuple(segments)
    reflectors = list(reflectors)
    unknown = [r for r in reflectors if r not in vteps]
    if unknown:
        raise FabricError(f"route reflector {unknown[0]!r} is not one of the nodes {sorted(vteps)}")
    addresses = list(vteps.values())
    if len(set(addresses)) != len(addresses):
        raise FabricError("two nodes have the same VTEP address")
    nodes = {}
    for name, vtep in vteps.items():
        others = [(n, a) for n, a in vteps.items() if n != name]
        if not reflectors:
            peers, clients = [a for _, a in others], []
        elif name in reflectors:
            peers = [a for _, a in others]
            clients = [a for n, a in others if n not in reflectors]
        else:
            peers, clients = [vteps[r] for r in reflectors], []
        nodes[name] = FabricNode(name, vtep, segments, tuple(peers), tuple(clients), asn, password)
    return nodes


# FRR's configuration ---------------------------------------------------------


def zebra_conf(node: FabricNode) -> str:
    """What every daemon reads: zebra needs no more than this for EVPN."""
    return (
        f"! sevpn fabric node {node.name}: generated by sevpn, changes are overwritten\n"
        "frr defaults datacenter\n"
        f"hostname {node.name}\n"
        "!\n"
    )


def frr_conf(node: FabricNode) -> str:
    """
    The node's C{frr.conf}: zebra and bgpd, iBGP sessions from the VTEP,
    only the C{l2vpn evpn} address family, C{advertise-all-vni}.
    C{frr defaults datacenter} gives 3 s keepalives and no advertisement
    delay, which is what makes a new MAC reach the other nodes at once.
    The file holds the BGP password, if any: keep it 0640 frr:frr.
    """
    lines = [
        f"router bgp {node.asn}",
        f" bgp router-id {node.vtep}",
        " no bgp default ipv4-unicast",
    ]
    for peer in node.peers:
        lines += [f" neighbor {peer} remote-as internal", f" neighbor {peer} update-source {node.vtep}"]
        if node.password:
            lines.append(f" neighbor {peer} password {node.password}")
    lines += [" !", " address-family l2vpn evpn"]
    for peer in node.peers:
        lines.append(f"  neighbor {peer} activate")
        if peer in node.clients:
            lines.append(f"  neighbor {peer} route-reflector-client")
    lines += ["  advertise-all-vni", " exit-address-family", "exit", "!"]
    return zebra_conf(node) + "\n".join(lines) + "\n"


# the kernel's devices --------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """What C{ip -j -d link show} says about one device, as far as the fabric cares."""

    name: str
    kind: str
    up: bool
    master: Optional[str] = None
    mtu: int = 0
    vni: Optional[int] = None
    local: Optional[str] = None
    port: Optional[int] = None
    learning: Optional[bool] = None
    #: Whether the bridge learns source MACs on this port (None: not a bridge port).
    port_learning: Optional[bool] = None
    #: How the kernel makes the device's IPv6 link-local address ("eui64", "none"; None: not said).
    addrgenmode: Optional[str] = None


def parse_links(text: str) -> Dict[str, Link]:
    """C{ip -j -d link show} -> name -> L{Link}."""
    try:
        entries = json.loads(text or "[]")
    except ValueError:
        raise FabricError("'ip -j -d link show' printed something that is not JSON (is iproute2 too old?)")
    links = {}
    for e in entries if isinstance(entries, list) else []:
        if not isinstance(e, dict) or not isinstance(e.get("ifname"), str):
            continue
        info = e.get("linkinfo") or {}
        data = info.get("info_data") or {}
        slave = info.get("info_slave_data") or {}
        links[e["ifname"]] = Link(
            name=e["ifname"], kind=info.get("info_kind") or "", up="UP" in (e.get("flags") or ()),
            master=e.get("master"), mtu=e.get("mtu") or 0,
            vni=data.get("id") if info.get("info_kind") == "vxlan" else None,
            local=data.get("local"), port=data.get("port"), learning=data.get("learning"),
            port_learning=slave.get("learning") if info.get("info_slave_kind") == "bridge" else None,
            addrgenmode=e.get("inet6_addr_gen_mode"),
        )
    return links


@dataclass
class Plan:
    """Commands to run in order (each an argv), and what the plan chose not to do, as sentences."""

    commands: List[Argv] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def _check_vxlan(link: Link, node: FabricNode, seg: Segment) -> None:
    if link.kind != "vxlan":
        raise FabricError(f"{seg.vxlan} exists but is a {link.kind or 'plain'} device, not VXLAN: "
                          f"remove it ('ip link del {seg.vxlan}') or name another VXLAN device for VNI {seg.vni}")
    wrong = []
    if link.vni != seg.vni:
        wrong.append(f"VNI {link.vni} (want {seg.vni})")
    if link.local != node.vtep:
        wrong.append(f"local {link.local} (want {node.vtep})")
    if link.port != VXLAN_PORT:
        wrong.append(f"dstport {link.port} (want {VXLAN_PORT})")
    if link.learning:
        wrong.append("learning on (want nolearning: FRR fills its FDB)")
    if wrong:
        raise FabricError(f"{seg.vxlan} exists with {', '.join(wrong)}: remove it ('ip link del {seg.vxlan}') "
                          "and bring the segment up again")


def plan_up(node: FabricNode, seg: Segment, links: Mapping[str, Link]) -> Plan:
    """
    Commands that give C{seg} its bridge and VXLAN device, up; a bridge
    or VXLAN device that is already right is reused, one that conflicts is
    an error that says what to do.
    """
    plan = Plan()
    run = plan.commands.append
    bridge = links.get(seg.bridge)
    if bridge is None:
        # No IPv6 link-local address: the node is the segment's switch, not a host on it.
        run(["ip", "link", "add", seg.bridge, "type", "bridge"])
        run(["ip", "link", "set", seg.bridge, "addrgenmode", "none"])
    elif bridge.kind != "bridge":
        raise FabricError(f"{seg.bridge} exists but is a {bridge.kind or 'plain'} device, not a bridge: "
                          f"name another bridge for VNI {seg.vni}")
    else:
        plan.notes.append(f"bridge {seg.bridge} exists; reusing it")
    vxlan = links.get(seg.vxlan)
    if vxlan is None:
        run(["ip", "link", "add", seg.vxlan, "mtu", str(seg.mtu), "type", "vxlan", "id", str(seg.vni),
             "local", node.vtep, "dstport", str(VXLAN_PORT), "nolearning"])
        # Nor is the VXLAN device a host on the segment: without this its
        # IPv6 router solicitations and MLD reports would reach every card.
        run(["ip", "link", "set", seg.vxlan, "addrgenmode", "none"])
    else:
        _check_vxlan(vxlan, node, seg)
        if vxlan.mtu != seg.mtu:
            run(["ip", "link", "set", seg.vxlan, "mtu", str(seg.mtu)])
        if vxlan.addrgenmode not in (None, "none"):
            run(["ip", "link", "set", seg.vxlan, "addrgenmode", "none"])
            run(["ip", "-6", "addr", "flush", "dev", seg.vxlan])
    if vxlan is None or vxlan.master != seg.bridge:
        run(["ip", "link", "set", seg.vxlan, "master", seg.bridge])
    if vxlan is None or vxlan.master != seg.bridge or vxlan.port_learning is not False:
        run(["bridge", "link", "set", "dev", seg.vxlan, "learning", "off"])
    if vxlan is None or not vxlan.up:
        run(["ip", "link", "set", seg.vxlan, "up"])
    if bridge is None or not bridge.up:
        run(["ip", "link", "set", seg.bridge, "up"])
    return plan


def plan_attach(seg: Segment, port: str, links: Mapping[str, Link]) -> Plan:
    """
    Commands that make C{port} (a hub worker's TAP, or a test's veth) a
    port of C{seg}'s bridge, up, with the segment's MTU (a larger one
    would let through frames the VXLAN device drops) and without an IPv6
    link-local address of its own (the node is the segment's switch, not
    a host on it: no router solicitations or MLD reports into the tenants'
    LAN).
    """
    check_ifname(port, "port name")
    plan = Plan()
    link = links.get(port)
    if link is None:
        raise FabricError(f"there is no device {port} to attach to {seg.bridge}")
    if link.mtu != seg.mtu:
        plan.commands.append(["ip", "link", "set", port, "mtu", str(seg.mtu)])
    if link.addrgenmode not in (None, "none"):
        plan.commands.append(["ip", "link", "set", port, "addrgenmode", "none"])
    if link.master != seg.bridge:
        plan.commands.append(["ip", "link", "set", port, "master", seg.bridge])
    if not link.up:
        plan.commands.append(["ip", "link", "set", port, "up"])
    return plan


def segment_on_node(hub: str, vni: int, links: Mapping[str, Link]) -> Tuple[Segment, str]:
    """
    What a hub finds for C{--fabric HUB=VNI}: the segment (its MTU is the
    VXLAN device's) and the node's VTEP (the device's local address).
    The bridge and the VXLAN device are C{sevpn fabric up}'s to make; when
    they are missing or not right the error says to run it.
    """
    seg = Segment(hub, vni)
    up = f"run 'sevpn fabric up --vtep ADDRESS --fabric {hub}={vni}' first (as root; docs/fabric.md)"
    bridge, vxlan = links.get(seg.bridge), links.get(seg.vxlan)
    if bridge is None:
        raise FabricError(f"--fabric {hub}={vni}: there is no bridge {seg.bridge} on this node: {up}")
    if bridge.kind != "bridge":
        raise FabricError(f"--fabric {hub}={vni}: {seg.bridge} is a {bridge.kind or 'plain'} device, not a bridge")
    if vxlan is None or vxlan.kind != "vxlan" or vxlan.master != seg.bridge:
        raise FabricError(f"--fabric {hub}={vni}: bridge {seg.bridge} has no VXLAN device {seg.vxlan} in it: {up}")
    if vxlan.vni != vni:
        raise FabricError(f"--fabric {hub}={vni}: {seg.vxlan} carries VNI {vxlan.vni}, not {vni}: {up}")
    if not (bridge.up and vxlan.up):
        raise FabricError(f"--fabric {hub}={vni}: {seg.bridge} or {seg.vxlan} is down: {up}")
    if not vxlan.local:
        raise FabricError(f"--fabric {hub}={vni}: {seg.vxlan} has no local address (VTEP): {up}")
    return Segment(hub, vni, mtu=vxlan.mtu or seg.mtu), vxlan.local


def check_underlay(vtep: str, seg: Segment, addresses_json: str) -> List[str]:
    """
    Whether C{vtep} is an address of this machine (C{ip -j addr show}),
    else a L{FabricError}; warnings, as sentences, if its interface's MTU
    leaves less than the segment's MTU + L{VXLAN_OVERHEAD}.
    """
    try:
        entries = json.loads(addresses_json or "[]")
    except ValueError:
        raise FabricError("'ip -j addr show' printed something that is not JSON (is iproute2 too old?)")
    for e in entries if isinstance(entries, list) else []:
        if not isinstance(e, dict):
            continue
        for a in e.get("addr_info") or ():
            if isinstance(a, dict) and a.get("local") == vtep:
                mtu = e.get("mtu") or 0
                if mtu and mtu < seg.mtu + VXLAN_OVERHEAD:
                    return [f"{e.get('ifname')}, which carries the VTEP {vtep}, has MTU {mtu}: VXLAN needs "
                            f"{seg.mtu + VXLAN_OVERHEAD} for VNI {seg.vni}'s {seg.mtu}-byte frames; raise it, or "
                            f"give the segment --mtu {mtu - VXLAN_OVERHEAD} (and the cards the same)"]
                return []
    raise FabricError(f"--vtep {vtep} is not an address of this machine: give one its underlay interface carries")


def plan_down(node: FabricNode, seg: Segment, links: Mapping[str, Link]) -> Plan:
    """
    Commands that remove C{seg}'s VXLAN device, and its bridge unless
    other ports (a running hub's TAPs) are still in it.  Nothing to remove
    is not an error.
    """
    plan = Plan()
    vxlan = links.get(seg.vxlan)
    if vxlan is not None:
        if vxlan.kind != "vxlan" or vxlan.vni != seg.vni:
            raise FabricError(f"{seg.vxlan} is not the VXLAN device of VNI {seg.vni}; leaving it alone")
        plan.commands.append(["ip", "link", "del", seg.vxlan])
    bridge = links.get(seg.bridge)
    if bridge is not None and bridge.kind == "bridge":
        ports = sorted(n for n, link in links.items() if link.master == seg.bridge and n != seg.vxlan)
        if ports:
            plan.notes.append(f"kept bridge {seg.bridge}: {', '.join(ports)} still in it")
        else:
            plan.commands.append(["ip", "link", "del", seg.bridge])
    return plan


Runner = Callable[[Sequence[str]], str]


def apply(plan: Plan, run: Runner) -> Plan:
    """Run a plan's commands in order with C{run} (argv -> stdout; raises on failure)."""
    for argv in plan.commands:
        run(argv)
    return plan


LINKS_COMMAND = ["ip", "-j", "-d", "link", "show"]


def fabric_up(node: FabricNode, key, run: Runner) -> Plan:
    """Bring a segment (by VNI or hub name) up on this node: read the links, plan, run."""
    seg = node.segment(key)
    return apply(plan_up(node, seg, parse_links(run(LINKS_COMMAND))), run)


def fabric_down(node: FabricNode, key, run: Runner) -> Plan:
    """Take a segment (by VNI or hub name) down on this node: read the links, plan (L{plan_down}), run."""
    seg = node.segment(key)
    return apply(plan_down(node, seg, parse_links(run(LINKS_COMMAND))), run)


def fabric_attach(node: FabricNode, key, port: str, run: Runner) -> Plan:
    """Make C{port} a port of a segment's bridge (L{plan_attach}): read the links, plan, run."""
    seg = node.segment(key)
    return apply(plan_attach(seg, port, parse_links(run(LINKS_COMMAND))), run)


# what the status command reads back ------------------------------------------


def _json(text: str, what: str):
    """FRR prints C{{}} or nothing when it has nothing; anything unparsable is an error sentence."""
    text = (text or "").strip()
    if not text:
        return {}
    try:
        return json.loads(text)
    except ValueError:
        raise FabricError(f"{what} printed something that is not JSON: {text[:120]!r}")


@dataclass(frozen=True)
class Vni:
    """zebra's view of one VNI (C{show evpn vni json})."""

    vni: int
    vxlan: str
    macs: int
    remote_vteps: Tuple[str, ...]


def _count(value) -> int:
    """A count as FRR's JSON gives it; what is not a whole number counts as 0 (FRR's output is not ours)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def parse_evpn_vnis(text: str) -> Dict[int, Vni]:
    """C{show evpn vni json}: zebra's VNIs by number; entries that are not VNIs are skipped."""
    data = _json(text, "'show evpn vni json'")
    result = {}
    for key, v in data.items() if isinstance(data, dict) else ():
        if not isinstance(v, dict) or not str(key).isdigit():
            continue
        remote = v.get("remoteVteps")
        result[int(key)] = Vni(int(key), str(v.get("vxlanIf", "")), _count(v.get("numMacs")),
                               tuple(remote) if isinstance(remote, list) else ())
    return result


@dataclass(frozen=True)
class EvpnMacs:
    """zebra's MACs of one VNI (C{show evpn mac vni all json}): local ones by port, remote ones by VTEP."""

    local: Dict[str, str]
    remote: Dict[str, str]

    def per_vtep(self) -> Dict[str, int]:
        """Remote MACs per VTEP."""
        return dict(Counter(self.remote.values()))


def parse_evpn_macs(text: str) -> Dict[int, EvpnMacs]:
    """
    C{show evpn mac vni all json}: each VNI's MACs, local ones by port and
    remote ones by VTEP; other kinds are skipped.
    """
    data = _json(text, "'show evpn mac vni all json'")
    result = {}
    for key, v in data.items() if isinstance(data, dict) else ():
        if not isinstance(v, dict) or not str(key).isdigit():
            continue
        local, remote = {}, {}
        for mac, m in (v.get("macs") or {}).items():
            if not isinstance(m, dict):
                continue
            if m.get("type") == "local":
                local[mac] = str(m.get("intf", ""))
            elif m.get("type") == "remote":
                remote[mac] = str(m.get("remoteVtep", ""))
        result[int(key)] = EvpnMacs(local, remote)
    return result


@dataclass(frozen=True)
class BgpPeer:
    """One BGP-EVPN session as C{show bgp l2vpn evpn summary json} shows it."""

    address: str
    hostname: str
    state: str
    uptime: str
    prefixes_received: int

    @property
    def established(self) -> bool:
        return self.state == "Established"


def parse_bgp_summary(text: str) -> Dict[str, BgpPeer]:
    """C{show bgp l2vpn evpn summary json}: the EVPN sessions by neighbour address."""
    data = _json(text, "'show bgp l2vpn evpn summary json'")
    peers = data.get("peers") if isinstance(data, dict) else None
    result = {}
    for address, p in (peers or {}).items():
        if isinstance(p, dict):
            result[address] = BgpPeer(address, str(p.get("hostname", "")), str(p.get("state", "unknown")),
                                      str(p.get("peerUptime", "")), _count(p.get("pfxRcd")))
    return result


def parse_bgp_neighbors(text: str) -> Tuple[str, Dict[str, bool]]:
    """
    C{show bgp neighbors json}: the name this node's bgpd gives itself
    (its advertised host name, "" if none) and its configured neighbours,
    each with whether it is a route-reflector client for EVPN.
    """
    data = _json(text, "'show bgp neighbors json'")
    name = ""
    neighbours: Dict[str, bool] = {}
    for address, n in data.items() if isinstance(data, dict) else ():
        if not isinstance(n, dict):
            continue
        try:
            address = check_address(address)
        except FabricError:
            continue  # an interface neighbour or an IPv6 one: not a VTEP this fabric uses
        evpn = (n.get("addressFamilyInfo") or {}).get("l2VpnEvpn") or {}
        neighbours[address] = bool(evpn.get("routeReflectorClient"))
        name = name or str(((n.get("neighborCapabilities") or {}).get("hostName") or {}).get("advHostName") or "")
    return name, neighbours


@dataclass(frozen=True)
class VxlanFdb:
    """The data plane: a VXLAN device's own FDB (C{bridge -j fdb show}, entries with C{dst})."""

    flood: Tuple[str, ...]
    remote: Dict[str, str]

    def per_vtep(self) -> Dict[str, int]:
        """Remote MACs per VTEP."""
        return dict(Counter(self.remote.values()))


def parse_fdb(text: str) -> Dict[str, VxlanFdb]:
    """C{bridge -j fdb show} -> VXLAN device -> its flood list and remote MACs."""
    data = _json(text, "'bridge -j fdb show'")
    flood: Dict[str, List[str]] = {}
    remote: Dict[str, Dict[str, str]] = {}
    for e in data if isinstance(data, list) else ():
        if not isinstance(e, dict) or "dst" not in e or not isinstance(e.get("ifname"), str):
            continue
        dev, mac, dst = e["ifname"], str(e.get("mac", "")), str(e["dst"])
        if mac == FLOOD_MAC:
            flood.setdefault(dev, []).append(dst)
        else:
            remote.setdefault(dev, {})[mac] = dst
    return {dev: VxlanFdb(tuple(sorted(flood.get(dev, ()))), remote.get(dev, {}))
            for dev in set(flood) | set(remote)}


def describe(
    node: FabricNode, evpn_vnis: str, evpn_macs: str, bgp_summary: str, fdb: str,
) -> dict:
    """
    The C{sevpn hub fabric --json} view of one node, from the text of
    C{vtysh -c 'show evpn vni json'}, C{'show evpn mac vni all json'},
    C{'show bgp l2vpn evpn summary json'} and C{bridge -j fdb show}.

    Per segment: the local bridge and VTEP, the remote VTEPs with how many
    MACs EVPN says each holds and how many the kernel has, and whether the
    VTEP is in the kernel's flood list; per BGP neighbour its session
    state.  C{problems} says, in sentences, where the parts disagree.
    """
    vnis = parse_evpn_vnis(evpn_vnis)
    macs = parse_evpn_macs(evpn_macs)
    peers = parse_bgp_summary(bgp_summary)
    fdbs = parse_fdb(fdb)
    problems: List[str] = []
    sessions = []
    for address in node.peers:
        p = peers.get(address)
        state = p.state if p else "not configured in bgpd"
        sessions.append({
            "peer": address, "hostname": p.hostname if p else "", "state": state,
            "uptime": p.uptime if p else "", "prefixes_received": p.prefixes_received if p else 0,
            "reflector_client": address in node.clients,
        })
        if not (p and p.established):
            problems.append(f"BGP session with {address} is {state}")
    segments = []
    for seg in node.segments:
        vni = vnis.get(seg.vni)
        evpn = macs.get(seg.vni, EvpnMacs({}, {}))
        kernel = fdbs.get(seg.vxlan, VxlanFdb((), {}))
        evpn_counts, kernel_counts = evpn.per_vtep(), kernel.per_vtep()
        vteps = sorted(set(vni.remote_vteps if vni else ()) | set(evpn_counts) | set(kernel.flood),
                       key=ipaddress.IPv4Address)
        remote = [{"vtep": v, "macs": evpn_counts.get(v, 0), "fdb": kernel_counts.get(v, 0),
                   "flood": v in kernel.flood} for v in vteps]
        if vni is None:
            problems.append(f"FRR does not know VNI {seg.vni}: is {seg.vxlan} up, with local {node.vtep}, "
                            f"in bridge {seg.bridge}?")
        for r in remote:
            if not r["flood"]:
                problems.append(f"VNI {seg.vni}: VTEP {r['vtep']} is not in {seg.vxlan}'s flood list")
            if r["macs"] != r["fdb"]:
                problems.append(f"VNI {seg.vni}: EVPN has {r['macs']} MACs at {r['vtep']}, "
                                f"the kernel {r['fdb']}")
        segments.append({
            "hub": seg.hub, "vni": seg.vni, "bridge": seg.bridge, "vxlan": seg.vxlan, "vtep": node.vtep,
            "in_frr": vni is not None, "local_macs": len(evpn.local),
            "remote_macs": len(evpn.remote), "remote_vteps": remote,
        })
    return {"node": node.name, "vtep": node.vtep, "asn": node.asn, "sessions": sessions,
            "segments": segments, "problems": problems}


def format_status(view: dict) -> str:
    """The text form of L{describe}'s view."""

    def table(rows: List[List[str]], indent: str = "  ") -> List[str]:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]

    out = [f"node {view['node']}  VTEP {view['vtep']}  AS {view['asn']}"]
    rows = [["PEER", "STATE", "UP/DOWN", "ROUTES", "ROLE"]]
    for s in view["sessions"]:
        rows.append([s["peer"] + (f" ({s['hostname']})" if s["hostname"] else ""), s["state"], s["uptime"],
                     str(s["prefixes_received"]), "rr-client" if s["reflector_client"] else "peer"])
    out += ["BGP EVPN sessions:"] + (table(rows) if len(rows) > 1 else ["  (none)"])
    for seg in view["segments"]:
        out.append(f"VNI {seg['vni']} (virtual hub {seg['hub']}): bridge {seg['bridge']}, {seg['vxlan']} "
                   f"from {seg['vtep']}, {seg['local_macs']} local MACs"
                   + ("" if seg["in_frr"] else ", NOT KNOWN TO FRR"))
        w = seg.get("hub_worker")
        if w:
            r = w["reflection"]
            out.append(f"  hub worker {w['worker']}: TAP {w['tap']} (MTU {w['mtu']}), {w['local_macs']} local MACs, "
                       f"{r['entries']} reflected into the bridge ({r['failed']} failed, {r['dropped']} dropped), "
                       f"{w['remote_macs']} remote MACs seen on the fabric port")
        rows = [["REMOTE VTEP", "EVPN MACS", "KERNEL FDB", "FLOOD"]]
        for r in seg["remote_vteps"]:
            rows.append([r["vtep"], str(r["macs"]), str(r["fdb"]), "yes" if r["flood"] else "NO"])
        out += table(rows) if len(rows) > 1 else ["  (no remote VTEPs)"]
    if view["problems"]:
        out += ["problems:"] + [f"  {p}" for p in view["problems"]]
    return "\n".join(out)
