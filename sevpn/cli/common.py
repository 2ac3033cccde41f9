"""
What every C{sevpn} command shares: its state dir and C{--json} options,
printing tables and JSON, reading a password, and errors as sentences.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, List, Optional

from sevpn.users import read_password_file


class CommandError(Exception):
    """A command cannot be done; the message is the sentence the user sees."""


def command(sub, name: str, func: Callable, help: str, state: str, json_flag: bool = False) -> argparse.ArgumentParser:
    """Add command C{name} with its C{--state-dir} (and C{--json}) options."""
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--state-dir", default=state, help=f"state directory (default {state})")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=func)
    return p


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def table(rows: List[dict], columns: List[str]) -> None:
    if not rows:
        print("(none)")
        return
    text = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for t in text:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip())


def password(path: Optional[str]) -> str:
    if path is None:
        if sys.stdin.isatty():
            import getpass

            return getpass.getpass("Password: ")
        path = "-"
    try:
        return read_password_file(path).decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("the password must be UTF-8 text")
