"""C{sevpn nic ...}: the running virtual LAN card."""

from __future__ import annotations

from sevpn import control
from sevpn.cli.common import command, print_json
from sevpn.defaults import CARD_STATE_DIR


def print_status(info: dict) -> None:
    for key in ("state", "account", "hub", "hub_name", "user", "tap", "mac", "carrier", "session", "uptime",
                "reconnects", "resumes", "frames_in", "frames_out", "bytes_in", "bytes_out",
                "frames_buffered", "frames_retransmitted", "frames_dropped", "congestion_drops", "last_error"):
        if key in info:
            print(f"{key + ':':22}{'' if info[key] is None else info[key]}")


def nic_status(args) -> None:
    info = control.call(args.state_dir, "status")
    print_json(info) if args.json else print_status(info)


def nic_connect(args) -> None:
    info = control.call(args.state_dir, "connect", account=args.name)
    print_json(info) if args.json else print(f"connecting with account {args.name}; see 'sevpn nic status'")


def nic_disconnect(args) -> None:
    info = control.call(args.state_dir, "disconnect")
    print_json(info) if args.json else print("disconnected: cable unplugged")


def register(roles) -> None:
    """Add C{sevpn nic ...}."""
    nic = roles.add_parser("nic", help="the running virtual LAN card").add_subparsers(dest="command", metavar="COMMAND")
    nic.required = True
    state = CARD_STATE_DIR
    command(nic, "status", nic_status, "state, session and counters", state, json_flag=True)
    command(nic, "connect", nic_connect, "connect with a saved account", state, json_flag=True).add_argument("name")
    command(nic, "disconnect", nic_disconnect, "unplug the cable (no retrying)", state, json_flag=True)

    # persistent TAP devices (sevpn nic create|delete): sevpn/cli/nicdevice.py
    from sevpn.cli.nicdevice import register_devices

    register_devices(nic)
