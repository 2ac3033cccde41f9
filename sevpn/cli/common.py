"""
What every C{sevpn} command shares: its state dir (C{--state-dir}, or for
a card C{--tap IF}), C{--json}, printing tables and JSON with human units,
reading a password, and errors as sentences.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, List, Optional

from sevpn import defaults
from sevpn.quantities import format_duration, format_rate, format_size
from sevpn.files import StateDir
from sevpn.users import IUserStore, open_user_store, read_password_file, users_location

class CommandError(Exception):
    """A command cannot be done; the message is the sentence the user sees."""


def interface_name(text: str) -> str:
    """An argparse type: a TAP device name, as Linux takes it (L{sevpn.fabric.check_ifname})."""
    from sevpn.fabric import FabricError, check_ifname

    try:
        return check_ifname(text, "TAP name")
    except FabricError as e:
        raise argparse.ArgumentTypeError(str(e))


def command(sub, name: str, func: Callable, help: str, state: str, json_flag: bool = False) -> argparse.ArgumentParser:
    """
    Add command C{name} with its C{--state-dir} (and C{--json}) options.
    A card's commands (C{state} is L{defaults.CARD_STATE_DIR}) also take
    C{--tap IF} / C{-i IF}: the state dir of the card on that TAP
    (L{defaults.card_state_dir}); C{--state-dir} wins when both are given.
    """
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--state-dir", default=None, help=f"state directory (default {state})")
    if state == defaults.CARD_STATE_DIR:
        p.add_argument("--tap", "-i", type=interface_name, metavar="IF",
                       help=f"the card on TAP IF: state directory {defaults.card_state_dir('IF')}")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=func, default_state_dir=state)
    return p


def users_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add C{--users URL} / C{--users-file PATH}: the users in the database the hub nodes of a fabric share."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--users", metavar="URL",
                       help="the users are in this PostgreSQL database, shared by the nodes of a fabric: "
                            "postgresql://USER@HOST/DATABASE (no password: use --users-file or ~/.pgpass; "
                            "default: the state dir)")
    where.add_argument("--users-file", metavar="FILE", help="a file whose first line is the --users URL")
    return p


def user_store(args: argparse.Namespace, state_dir: str = "require") -> IUserStore:
    """
    The store of C{--users}/C{--users-file}, or the state dir's files.

    @param state_dir: for the files: whether the state dir must exist
        (C{"require"}), is made when missing (C{"create"}, for commands
        that write), or is left to the store (C{"any"}).
    """
    url = users_location(getattr(args, "users", None), getattr(args, "users_file", None))
    if url is None and state_dir != "any":
        directory = StateDir(args.state_dir)
        (directory.create() if state_dir == "create" else directory.require()).check()
    return open_user_store(args.state_dir, url)


def resolve_state_dir(args: argparse.Namespace) -> None:
    """Fill in C{args.state_dir}: C{--state-dir}, else C{--tap}'s, else the command's default."""
    if getattr(args, "state_dir", "") is None:
        tap = getattr(args, "tap", None)
        args.state_dir = defaults.card_state_dir(tap) if tap else getattr(args, "default_state_dir", None)


def print_json(obj) -> None:
    """Print C{obj} as indented JSON with sorted keys: the C{--json} output, stable for scripts."""
    print(json.dumps(obj, indent=2, sort_keys=True))


#: Keys whose values are seconds, sizes in bytes, or rates in bits per second.
_DURATIONS = {"uptime", "age", "resume_window", "expires_in"}


def human(key: str, value) -> str:
    """A status or table value as a person reads it (JSON keeps the raw value)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if key in _DURATIONS or key.endswith("_seconds"):
            return format_duration(value)
        if key.startswith("bytes_") or key.endswith("_bytes"):
            return format_size(value)
        if key.startswith("rate_"):
            return format_rate(value)
        return str(round(value, 3)) if isinstance(value, float) else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(human(key, v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {human(k, v)}" for k, v in value.items()) or "-"
    return str(value)


def table(rows: List[dict], columns: List[str], headers: Optional[List[str]] = None) -> None:
    """Rows as aligned columns, values in human units."""
    if not rows:
        print("(none)")
        return
    headers = headers or [c.replace("_", " ") for c in columns]
    text = [[human(c, r.get(c)) for c in columns] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in text)) for i, h in enumerate(headers)]
    print("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip())
    for t in text:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip())


def fields(info: dict, order: List[str], width: int = 22) -> None:
    """C{key: value} lines, the keys in C{order} first, then the others."""
    keys = [k for k in order if k in info] + sorted(k for k in info if k not in order)
    for key in keys:
        print(f"{(key.replace('_', ' ') + ':'):{width}}{human(key, info[key])}")


def password(path: Optional[str]) -> str:
    """
    The password: the first line of the file C{path}; without one, asked
    for without echo on a terminal, else the first line of standard input.
    """
    if path is None:
        if sys.stdin.isatty():
            import getpass

            return getpass.getpass("Password: ")
        path = "-"
    try:
        return read_password_file(path).decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("the password must be UTF-8 text")
