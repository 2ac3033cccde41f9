"""C{sevpn hub ...}: virtual hubs, users, and the running hub's view."""

from __future__ import annotations

import argparse
import datetime
import os
from typing import Optional

from sevpn import control
from sevpn.cli import cascade
from sevpn.cli.common import (
    CommandError, command, fields, human, password, print_json, table, user_store, users_options,
)
from sevpn.cli.fabric import register_hub as register_fabric
from sevpn.defaults import HUB_STATE_DIR
from sevpn.files import StateDir
from sevpn.pki import (
    ca_info, certificate_pem, certificate_record, check_client_certificate, create_private, issue_client_certificate,
    load_certificate_file, parse_fingerprint,
)
from sevpn.quantities import parse_rate
from sevpn.users import DEFAULT_HUB, CertificateRecord, IUserStore, StateError, UserPolicy, check_name


def _state(args, write: bool = False) -> IUserStore:
    """The users of C{--users}, or of C{--state-dir} (which must exist unless the command writes)."""
    return user_store(args, "create" if write else "require")


def tell_hub(args, done: str) -> list:
    """
    Tell a hub running on the state dir that users changed, so that it
    ends the sessions of users deleted or disabled and applies the
    others' policy now (it reads the files at each login anyway; with
    C{--users} the other nodes hear of it from the database).
    Returns the sessions it ended; none when no hub runs here.

    @param done: what the command did, for the sentence if the hub
        cannot be told.
    """
    if not os.path.isdir(args.state_dir):
        return []  # no hub here (the users are elsewhere: --users); the nodes hear of it from the database
    try:
        result = control.call(args.state_dir, "users-changed")
    except control.NotRunning:
        return []
    except control.ControlError as e:
        raise CommandError(f"{done}, but the running hub could not be told ({e}); run the command again")
    if result.get("errors"):
        raise CommandError(f"{done}, but the running hub could not apply it: {'; '.join(result['errors'])}")
    return result.get("ended", [])


def _report(args, done: str, ended: list, **info) -> None:
    if args.json:
        print_json(dict(info, ended=ended))
        return
    print(done)
    for s in ended:
        print(f"ended session {s['id']} of {s['user']} on virtual hub {s['hub']}: {s['reason']}")


def hub_create(args) -> None:
    """C{sevpn hub create NAME}: add a virtual hub (DEFAULT always exists: creating it again is no error)."""
    state = _state(args, write=True)
    if state.exists(args.name) and args.name != DEFAULT_HUB:
        raise CommandError(f"virtual hub {args.name} already exists")
    state.create_hub(args.name)
    print(f"virtual hub {args.name} created in {state.describe()['where']}")


def hub_delete(args) -> None:
    """C{sevpn hub delete NAME}: delete a virtual hub and its users; a running hub ends its sessions."""
    _state(args).delete_hub(args.name)
    done = f"virtual hub {args.name} deleted"
    _report(args, done, tell_hub(args, done), hub=args.name, deleted=True)


def hub_list(args) -> None:
    """C{sevpn hub list}: the virtual hubs and how many users each has."""
    state = _state(args)
    rows = [{"hub": h, "users": len(state.users(h))} for h in state.hubs()]
    print_json(rows) if args.json else table(rows, ["hub", "users"])


def user_add(args) -> None:
    """
    C{sevpn hub user add USER}: add a user or change a password; with
    C{--cert} or C{--cert-file} give the user a client certificate instead
    (L{_add_with_certificate}).
    """
    state = _state(args, write=True)
    if not state.exists(args.hub):
        raise CommandError(f"there is no virtual hub named {args.hub} (create it with 'sevpn hub create {args.hub}')")
    if args.cert and args.cert_file:
        raise CommandError("give either --cert (issue a new certificate) or --cert-file (register one), not both")
    if args.out is not None and not args.cert:
        raise CommandError("--out is where --cert writes the new certificate and key: give --cert too")
    if not (args.cert or args.cert_file):
        new = state.add_user(args.hub, args.user, password(args.password_file).encode("utf-8"))
        if args.json:
            print_json({"hub": args.hub, "user": args.user, "added": new})
        else:
            print(f"user {args.user} {'added to' if new else 'updated on'} virtual hub {args.hub}")
        return
    _add_with_certificate(args, state)


