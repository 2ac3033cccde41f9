"""
C{sevpn fabric ...}: a hub node's part of the fabric (docs/fabric.md).

 - C{sevpn fabric up|down --vtep ADDR --fabric HUB=VNI [--mtu N]} (root,
   once per boot, before FRR and the hub; idempotent): the bridge and
   VXLAN device of each segment, from L{sevpn.fabric}'s plans;
 - C{sevpn fabric frr-config --vtep ADDR --peer ADDR ...}: the node's
   C{frr.conf};
 - C{sevpn hub fabric [--json]} (registered into the hub group): the
   running hub's segments with what the kernel and FRR say about them.
"""

from __future__ import annotations

import argparse
from typing import List

from sevpn import control
from sevpn.cli.common import CommandError, command, print_json
from sevpn.defaults import HUB_STATE_DIR
from sevpn.fabric import (
    DEFAULT_ASN, LINKS_COMMAND, FabricError, FabricNode, Segment, check_address, check_underlay, fabric_down,
    fabric_up, format_status, frr_conf, parse_fabric_option, parse_links,
)
from sevpn.frr import FrrError, command_runner, discover_node, node_name, node_status, vtysh_runner
from sevpn.users import read_password_file


def _fabric(text: str):
    try:
        return parse_fabric_option(text)
    except FabricError as e:
        raise argparse.ArgumentTypeError(str(e))


def _address(text: str) -> str:
    try:
        return check_address(text)
    except FabricError as e:
        raise argparse.ArgumentTypeError(str(e))


def _node(args) -> FabricNode:
    try:
        segments = tuple(Segment(hub, vni, mtu=args.mtu) for hub, vni in args.fabric)
        return FabricNode(node_name(), args.vtep, segments)
    except FabricError as e:
        raise CommandError(str(e))


def _runner():
    """C{ip} and C{bridge} here, their failures as the command's sentences."""
    run = command_runner()

    def checked(argv):
        try:
            return run(argv)
        except FabricError as e:
            hint = " (run it as root, or with CAP_NET_ADMIN)" if "not permitted" in str(e) else ""
            raise CommandError(f"{e}{hint}")

    return checked


def fabric_up_command(args) -> None:
    """
    C{sevpn fabric up}: make each segment's bridge and VXLAN device (what is
    there already is left), warning about an underlay that cannot carry the
    segments (L{check_underlay}).
    """
    node, run = _node(args), _runner()
    try:
        addresses = run(["ip", "-j", "addr", "show"])
        warnings = [w for seg in node.segments for w in check_underlay(node.vtep, seg, addresses)]
        done = [(seg, fabric_up(node, seg.vni, run)) for seg in node.segments]
    except FabricError as e:
        raise CommandError(str(e))
    _report(args, node, done, warnings, "up")


def fabric_down_command(args) -> None:
    """C{sevpn fabric down}: remove each segment's VXLAN device, and its bridge once no port is left."""
    node, run = _node(args), _runner()
    try:
        done = [(seg, fabric_down(node, seg.vni, run)) for seg in node.segments]
    except FabricError as e:
        raise CommandError(str(e))
    _report(args, node, done, [], "down")


def _report(args, node: FabricNode, done, warnings: List[str], what: str) -> None:
    if args.json:
        print_json({"vtep": node.vtep, "warnings": warnings, "segments": [
            {"hub": seg.hub, "vni": seg.vni, "bridge": seg.bridge, "vxlan": seg.vxlan, "mtu": seg.mtu,
             "commands": plan.commands, "notes": plan.notes} for seg, plan in done]})
        return
    for seg, plan in done:
        if plan.commands:
            did = (f"{seg.bridge} with {seg.vxlan} (VNI {seg.vni}, from {node.vtep}, MTU {seg.mtu}) is up"
                   if what == "up" else f"{seg.vxlan} removed")
            print(f"virtual hub {seg.hub}: {did}")
            for argv in plan.commands:
                print("  $ " + " ".join(argv))
        else:
            print(f"virtual hub {seg.hub}: {seg.bridge} and {seg.vxlan} "
                  f"{'were already up' if what == 'up' else 'were not there'}; nothing to do")
        for note in plan.notes:
            print(f"  {note}")
    for warning in warnings:
        print(f"warning: {warning}")


