"""
C{sevpn nic create|delete}: persistent TAP devices, like SoftEther's
NicCreate/NicDelete.  A persistent TAP outlives the card that uses it, and
with it its addresses, routes and bridge membership; while no card (or
hub, with C{--bridge-tap}) holds it, it shows NO-CARRIER.
"""

from __future__ import annotations

from sevpn.cli.common import CommandError, print_json
from sevpn.defaults import TAP_NAME, card_state_dir
from sevpn.fabric import FabricError, check_ifname
from sevpn.mac import InvalidMAC, format_mac, load_or_create_mac, parse_mac


def _name(name: str) -> str:
    try:
        return check_ifname(name, "TAP name")
    except FabricError as e:
        raise CommandError(str(e))


def nic_create(args) -> None:
    """
    C{sevpn nic create [NAME]}: make a persistent TAP device with the card's
    MAC (from its state dir, made if missing) or C{--mac}.
    """
    from sevpn.tapdevice import TapError, create_persistent_tap

    name = _name(args.name)
    try:
        mac = parse_mac(args.mac) if args.mac else load_or_create_mac(args.state_dir or card_state_dir(name))
    except InvalidMAC as e:
        raise CommandError(f"--mac: {e}")
    try:
        mac = create_persistent_tap(name, mac)
    except TapError as e:
        raise CommandError(str(e))
    if args.json:
        print_json({"tap": name, "mac": format_mac(mac), "persistent": True})
    else:
        print(f"persistent TAP {name} created with MAC {format_mac(mac)}; "
              f"start the card with --tap {name} (it stays when the card stops)")


def nic_delete(args) -> None:
    """C{sevpn nic delete [NAME]}: remove a persistent TAP device."""
    from sevpn.tapdevice import TapError, delete_persistent_tap

    name = _name(args.name)
    try:
        delete_persistent_tap(name)
    except TapError as e:
        raise CommandError(str(e))
    if args.json:
        print_json({"tap": name, "deleted": True})
    else:
        print(f"persistent TAP {name} deleted")


def register_devices(nic) -> None:
    """Add C{sevpn nic create|delete} to the C{sevpn nic} commands C{nic}."""
    for name, func, help in (("create", nic_create, "make a persistent TAP device for the card"),
                             ("delete", nic_delete, "remove a persistent TAP device")):
        p = nic.add_parser(name, help=help, description=help)
        p.add_argument("name", nargs="?", default=TAP_NAME, help=f"the TAP's name (default {TAP_NAME})")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        p.set_defaults(func=func)
    create = nic.choices["create"]
    create.add_argument("--state-dir", help="the card's state dir, whose MAC the TAP gets (default "
                        f"{card_state_dir('TAP')})")
    create.add_argument("--mac", help="its MAC (default: the card's own, from its state dir)")
