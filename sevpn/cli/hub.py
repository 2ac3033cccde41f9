"""C{sevpn hub ...}: virtual hubs, users, and the running hub's view."""

from __future__ import annotations

from sevpn import control
from sevpn.cli import cascade
from sevpn.cli.common import CommandError, command, password, print_json, table
from sevpn.defaults import HUB_STATE_DIR
from sevpn.users import DEFAULT_HUB, HubState


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
    print_json(rows) if args.json else table(rows, ["hub", "users"])


def user_add(args) -> None:
    state = HubState(args.state_dir)
    if not state.exists(args.hub):
        raise CommandError(f"there is no virtual hub named {args.hub} (create it with 'sevpn hub create {args.hub}')")
    new = state.add_user(args.hub, args.user, password(args.password_file).encode("utf-8"))
    if args.json:
        print_json({"hub": args.hub, "user": args.user, "added": new})
    else:
        print(f"user {args.user} {'added to' if new else 'updated on'} virtual hub {args.hub}")


def user_list(args) -> None:
    state = HubState(args.state_dir)
    hubs = [args.hub] if args.hub else state.hubs()
    rows = [{"hub": h, "user": u} for h in hubs for u in sorted(state.users(h))]
    print_json(rows) if args.json else table(rows, ["hub", "user"])


def user_delete(args) -> None:
    HubState(args.state_dir).delete_user(args.hub, args.user)
    if args.json:
        print_json({"hub": args.hub, "user": args.user, "deleted": True})
    else:
        print(f"user {args.user} deleted from virtual hub {args.hub}")


def hub_sessions(args) -> None:
    rows = control.call(args.state_dir, "sessions")
    if args.json:
        print_json(rows)
        return
    table(
        rows,
        ["id", "kind", "hub", "user", "peer", "state", "uptime", "frames_in", "frames_out", "resumes",
         "frames_buffered", "frames_retransmitted", "frames_dropped", "congestion_drops"],
    )


def hub_macs(args) -> None:
    macs = control.call(args.state_dir, "macs")
    if args.json:
        print_json(macs)
        return
    for hub, info in macs.items():
        print(f"virtual hub {hub}:")
        table(info["macs"], ["mac", "port", "age"])
        c = info["counters"]
        print(f"  frames flooded {c['flooded']}, sent to one port {c['unicast']}, filtered {c['filtered']}; "
              f"dropped: MAC limit {c['mac_limit_drops']}, MAC taken {c['mac_conflicts']}, "
              f"bad header {c['bad_headers']}, runt {c['runts']}; MACs not learned (table full) {c['not_learned']}")
        for conflict in info["conflicts"]:
            print(f"  MAC {conflict['mac']} used by more than one port: {', '.join(conflict['ports'])}")


def hub_status(args) -> None:
    info = control.call(args.state_dir, "status")
    if args.json:
        print_json(info)
    else:
        for key, value in info.items():
            print(f"{key}: {value}")


def register(roles) -> None:
    """Add C{sevpn hub ...}."""
    hub = roles.add_parser("hub", help="the virtual HUB").add_subparsers(dest="command", metavar="COMMAND")
    hub.required = True
    state = HUB_STATE_DIR
    command(hub, "create", hub_create, "add a virtual hub", state).add_argument("name")
    command(hub, "delete", hub_delete, "delete a virtual hub", state).add_argument("name")
    command(hub, "list", hub_list, "list virtual hubs", state, json_flag=True)
    command(hub, "sessions", hub_sessions, "the running hub's sessions", state, json_flag=True)
    command(hub, "macs", hub_macs, "the running hub's MAC table per virtual hub", state, json_flag=True)
    command(hub, "status", hub_status, "the running hub's status", state, json_flag=True)
    users = hub.add_parser("user", help="users of a virtual hub").add_subparsers(dest="user_command", metavar="COMMAND")
    users.required = True
    p = command(users, "add", user_add, "add a user or change a password", state, json_flag=True)
    p.add_argument("user")
    p.add_argument("--hub", default=DEFAULT_HUB, help="virtual hub (default DEFAULT)")
    p.add_argument("--password-file", help="file whose first line is the password (default: standard input)")
    p = command(users, "list", user_list, "list users", state, json_flag=True)
    p.add_argument("--hub", help="only this virtual hub")
    p = command(users, "delete", user_delete, "delete a user", state, json_flag=True)
    p.add_argument("user")
    p.add_argument("--hub", default=DEFAULT_HUB, help="virtual hub (default DEFAULT)")
    cascade.register(hub)