def _add_with_certificate(args, state: IUserStore) -> None:
    """C{user add --cert} (issue a key and certificate into C{--out}) or C{--cert-file} (register one)."""
    check_name("user", args.user)
    secret = password(args.password_file).encode("utf-8") if args.password_file else None
    written = []
    if args.cert:
        out = args.out or "."
        cert_path, key_path = os.path.join(out, f"{args.user}.pem"), os.path.join(out, f"{args.user}.key")
        for path in (cert_path, key_path):
            if os.path.lexists(path):
                raise CommandError(f"{path} already exists: remove it, or pass --out with another directory")
        cert, key_pem = issue_client_certificate(args.state_dir, args.user)
        record = certificate_record(cert)
        create_private(key_path, key_pem, 0o600)
        written.append(key_path)
        try:
            create_private(cert_path, certificate_pem(cert), 0o644)
        except StateError:
            os.unlink(key_path)
            raise
        written.append(cert_path)
    else:
        cert_path = key_path = None
        record = check_client_certificate(
            args.state_dir, load_certificate_file(args.cert_file, "certificate file (--cert-file)"), args.cert_file)
    new = state.add_user(args.hub, args.user, secret)
    try:
        state.add_certificate(args.hub, args.user, record)
    except StateError:
        if new:
            state.delete_user(args.hub, args.user)
        for path in written:
            os.unlink(path)
        raise
    if args.json:
        print_json({"hub": args.hub, "user": args.user, "added": new, "sha256": record.fingerprint,
                    "not_after": record.not_after, "cert_file": _abs(cert_path), "key_file": _abs(key_path)})
        return
    print(f"user {args.user} {'added to' if new else 'updated on'} virtual hub {args.hub}: "
          f"certificate {'issued' if args.cert else 'registered'}")
    if args.cert:
        print(f"certificate:          {cert_path}")
        print(f"key:                  {key_path} (mode 0600: give it only to the card)")
    print(f"SHA-256 fingerprint:  {record.fingerprint}")
    print(f"expires:              {record.not_after[:10]}")
    if args.cert:
        print(f"The card logs in with --cert-file {cert_path} --key-file {key_path} "
              f"--ca-file {os.path.join(args.state_dir, 'ca.pem')} (no password)")


def _abs(path: Optional[str]) -> Optional[str]:
    return os.path.abspath(path) if path else None


def _cert_state(cert: CertificateRecord, now: str) -> str:
    if cert.revoked:
        return f"revoked {cert.revoked[:10]}"
    return "expired" if cert.not_after < now else "valid"


def cert_list(args) -> None:
    """C{sevpn hub user cert list}: the users' certificates and whether each is valid, expired or revoked."""
    state = _state(args)
    hubs = [args.hub] if args.hub else state.hubs()
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    rows = []
    for h in hubs:
        users = [args.user] if args.user else sorted(state.users(h))
        for user in users:
            for cert in state.certificates(h, user):
                rows.append({"hub": h, "user": user, "sha256": cert.fingerprint, "subject": cert.subject,
                             "serial": cert.serial, "not_after": cert.not_after, "added": cert.added,
                             "revoked": cert.revoked, "state": _cert_state(cert, now)})
    if args.json:
        print_json(rows)
        return
    for row in rows:
        row["expires"] = row["not_after"][:10]
    table(rows, ["hub", "user", "state", "expires", "subject", "sha256"])


def cert_revoke(args) -> None:
    """
    C{sevpn hub user cert revoke USER [FINGERPRINT]}: revoke one certificate
    or all of the user's; a running hub ends the sessions that logged in with
    them.
    """
    fingerprint = parse_fingerprint(args.fingerprint) if args.fingerprint else None
    revoked = _state(args).revoke_certificates(args.hub, args.user, fingerprint)
    if not revoked:
        done = f"user {args.user} on virtual hub {args.hub} has no certificate that is not revoked already"
    else:
        done = "\n".join(f"revoked certificate {fp} of user {args.user} on virtual hub {args.hub}" for fp in revoked)
    _report(args, done, tell_hub(args, done.splitlines()[-1]), hub=args.hub, user=args.user, revoked=revoked)


