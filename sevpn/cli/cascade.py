"""
C{sevpn hub cascade ...}: this hub's cascades to other hubs, and the users
other hubs' cascades may log in as.

The commands edit the state dir (C{STATE/cascades/NAME.json}, users.json),
so they work with or without a running hub; a running hub is then poked
over its control socket and connects, changes or drops the cascade at once.
"""

from __future__ import annotations

import argparse
import os

from sevpn import control
from sevpn.cascade import CascadeConfig, CascadeStore
from sevpn.cli.common import CommandError, command, password, print_json, table, user_store, users_options
from sevpn.defaults import HUB_STATE_DIR
from sevpn.mac import format_mac, generate_mac
from sevpn.users import DEFAULT_HUB, StateError


def _poke(state_dir: str):
    """Ask the running hub to read the cascade files again; None if no hub runs."""
    if not os.path.exists(control.socket_path(state_dir)):
        return None
    try:
        return control.call(state_dir, "cascade-reload")
    except control.ControlError as e:
        if "nothing is running" in str(e):
            return None
        raise


def _check_ca_file(path: str) -> str:
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20)
    except OSError as e:
        raise CommandError(f"cannot read the CA file {path}: {e.strerror}")
    if b"-----BEGIN CERTIFICATE-----" not in text:
        raise CommandError(f"the CA file {path} holds no PEM certificate (use the remote hub's STATE/ca.pem)")
    return path


def cascade_add(args) -> None:
    """
    C{sevpn hub cascade add NAME}: save (or update) a cascade and tell a
    running hub.  An update keeps the cascade's MAC, so that the remote hub
    replaces the held session at once.
    """
    if not user_store(args, "any").exists(args.hub_name):
        raise CommandError(
            f"there is no virtual hub named {args.hub_name} (create it with 'sevpn hub create {args.hub_name}')"
        )
    store = CascadeStore(args.state_dir)
    try:
        mac = store.get(args.name).mac
    except StateError:
        mac = None
    config = CascadeConfig(
        name=args.name, hub_name=args.hub_name, to=args.to, remote_hub=args.remote_hub, user=args.user,
        password=password(args.password_file), ca_file=_check_ca_file(args.ca_file), server_name=args.server_name,
        mac=mac or format_mac(generate_mac()),
    )
    new = args.name not in store.names()
    store.save(config)
    answer = _poke(args.state_dir)
    if args.json:
        print_json({"cascade": config.public(), "added": new, "hub_running": answer is not None})
        return
    what = "added" if new else "updated"
    print(f"cascade {args.name} {what}: virtual hub {args.hub_name} to virtual hub {args.remote_hub} "
          f"at {args.to} as user {args.user}")
    if answer is None:
        print("the hub is not running; it connects the cascade when it starts")
    else:
        print("the running hub connects it now ('sevpn hub cascade list' shows its state)")


def cascade_list(args) -> None:
    """C{sevpn hub cascade list}: the configured cascades with the running hub's state of each, and unusable files."""
    configs, errors = CascadeStore(args.state_dir).load()
    live = {}
    try:
        live = {c["cascade"]: c for c in control.call(args.state_dir, "cascades")}
    except control.ControlError:
        pass
    rows = []
    for name, config in sorted(configs.items()):
        row = config.public()
        row.update(live.get(name, {"state": "hub not running"}))
        rows.append(row)
    for name, error in sorted(errors.items()):
        rows.append({"name": name, "state": "unusable", "last_error": error})
    if args.json:
        print_json(rows)
        return
    for row in rows:
        row.setdefault("name", row.get("cascade"))
    table(rows, ["name", "hub_name", "to", "remote_hub", "user", "state", "loop_state", "last_error"])


def cascade_delete(args) -> None:
    """C{sevpn hub cascade delete NAME}: remove a cascade; a running hub says goodbye on it at once."""
    CascadeStore(args.state_dir).delete(args.name)
    answer = _poke(args.state_dir)
    if args.json:
        print_json({"cascade": args.name, "deleted": True, "hub_running": answer is not None})
    else:
        print(f"cascade {args.name} deleted" + ("; the running hub said goodbye on it" if answer is not None else ""))


def cascade_allow(args) -> None:
    """Mark a user as one other hubs' cascades may log in as."""
    user_store(args, "any").set_cascade_user(args.hub, args.user, True, args.max_macs)
    if args.json:
        print_json({"hub": args.hub, "user": args.user, "cascade": True, "max_macs": args.max_macs})
    else:
        limit = f"at most {args.max_macs} MACs" if args.max_macs else "as many MACs as the virtual hub's table holds"
        print(f"user {args.user} of virtual hub {args.hub} may now connect a cascade ({limit})")


def cascade_deny(args) -> None:
    """Take back a user's right to log in as another hub's cascade (a connected cascade keeps its session)."""
    user_store(args, "any").set_cascade_user(args.hub, args.user, False)
    if args.json:
        print_json({"hub": args.hub, "user": args.user, "cascade": False})
    else:
        print(f"user {args.user} of virtual hub {args.hub} may no longer connect a cascade "
              "(a cascade already connected keeps its session until it reconnects)")


def _max_macs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MACs (1 to 1000000)")
    return value


def register(hub) -> None:
    """Add C{sevpn hub cascade ...} to the C{sevpn hub} commands."""
    cascades = hub.add_parser("cascade", help="cascades to other hubs").add_subparsers(
        dest="cascade_command", metavar="COMMAND"
    )
    cascades.required = True
    state = HUB_STATE_DIR
    p = command(cascades, "add", cascade_add, "join a local virtual hub to another hub's (or change a cascade)",
                state, json_flag=True)
    p.add_argument("name")
    p.add_argument("--hub-name", required=True, help="the local virtual hub")
    p.add_argument("--to", required=True, help="the remote hub's HOST:PORT")
    p.add_argument("--remote-hub", required=True, help="the virtual hub on the remote hub")
    p.add_argument("--user", required=True, help="a cascade user of the remote hub (see 'cascade allow')")
    p.add_argument("--password-file", help="file whose first line is the password (default: standard input)")
    p.add_argument("--ca-file", required=True, help="the remote hub's CA certificate (its STATE/ca.pem)")
    p.add_argument("--server-name", help="name to verify in the remote hub's certificate (default: its host)")
    users_options(p)
    command(cascades, "list", cascade_list, "list cascades and their state", state, json_flag=True)
    command(cascades, "delete", cascade_delete, "delete a cascade", state, json_flag=True).add_argument("name")
    p = command(cascades, "allow", cascade_allow, "let another hub's cascade log in as this user", state,
                json_flag=True)
    p.add_argument("user")
    p.add_argument("--hub", default=DEFAULT_HUB, help="virtual hub (default DEFAULT)")
    p.add_argument("--max-macs", type=_max_macs, help="the most MACs behind the cascade (default: the table size)")
    users_options(p)
    p = command(cascades, "deny", cascade_deny, "no longer let cascades log in as this user", state,
                json_flag=True)
    p.add_argument("user")
    p.add_argument("--hub", default=DEFAULT_HUB, help="virtual hub (default DEFAULT)")
    users_options(p)
