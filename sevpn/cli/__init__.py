"""
The C{sevpn} command: the hub operator's and the card user's tool.

State-dir commands (virtual hubs, users, accounts) edit files and work
with or without a running hub or card (and tell a running hub what
changed); the others ask the running process over its control socket.
Each group of commands is a module here with a C{register(roles)}
function.  Errors are sentences, exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, NoReturn, Optional

from sevpn import __version__, control
from sevpn.cli import account, fabric, hub, nic
from sevpn.cli.common import CommandError, resolve_state_dir
from sevpn.files import StateError, os_error

#: The command groups, in the order C{sevpn --help} lists them.
GROUPS = (hub, account, nic, fabric)


class Parser(argparse.ArgumentParser):
    """Usage errors exit with status 1 like every other error."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The C{sevpn} argument parser: one sub-command group per module of L{GROUPS}."""
    parser = Parser(prog="sevpn", description="Manage sevpn virtual HUBs and virtual LAN cards.")
    parser.add_argument("--version", action="version", version=f"sevpn {__version__}")
    roles = parser.add_subparsers(
        dest="role", metavar="{" + ",".join(g.__name__.rsplit(".", 1)[1] for g in GROUPS) + "}",
        parser_class=Parser,
    )
    roles.required = True
    for group in GROUPS:
        group.register(roles)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """
    Run one C{sevpn} command; the exit status.  Expected failures are printed
    as one sentence with status 1, never a traceback.
    """
    args = build_parser().parse_args(argv)
    resolve_state_dir(args)
    try:
        args.func(args)
    except (CommandError, StateError, control.ControlError) as e:
        print(f"sevpn: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # one not met where it happens: still a sentence
        print(f"sevpn: {os_error(e, 'use')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