def frr_config_command(args) -> None:
    """
    C{sevpn fabric frr-config}: print the node's C{frr.conf}: a full mesh of
    C{--peer}s, or with C{--reflector} a route reflector whose C{--peer}s are
    its clients and whose C{--reflector-peer}s are plain neighbours.
    """
    peers = list(args.peer) + [r for r in args.reflector_peer if r not in args.peer]
    if not peers:
        raise CommandError("name the node's BGP neighbours with --peer ADDRESS (every other node, or the "
                           "route reflectors)")
    if args.reflector_peer and not args.reflector:
        raise CommandError("--reflector-peer names another route reflector: this node must be one too (--reflector)")
    clients = [p for p in args.peer if p not in args.reflector_peer] if args.reflector else []
    password = None
    if args.password_file:
        try:
            password = read_password_file(args.password_file).decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CommandError(f"cannot read --password-file {args.password_file}: {e}")
    try:
        node = FabricNode(args.name or node_name(), args.vtep, (), tuple(peers), tuple(clients), args.asn, password)
    except FabricError as e:
        raise CommandError(str(e))
    print(frr_conf(node), end="")


def hub_fabric_command(args) -> None:
    """
    C{sevpn hub fabric}: the running hub's segments (over the control
    socket) with what the kernel and FRR say about them: VNIs, BGP sessions,
    remote VTEPs and their MACs.
    """
    info = control.call(args.state_dir, "fabric")
    if not info["segments"]:
        raise CommandError("the hub runs without --fabric: none of its virtual hubs is in a fabric")
    run = _runner()
    try:
        links = parse_links(run(LINKS_COMMAND))
    except FabricError as e:
        raise CommandError(str(e))
    segments = [Segment(s["hub"], s["vni"], mtu=s["mtu"]) for s in info["segments"]]
    vxlan = links.get(segments[0].vxlan)
    vtep = vxlan.local if vxlan is not None and vxlan.local else info["segments"][0]["vtep"]
    vtysh = vtysh_runner(args.frr_pathspace)
    try:
        node = discover_node(segments, vtep, vtysh)
        view = node_status(node, vtysh, run)
    except (FabricError, FrrError) as e:
        raise CommandError(str(e))
    by_vni = {s["vni"]: s for s in info["segments"]}
    for seg in view["segments"]:
        seg["hub_worker"] = by_vni.get(seg["vni"])
    print_json(view) if args.json else print(format_status(view))


def register(roles) -> None:
    """Add C{sevpn fabric ...}."""
    fabric = roles.add_parser("fabric", help="the hub node's fabric (VXLAN + BGP-EVPN)").add_subparsers(
        dest="command", metavar="COMMAND")
    fabric.required = True
    for name, func, help in (
        ("up", fabric_up_command, "make each segment's bridge and VXLAN device (root; idempotent)"),
        ("down", fabric_down_command, "remove each segment's VXLAN device, and its bridge once no port is left"),
    ):
        p = fabric.add_parser(name, help=help, description=help)
        p.add_argument("--vtep", required=True, type=_address, help="this node's underlay address (IPv4)")
        p.add_argument("--fabric", required=True, action="append", type=_fabric, metavar="HUB=VNI",
                       help="a virtual hub and its VXLAN network identifier (repeatable)")
        p.add_argument("--mtu", type=int, default=1500,
                       help="the segment's MTU (default 1500; the underlay needs 50 more)")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        p.set_defaults(func=func)
    help = "print this node's frr.conf (zebra + bgpd, BGP-EVPN)"
    p = fabric.add_parser("frr-config", help=help, description=help)
    p.add_argument("--vtep", required=True, type=_address, help="this node's underlay address: router id, source")
    p.add_argument("--peer", action="append", default=[], type=_address, metavar="ADDRESS",
                   help="a BGP neighbour's VTEP: every other node (a mesh) or the route reflectors (repeatable)")
    p.add_argument("--reflector", action="store_true",
                   help="this node is a route reflector: its --peer nodes are its clients")
    p.add_argument("--reflector-peer", action="append", default=[], type=_address, metavar="ADDRESS",
                   help="with --reflector: another route reflector (a plain iBGP neighbour, repeatable)")
    p.add_argument("--asn", type=int, default=DEFAULT_ASN, help=f"the fabric's AS number (default {DEFAULT_ASN})")
    p.add_argument("--name", help="the node's name in FRR (default: the host name)")
    p.add_argument("--password-file", help="file whose first line is the BGP (TCP-MD5) password of every session")
    p.set_defaults(func=frr_config_command)


def register_hub(hub) -> None:
    """Add C{sevpn hub fabric} to the hub group."""
    p = command(hub, "fabric", hub_fabric_command,
                "the running hub's fabric: VNIs, BGP sessions, remote VTEPs and their MACs", HUB_STATE_DIR,
                json_flag=True)
    p.add_argument("--frr-pathspace", metavar="NAME",
                   help="the FRR instance to ask (vtysh -N NAME; default: the machine's FRR)")
