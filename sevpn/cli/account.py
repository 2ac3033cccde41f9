"""C{sevpn account ...}: the card's connection entries."""

from __future__ import annotations

import os
import sys

from sevpn.accounts import Account, AccountStore, parse_hub_address
from sevpn.cli.common import CommandError, command, password, print_json, table
from sevpn.defaults import CARD_STATE_DIR
from sevpn.files import StateDir, StateError
from sevpn.pki import fingerprint, load_ca_file, load_client_identity
from sevpn.users import DEFAULT_HUB


def account_add(args) -> None:
    """
    C{sevpn account add NAME}: save a connection entry.  Addresses, the
    client certificate and its key are checked now, not at the first dial,
    and the CA file's certificate is pinned by its fingerprint.
    """
    for address in args.hub:
        parse_hub_address(address)  # a typo in an address is said before anything else
    ca_file = os.path.abspath(args.ca_file)
    pinned = fingerprint(load_ca_file(ca_file))
    cert_file = key_file = secret = None
    if args.cert_file or args.key_file:
        if args.password_file:
            raise CommandError("give either --password-file or --cert-file/--key-file, not both")
        if not (args.cert_file and args.key_file):
            raise CommandError("give both --cert-file and --key-file (the certificate's key)")
        load_client_identity(args.cert_file, args.key_file)  # a mistake is said now, not at the first dial
        cert_file, key_file = os.path.abspath(args.cert_file), os.path.abspath(args.key_file)
    else:
        secret = password(args.password_file)
    account = Account(
        name=args.name,
        hub=args.hub[0],
        more_hubs=args.hub[1:],
        user=args.user,
        password=secret,
        cert_file=cert_file,
        key_file=key_file,
        ca_file=ca_file,
        hub_name=args.hub_name,
        server_name=args.server_name,
        auto_reconnect=args.auto_reconnect,
        proxy=args.proxy,
        **interface_fields(args),
        ca_sha256=pinned,
    )
    StateDir(args.state_dir).create().check()
    AccountStore(args.state_dir).save(account)
    if args.json:
        print_json(account.public())
        return
    print(f"account {args.name} saved (hub {account.hub_name} at {account.hub} as {account.user}, "
          f"with a {account.credential})")
    print(f"it trusts the CA certificate in {ca_file}, SHA-256 fingerprint {pinned}")
    print("(compare with 'sevpn hub ca' on the hub; a different certificate in that file will be refused)")


def account_list(args) -> None:
    """
    C{sevpn account list}: the entries without their secrets; a damaged entry
    is named and makes the exit status 1.
    """
    StateDir(args.state_dir).require().check()
    store = AccountStore(args.state_dir)
    rows, damaged = [], []
    for name in store.names():
        try:
            rows.append(store.get(name).public())
        except StateError as e:
            damaged.append(str(e))
    print_json(rows) if args.json else table(rows, ["name", "hub", "hub_name", "user", "auto_reconnect"])
    if damaged:
        for why in damaged:
            print(f"sevpn: {why}", file=sys.stderr)
        raise SystemExit(1)


def account_delete(args) -> None:
    """C{sevpn account delete NAME}: remove a connection entry."""
    StateDir(args.state_dir).require().check()
    AccountStore(args.state_dir).delete(args.name)
    print(f"account {args.name} deleted")


def register(roles) -> None:
    """Add C{sevpn account ...}."""
    accounts = roles.add_parser("account", help="the card's connection entries").add_subparsers(
        dest="command", metavar="COMMAND"
    )
    accounts.required = True
    state = CARD_STATE_DIR
    p = command(accounts, "add", account_add, "save a connection entry", state, json_flag=True)
    p.add_argument("name")
    p.add_argument("--hub", required=True, action="append",
                   help="the hub's HOST:PORT; repeat it for the other nodes of a fabric, tried in turn")
    p.add_argument("--hub-name", default=DEFAULT_HUB, help="virtual hub (default DEFAULT)")
    p.add_argument("--user", required=True)
    p.add_argument("--password-file", help="file whose first line is the password (default: standard input)")
    p.add_argument("--cert-file", help="log in with this client certificate (PEM, from 'sevpn hub user add "
                   "USER --cert') instead of a password")
    p.add_argument("--key-file", help="the key of --cert-file (PEM, mode 0600)")
    p.add_argument("--ca-file", required=True, help="the hub's CA certificate (its STATE/ca.pem)")
    p.add_argument("--server-name", help="name to verify in the hub's certificate (default: the hub's host)")
    p.add_argument("--auto-reconnect", dest="auto_reconnect", action="store_true", default=True,
                   help="reconnect forever after a failure (default)")
    p.add_argument("--no-auto-reconnect", dest="auto_reconnect", action="store_false")
    p.add_argument("--proxy", help="reach the hub through this proxy: http://[user:pass@]host:port or socks5://...")
    add_interface_options(p)
    command(accounts, "list", account_list, "list connection entries", state, json_flag=True)
    command(accounts, "delete", account_delete, "delete a connection entry", state).add_argument("name")


# the card's interface while the account is connected (--address, --mtu, --dhcp)


def interface_fields(args) -> dict:
    """The L{Account} fields of the C{--address}, C{--mtu} and C{--dhcp} options."""
    return {"address": args.address or [], "mtu": args.mtu, "dhcp": args.dhcp}


def add_interface_options(p) -> None:
    """Add C{--address}, C{--mtu} and C{--dhcp}: the card's interface while connected with the account."""
    p.add_argument("--address", action="append", metavar="ADDRESS/PREFIX",
                   help="an address for the card's TAP while connected with this account (repeatable)")
    p.add_argument("--mtu", type=int, help="the TAP's MTU while connected with this account")
    p.add_argument("--dhcp", action="store_true", help="get an address by DHCP while connected with this account")
