"""
The C{sevpn} command: the hub operator's and the card user's tool.

State-dir commands (virtual hubs, users, accounts) edit files and work
with or without a running hub or card; the others ask the running process
over its control socket.  Each group of commands is a module here with a
C{register(roles)} function.  Errors are sentences, exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from sevpn import control
from sevpn.cli import account, hub, nic
from sevpn.cli.common import CommandError
from sevpn.users import StateError

#: The command groups, in the order C{sevpn --help} lists them.
GROUPS = (hub, account, nic)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sevpn", description="Manage sevpn virtual HUBs and virtual LAN cards.")
    roles = parser.add_subparsers(dest="role", metavar="{" + ",".join(g.__name__.rsplit(".", 1)[1] for g in GROUPS) + "}")
    roles.required = True
    for group in GROUPS:
        group.register(roles)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CommandError, StateError, control.ControlError) as e:
        print(f"sevpn: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
