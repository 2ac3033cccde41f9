"""C{sevpn nic ...}: the running virtual LAN cards."""

from __future__ import annotations

import os
from typing import List

from sevpn import control, defaults
from sevpn.cli.common import CommandError, command, fields, human, print_json
from sevpn.defaults import CARD_STATE_DIR
from sevpn.files import StateDir

#: The order of C{sevpn nic status}; other keys follow.
STATUS_ORDER = [
    "state", "account", "hub", "hub_name", "user", "tap", "mac", "carrier", "session", "uptime",
    "reconnects", "resumes", "frames_in", "frames_out", "bytes_in", "bytes_out", "frames_buffered",
    "frames_retransmitted", "frames_dropped", "congestion_drops",
    "udp", "udp_peer", "udp_datagrams_in", "udp_datagrams_out", "udp_bad", "udp_replayed",
    "last_error", "version", "state_dir",
]


def _call(args, name: str, **kw):
    StateDir(args.state_dir).require()
    return control.call(args.state_dir, name, **kw)


def nic_status(args) -> None:
    """C{sevpn nic status}: the running card's state, session and counters."""
    info = _call(args, "status")
    print_json(info) if args.json else fields(info, STATUS_ORDER)


def nic_connect(args) -> None:
    """
    C{sevpn nic connect NAME}: have the running card dial a saved account;
    with C{--wait}, exit 0 only once it is connected, else 1 with the reason.
    """
    if args.timeout is not None and not args.wait:
        raise CommandError("--timeout goes with --wait")
    if not args.wait:
        info = _call(args, "connect", account=args.name)
        print_json(info) if args.json else print(f"connecting with account {args.name}; see 'sevpn nic status'")
        return
    timeout = 30.0 if args.timeout is None else args.timeout
    info = _call(args, "connect", timeout=timeout + 10, account=args.name, wait=True, within=timeout)
    if args.json:
        print_json(info)
    state = info.get("state")
    if state == "connected":
        if not args.json:
            print(f"connected to hub {info.get('hub_name')} at {info.get('hub')} as {info.get('user')}")
        return
    why = info.get("last_error") or "no reason given"
    if info.get("timed_out"):
        raise CommandError(f"not connected within {timeout:g} seconds (still {state}): {why}")
    if state == "refused":
        raise CommandError(f"the hub refused account {args.name}: {why}")
    raise CommandError(f"not connected ({state}): {why}")


def _timeout(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"give a number of seconds above 0 and up to 3600, not {text!r}")
    return value


def nic_disconnect(args) -> None:
    """C{sevpn nic disconnect}: unplug the running card's cable (it does not retry)."""
    info = _call(args, "disconnect")
    print_json(info) if args.json else print("disconnected: cable unplugged")


# sevpn nic show ----------------------------------------------------------------

def _card_dir_name(name: str) -> bool:
    """Whether C{name} is a card's state dir name: C{nic-IF} for a TAP name IF (matched whole), or the older C{nic}."""
    from sevpn.fabric import FabricError, check_ifname

    if name == "nic":
        return True
    try:
        return name.startswith("nic-") and check_ifname(name[4:]) == name[4:]
    except FabricError:
        return False


def card_state_dirs(root: str) -> List[str]:
    """The card state dirs under C{root}, sorted."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(
        os.path.join(root, n) for n in names if _card_dir_name(n) and os.path.isdir(os.path.join(root, n))
    )


def describe_card(state_dir: str) -> dict:
    """A card's status (C{running} true), or why it cannot be had (C{running} false, C{error})."""
    try:
        info = control.call(state_dir, "status", timeout=5)
    except control.NotRunning:
        return {"state_dir": state_dir, "running": False, "error": "not running"}
    except control.ControlError as e:
        return {"state_dir": state_dir, "running": False, "error": str(e)}
    info["state_dir"] = state_dir
    info["running"] = True
    return info


def print_card(info: dict) -> None:
    """One card, as C{wg show} shows an interface."""
    if not info["running"]:
        print(f"card in {info['state_dir']}: {info['error']}")
        return
    carrier = "carrier up" if info.get("carrier") else "no carrier"
    print(f"card {info.get('tap')}: {info.get('state')}, {carrier}")
    lines = [("state dir", info["state_dir"]), ("mac", info.get("mac"))]
    if info.get("account"):
        lines.append(("account", f"{info['account']}: user {info.get('user')} on virtual hub "
                                 f"{info.get('hub_name')} at {info.get('hub')}"))
    if info.get("session"):
        lines.append(("session", f"{info['session']}, up {human('uptime', info.get('uptime'))}, "
                                 f"resumed {info.get('resumes', 0)} times"))
    if "bytes_in" in info:
        lines.append(("transfer", f"{human('bytes_in', info['bytes_in'])} received, "
                                  f"{human('bytes_out', info.get('bytes_out'))} sent"))
    lines.append(("reconnects", info.get("reconnects", 0)))
    dropped = {k: info[k] for k in ("frames_dropped", "congestion_drops", "unplugged_drops") if info.get(k)}
    if dropped:
        lines.append(("dropped", ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in dropped.items())))
    if info.get("last_error"):
        lines.append(("last error", info["last_error"]))
    for key, value in lines:
        print(f"  {key}: {value}")


def nic_show(args) -> None:
    """
    C{sevpn nic show}: every card on this machine (each state dir under
    C{--root}), running or not, as C{wg show} does.
    """
    if args.state_dir is not None:
        dirs = [StateDir(args.state_dir).require().path]
    else:
        if args.root != defaults.CARD_STATE_ROOT:
            StateDir(args.root).require()
        dirs = card_state_dirs(args.root)
    cards = [describe_card(d) for d in dirs]
    if args.json:
        print_json(cards)
        return
    if not cards:
        print(f"(no cards: no card state dirs in {args.root})")
    for i, info in enumerate(cards):
        if i:
            print()
        print_card(info)


def register(roles) -> None:
    """Add C{sevpn nic ...}."""
    nic = roles.add_parser("nic", help="the running virtual LAN cards").add_subparsers(dest="command", metavar="COMMAND")
    nic.required = True
    state = CARD_STATE_DIR
    command(nic, "status", nic_status, "state, session and counters", state, json_flag=True)
    p = command(nic, "connect", nic_connect, "connect with a saved account", state, json_flag=True)
    p.add_argument("name")
    p.add_argument("--wait", action="store_true",
                   help="wait until connected (exit 0) or refused, disconnected or timed out (exit 1, with the reason)")
    p.add_argument("--timeout", type=_timeout, metavar="S", help="with --wait: give up after S seconds (default 30)")
    command(nic, "disconnect", nic_disconnect, "unplug the cable (no retrying)", state, json_flag=True)
    p = nic.add_parser("show", help="every card on this machine", description=(
        f"Every card on this machine: the cards whose state dirs are {defaults.card_state_dir('IF')} "
        f"(and {defaults.CARD_STATE_ROOT}/nic, where older cards kept theirs), or only --state-dir."))
    p.add_argument("--root", default=defaults.CARD_STATE_ROOT,
                   help=f"where the state dirs are (default {defaults.CARD_STATE_ROOT})")
    p.add_argument("--state-dir", help="only the card with this state dir")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=nic_show, default_state_dir=None)

    # persistent TAP devices (sevpn nic create|delete): sevpn/cli/nicdevice.py
    from sevpn.cli.nicdevice import register_devices

    register_devices(nic)