#: The limits of L{UserPolicy}, as C{sevpn hub user list} shows them.
POLICY_COLUMNS = ["max_sessions", "max_macs", "rate_in", "rate_out", "broadcast_pps"]


def user_list(args) -> None:
    """
    C{sevpn hub user list}: the users, how they log in, and their limits
    (unset limits: C{0} in JSON, C{-} in the table, both meaning the hub's default).
    """
    state = _state(args)
    hubs = [args.hub] if args.hub else state.hubs()
    rows = []
    for h in hubs:
        for user, record in sorted(state.users(h).items()):
            disabled = bool(record.get("disabled"))
            limits = state.policy(h, user)
            certs = [c.fingerprint for c in state.certificates(h, user) if c.revoked is None]
            if args.json:
                row = {"hub": h, "user": user, "disabled": disabled, "password": bool(record.get("password")),
                       "certificates": certs}
                row.update({k: limits.get(k, 0) for k in POLICY_COLUMNS})  # 0: the hub's default
            else:
                row = {"hub": h, "user": user, "disabled": "disabled" if disabled else "enabled",
                       "login": ", ".join((["password"] if record.get("password") else [])
                                          + ([f"{len(certs)} certificate{'s' * (len(certs) != 1)}"] if certs else []))
                       or None}
                row.update({k: limits.get(k) for k in POLICY_COLUMNS})  # shown as "-": the hub's default
            rows.append(row)
    if args.json:
        print_json(rows)
    else:
        table(rows, ["hub", "user", "disabled", "login"] + POLICY_COLUMNS,
              ["hub", "user", "state", "login", "sessions", "macs", "rate in", "rate out", "bcast pps"])


def user_delete(args) -> None:
    """C{sevpn hub user delete USER}: delete a user; a running hub ends their sessions."""
    _state(args).delete_user(args.hub, args.user)
    done = f"user {args.user} deleted from virtual hub {args.hub}"
    _report(args, done, tell_hub(args, done), hub=args.hub, user=args.user, deleted=True)


def user_enable(args, disabled: bool) -> None:
    """C{sevpn hub user disable|enable USER}: refuse a user's logins (and end their sessions), or allow them again."""
    _state(args).set_user(args.hub, args.user, disabled=disabled)
    done = f"user {args.user} {'disabled' if disabled else 'enabled'} on virtual hub {args.hub}"
    _report(args, done, tell_hub(args, done), hub=args.hub, user=args.user, disabled=disabled)


def user_set(args) -> None:
    """C{sevpn hub user set USER}: change a user's password or limits; a running hub applies them now."""
    changes = {k: getattr(args, k) for k in POLICY_COLUMNS if getattr(args, k) is not None}
    new_password = password(args.password_file).encode("utf-8") if args.password_file else None
    if not changes and new_password is None:
        raise CommandError("nothing to set: give --password-file, --max-sessions, --max-macs, --rate-in, "
                           "--rate-out or --broadcast-pps")
    policy = _state(args).set_user(args.hub, args.user, new_password, **changes)
    shown = ", ".join(f"{k.replace('_', ' ')} {human(k, v) if v else 'the default'}" for k, v in changes.items())
    done = f"user {args.user} on virtual hub {args.hub}: " + (shown or "password changed")
    _report(args, done, tell_hub(args, done), hub=args.hub, user=args.user, policy=policy.limits())


def _control(args, name: str, **kw):
    StateDir(args.state_dir).require()
    return control.call(args.state_dir, name, **kw)


def hub_sessions(args) -> None:
    """
    C{sevpn hub sessions}: the running hub's sessions and cascades, with their
    counters (and worker, with C{--workers}).
    """
    rows = _control(args, "sessions")
    if args.json:
        print_json(rows)
        return
    keys = ["id", "kind", "hub", "user", "peer", "state", "uptime", "bytes_in", "bytes_out", "frames_in", "frames_out",
            "resumes", "frames_buffered", "frames_retransmitted", "frames_dropped", "congestion_drops", "udp"]
    headers = ["id", "kind", "hub", "user", "peer", "state", "uptime", "in", "out", "frames in", "frames out",
               "resumes", "held", "resent", "dropped", "congestion", "udp"]
    if any("worker" in row for row in rows):  # a hub with --workers: where each session is
        keys.insert(1, "worker")
        headers.insert(1, "worker")
    table(rows, keys, headers)


