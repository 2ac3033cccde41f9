"""
The C{sevpn} command: the hub operator's and the card user's tool.

State-dir commands (virtual hubs, users, accounts) edit files and work
with or without a running hub or card; the others ask the running process
over its control socket.  Errors are sentences, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from sevpn import control
from sevpn.accounts import Account, AccountStore
from sevpn.defaults import CARD_STATE_DIR as DEFAULT_CARD_STATE, HUB_STATE_DIR as DEFAULT_HUB_STATE
from sevpn.users import DEFAULT_HUB, HubState, StateError, read_password_file


class CommandError(Exception):
    pass


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _table(rows: List[dict], columns: List[str]) -> None:
    if not rows:
        print("(none)")
        return
    text = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for t in text:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip())


def _password(path: Optional[str]) -> str:
    if path is None:
        if sys.stdin.isatty():
            import getpass

            return getpass.getpass("Password: ")
        path = "-"
    try:
        return read_password_file(path).decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("the password must be UTF-8 text")


# hub ------------------------------------------------------------------------


def hub_create(args) -> None:
    state = HubState(args.state_dir)
    if state.exists(args.name) and args.name != DEFAULT_HUB:
        raise CommandError(f"virtual hub {args.name} already exists")
    state.create_hub(args.name)
    print(f"virtual hub {args.name} created in {args.state_dir}")


def hub_delete(args) -> None:
    HubState(args.state_dir).delete_hub(args.name)
    print(f"virtual hub {args.name} deleted; its sessions end when they next reconnect")


def hub_list(args) -> None:
    state = HubState(args.state_dir)
    rows = [{"hub": h, "users": len(state.users(h)) if state.exists(h) else 0} for h in state.hubs()]
    _print_json(rows) if args.json else _table(rows, ["hub", "users"])


def user_add(args) -> None:
    state = HubState(args.state_dir)
    if not state.exists(args.hub):
        raise CommandError(f"there is no virtual hub named {args.hub} (create it with 'sevpn hub create {args.hub}')")
    new = state.add_user(args.hub, args.user, _password(args.password_file).encode("utf-8"))
    if args.json:
        _print_json({"hub": args.hub, "user": args.user, "added": new})
    else:
        print(f"user {args.user} {'added to' if new else 'updated on'} virtual hub {args.hub}")


def user_list(args) -> None:
    state = HubState(args.state_dir)
    hubs = [args.hub] if args.hub else state.hubs()
    rows = [{"hub": h, "user": u} for h in hubs for u in sorted(state.users(h))]
    _print_json(rows) if args.json else _table(rows, ["hub", "user"])


def user_delete(args) -> None:
    HubState(args.state_dir).delete_user(args.hub, args.user)
    if args.json:
        _print_json({"hub": args.hub, "user": args.user, "deleted": True})
    else:
        print(f"user {args.user} deleted from virtual hub {args.hub}")


def hub_sessions(args) -> None:
    rows = control.call(args.state_dir, "sessions")
    if args.json:
        _print_json(rows)
        return
    _table(
        rows,
        ["id", "hub", "user", "peer", "state", "uptime", "frames_in", "frames_out", "resumes",
         "frames_buffered", "frames_retransmitted", "frames_dropped", "congestion_drops"],
    )


def hub_macs(args) -> None:
    table = control.call(args.state_dir, "macs")
    if args.json:
        _print_json(table)
        return
    for hub, info in table.items():
        print(f"virtual hub {hub}:")
        _table(info["macs"], ["mac", "session", "age"])
        c = info["counters"]
        print(f"  frames flooded {c['flooded']}, sent to one card {c['unicast']}, filtered {c['filtered']}; "
              f"MACs not learned (table full) {c['not_learned']}, runt frames {c['runts']}")
        for dup in info["duplicates"]:
            print(f"  duplicate MAC {dup['mac']} used by sessions {', '.join(dup['sessions'])}")


def hub_status(args) -> None:
    info = control.call(args.state_dir, "status")
    if args.json:
        _print_json(info)
    else:
        for key, value in info.items():
            print(f"{key}: {value}")


# accounts -------------------------------------------------------------------


def account_add(args) -> None:
    ca_file = os.path.abspath(args.ca_file)
    if not os.path.isfile(ca_file):
        raise CommandError(f"the CA file {args.ca_file} does not exist")
    account = Account(
        name=args.name,
        hub=args.hub,
        user=args.user,
        password=_password(args.password_file),
        ca_file=ca_file,
        hub_name=args.hub_name,
        server_name=args.server_name,
        auto_reconnect=args.auto_reconnect,
    )
    AccountStore(args.state_dir).save(account)
    print(f"account {args.name} saved (hub {account.hub_name} at {account.hub} as {account.user})")


def account_list(args) -> None:
    store = AccountStore(args.state_dir)
    rows = [store.get(n).public() for n in store.names()]
    _print_json(rows) if args.json else _table(rows, ["name", "hub", "hub_name", "user", "auto_reconnect"])


def account_delete(args) -> None:
    AccountStore(args.state_dir).delete(args.name)
    print(f"account {args.name} deleted")


# nic ------------------------------------------------------------------------


def _print_status(info: dict) -> None:
    for key in ("state", "account", "hub", "hub_name", "user", "tap", "mac", "carrier", "session", "uptime",
                "reconnects", "resumes", "frames_in", "frames_out", "bytes_in", "bytes_out",
                "frames_buffered", "frames_retransmitted", "frames_dropped", "congestion_drops", "last_error"):
        if key in info:
            print(f"{key + ':':22}{'' if info[key] is None else info[key]}")


def nic_status(args) -> None:
    info = control.call(args.state_dir, "status")
    _print_json(info) if args.json else _print_status(info)


def nic_connect(args) -> None:
    info = control.call(args.state_dir, "connect", account=args.name)
    _print_json(info) if args.json else print(f"connecting with account {args.name}; see 'sevpn nic status'")


def nic_disconnect(args) -> None:
    info = control.call(args.state_dir, "disconnect")
    _print_json(info) if args.json else print("disconnected: cable unplugged")


# parser ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sevpn", description="Manage sevpn virtual HUBs and virtual LAN cards.")
    roles = parser.add_subparsers(dest="role", metavar="{hub,account,nic}")
    roles.required = True

    def command(sub, name, func, help, state=DEFAULT_HUB_STATE, json_flag=False):
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--state-dir", default=state, help=f"state directory (default {state})")
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON for scripts")
        p.set_defaults(func=func)
        return p

    hub = roles.add_parser("hub", help="the virtual HUB").add_subparsers(dest="command", metavar="COMMAND")
    hub.required = True
    command(hub, "create", hub_create, "add a virtual hub").add_argument("name")
    command(hub, "delete", hub_delete, "delete a virtual hub").add_argument("name")
    command(hub, "list", hub_list, "list virtual hubs", json_flag=True)
    command(hub, "sessions", hub_sessions, "the running hub's sessions", json_flag=True)
    command(hub, "macs", hub_macs, "the running hub's MAC table per virtual hub", json_flag=True)
    command(hub, "status", hub_status, "the running hub's status", json_flag=True)
    users = hub.add_parser("user", help="users of a virtual hub").add_subparsers(dest="user_command", metavar="COMMAND")
    users.required = True
    p = command(users, "add", user_add, "add a user or change a password", json_flag=True)
    p.add_argument("user")
    p.add_argument("--hub", default=DEFAULT_HUB, help="virtual hub (default DEFAULT)")
    p.add_argument("--password-file", help="file whose first line is the password (default: standard input)")
    p = command(users, "list", user_list, "list users", json_flag=True)
    p.add_argument("--hub", help="only this virtual hub")
    p = command(users, "delete", user_delete, "delete a user", json_flag=True)
    p.add_argument("user")
    p.add_argument("--hub", default=DEFAULT_HUB, help="virtual hub (default DEFAULT)")

    accounts = roles.add_parser("account", help="the card's connection entries").add_subparsers(
        dest="command", metavar="COMMAND"
    )
    accounts.required = True
    p = command(accounts, "add", account_add, "save a connection entry", state=DEFAULT_CARD_STATE)
    p.add_argument("name")
    p.add_argument("--hub", required=True, help="the hub's HOST:PORT")
    p.add_argument("--hub-name", default=DEFAULT_HUB, help="virtual hub (default DEFAULT)")
    p.add_argument("--user", required=True)
    p.add_argument("--password-file", help="file whose first line is the password (default: standard input)")
    p.add_argument("--ca-file", required=True, help="the hub's CA certificate (its STATE/ca.pem)")
    p.add_argument("--server-name", help="name to verify in the hub's certificate (default: the hub's host)")
    p.add_argument("--auto-reconnect", dest="auto_reconnect", action="store_true", default=True,
                   help="reconnect forever after a failure (default)")
    p.add_argument("--no-auto-reconnect", dest="auto_reconnect", action="store_false")
    command(accounts, "list", account_list, "list connection entries", state=DEFAULT_CARD_STATE, json_flag=True)
    command(accounts, "delete", account_delete, "delete a connection entry", state=DEFAULT_CARD_STATE).add_argument("name")

    nic = roles.add_parser("nic", help="the running virtual LAN card").add_subparsers(dest="command", metavar="COMMAND")
    nic.required = True
    command(nic, "status", nic_status, "state, session and counters", state=DEFAULT_CARD_STATE, json_flag=True)
    command(nic, "connect", nic_connect, "connect with a saved account", state=DEFAULT_CARD_STATE,
            json_flag=True).add_argument("name")
    command(nic, "disconnect", nic_disconnect, "unplug the cable (no retrying)", state=DEFAULT_CARD_STATE,
            json_flag=True)
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


if __name__ == "__main__":
    sys.exit(main())