def hub_macs(args) -> None:
    """
    C{sevpn hub macs}: the running hub's MAC table per virtual hub, its switch
    counters, and MACs claimed by more than one port.
    """
    macs = _control(args, "macs")
    if args.json:
        print_json(macs)
        return
    for hub, info in macs.items():
        print(f"virtual hub {hub}:")
        table(info["macs"], ["mac", "worker", "port", "age"] if any("worker" in m for m in info["macs"])
              else ["mac", "port", "age"])
        c = info["counters"]
        print(f"  frames flooded {c['flooded']}, sent to one port {c['unicast']}, filtered {c['filtered']}; "
              f"dropped: MAC limit {c['mac_limit_drops']}, MAC taken {c['mac_conflicts']}, "
              f"bad header {c['bad_headers']}, runt {c['runts']}; MACs not learned (table full) {c['not_learned']}")
        for conflict in info["conflicts"]:
            print(f"  MAC {conflict['mac']} used by more than one port: {', '.join(conflict['ports'])}")


def hub_status(args) -> None:
    """C{sevpn hub status}: the running hub's status (and one row per worker, with C{--workers})."""
    info = _control(args, "status")
    if args.json:
        print_json(info)
        return
    workers = info.pop("workers", None)  # a hub with --workers: one row each
    info.pop("backplane", None)
    fields(info, ["version", "state_dir", "listen", "virtual_hubs", "sessions", "handshaking", "turned_away",
                  "refusals", "resume_window"])
    if workers:
        print("workers:")
        table(workers, ["worker", "pid", "state", "restarts", "sessions", "handshaking", "refusals"])


def hub_ca(args) -> None:
    """
    C{sevpn hub ca}: the CA certificate cards trust, with the fingerprint to
    compare against what C{sevpn account add} prints.
    """
    StateDir(args.state_dir).require()
    info = ca_info(args.state_dir)
    if args.json:
        print_json(info)
        return
    print(f"CA certificate:       {info['path']}")
    print(f"SHA-256 fingerprint:  {info['sha256']}")
    print(f"subject:              {info['subject']}")
    print(f"expires:              {info['not_after'][:10]} (in {info['days_left']} days)")
    print("Cards trust this file (sevpn account add ... --ca-file); check the fingerprint they print against this.")


def session_kick(args) -> None:
    """C{sevpn hub session kick ID}: end one session of the running hub now, telling its card why."""
    ended = _control(args, "kick", session=args.id, reason=args.reason or "")
    if args.json:
        print_json(ended)
    else:
        print(f"ended session {ended['id']} of {ended['user']} on virtual hub {ended['hub']}: {ended['reason']}")


def _count(most: int):
    def convert(text: str) -> int:
        if not text.isdigit() or int(text) > most:
            raise argparse.ArgumentTypeError(f"give a whole number from 0 (the default) to {most}, not {text!r}")
        return int(text)

    return convert


def _rate(text: str) -> int:
    """A rate option's value (bits a second with a unit, or 0 for none)."""
    try:
        return parse_rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _user_args(p, hub: Optional[str] = DEFAULT_HUB) -> None:
    p.add_argument("user")
    p.add_argument("--hub", default=hub, help="virtual hub (default DEFAULT)")
    users_options(p)


def register(roles) -> None:
    """Add C{sevpn hub ...}."""
    hub = roles.add_parser("hub", help="the virtual HUB").add_subparsers(dest="command", metavar="COMMAND")
    hub.required = True
    state = HUB_STATE_DIR
    users_options(command(hub, "create", hub_create, "add a virtual hub", state)).add_argument("name")
    users_options(command(hub, "delete", hub_delete, "delete a virtual hub (its sessions end)", state,
                          json_flag=True)).add_argument("name")
    users_options(command(hub, "list", hub_list, "list virtual hubs", state, json_flag=True))
    command(hub, "sessions", hub_sessions, "the running hub's sessions", state, json_flag=True)
    command(hub, "macs", hub_macs, "the running hub's MAC table per virtual hub", state, json_flag=True)
    command(hub, "status", hub_status, "the running hub's status", state, json_flag=True)
    command(hub, "ca", hub_ca, "the hub's CA certificate: path, SHA-256 fingerprint, expiry", state, json_flag=True)

    sessions = hub.add_parser("session", help="act on one session of the running hub").add_subparsers(
        dest="session_command", metavar="COMMAND"
    )
    sessions.required = True
    p = command(sessions, "kick", session_kick, "end a session now, telling its card why", state, json_flag=True)
    p.add_argument("id", help="the session's id (see 'sevpn hub sessions')")
    p.add_argument("--reason", help="what the card is told and the log says (default: ended by the operator)")

    users = hub.add_parser("user", help="users of a virtual hub").add_subparsers(dest="user_command", metavar="COMMAND")
    users.required = True
    p = command(users, "add", user_add, "add a user or change a password, or give a user a certificate", state,
                json_flag=True)
    _user_args(p)
    p.add_argument("--password-file", help="file whose first line is the password (default: standard input; "
                   "with --cert or --cert-file: none, the user logs in with the certificate)")
    p.add_argument("--cert", action="store_true",
                   help="issue a key and a certificate signed by the hub's CA for the user's card (USER.key and "
                        "USER.pem in --out)")
    p.add_argument("--out", metavar="DIR", help="where --cert writes USER.pem and USER.key (default: here)")
    p.add_argument("--cert-file", help="register this certificate (PEM, signed by the hub's CA) to the user")
    p = users_options(command(users, "list", user_list, "list users and their policy", state, json_flag=True))
    p.add_argument("--hub", help="only this virtual hub")
    p = command(users, "delete", user_delete, "delete a user (their sessions end)", state, json_flag=True)
    _user_args(p)
    p = command(users, "disable", lambda a: user_enable(a, True), "refuse a user's logins and end their sessions",
                state, json_flag=True)
    _user_args(p)
    p = command(users, "enable", lambda a: user_enable(a, False), "let a disabled user log in again", state,
                json_flag=True)
    _user_args(p)
    certs = users.add_parser("cert", help="the users' client certificates").add_subparsers(
        dest="cert_command", metavar="COMMAND")
    certs.required = True
    p = users_options(command(certs, "list", cert_list, "list certificates: fingerprint, expiry, revoked", state,
                              json_flag=True))
    p.add_argument("user", nargs="?", help="only this user's")
    p.add_argument("--hub", help="only this virtual hub")
    p = command(certs, "revoke", cert_revoke, "revoke a user's certificate, or all of theirs (their sessions end)",
                state, json_flag=True)
    _user_args(p)
    p.add_argument("fingerprint", nargs="?", help="the certificate's SHA-256 fingerprint (default: all of the user's)")
    p = command(users, "set", user_set, "change a user's password or limits (0: the hub's default, for rates no limit)", state, json_flag=True)
    _user_args(p)
    p.add_argument("--password-file", help="file whose first line is the new password ('-' for standard input)")
    p.add_argument("--max-sessions", type=_count(UserPolicy.MAXIMA["max_sessions"]), metavar="N",
                   help="sessions of this user at once")
    p.add_argument("--max-macs", type=_count(UserPolicy.MAXIMA["max_macs"]), metavar="N",
                   help="source MACs per session")
    p.add_argument("--rate-in", type=_rate, metavar="RATE",
                   help="bits/s a session may send into the hub, e.g. 10M or 500k")
    p.add_argument("--rate-out", type=_rate, metavar="RATE",
                   help="bits/s the hub sends to a session, e.g. 10M or 500k")
    p.add_argument("--broadcast-pps", type=_count(UserPolicy.MAXIMA["broadcast_pps"]),
                   metavar="N", help="broadcast and multicast frames per second a session may send")
    cascade.register(hub)
    register_fabric(hub)
