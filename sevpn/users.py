"""
The hub's virtual hubs and their users, kept in its state dir.

Layout: C{STATE/hubs/NAME/users.json}, one directory per virtual hub.
Passwords are kept only as salted scrypt hashes; files are 0600.  The
files are the single source of truth: the C{sevpn hub ...} commands edit
them with or without a running hub, and the hub reads them at every login
(cheaply, by modification time), so a new user takes effect at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import Dict, List, Optional

from sevpn import defaults, wire
from sevpn.files import ensure_dir, read_json, write_json

DEFAULT_HUB = defaults.VIRTUAL_HUB

# scrypt cost: ~50 ms and 16 MiB per check on this class of machine.
SCRYPT_N = 1 << 14
SCRYPT_R = 8
SCRYPT_P = 1


class StateError(Exception):
    """A request on the state dir that cannot be done; the message says why."""


def check_name(kind: str, name: str) -> str:
    if not wire.valid_name(name):
        raise StateError(
            f"{name!r} is not a valid {kind} name (letters, digits, '.', '_' and '-', up to 64 characters)"
        )
    return name


def hash_password(password: bytes, salt: Optional[bytes] = None, n: int = SCRYPT_N) -> str:
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.scrypt(password, salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${b64(salt)}${b64(digest)}"


def verify_password(password: bytes, stored: str) -> bool:
    """Constant-time check of C{password} against a L{hash_password} result."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            password, salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


# A hash to check unknown users against, so that a wrong user name takes as
# long to refuse as a wrong password.
_DUMMY_HASH = hash_password(b"not a password", salt=b"\0" * 16)


def read_password_file(path: str) -> bytes:
    """The first line of C{path} (or standard input for '-'), as bytes."""
    import sys

    try:
        if path == "-":
            data = sys.stdin.buffer.readline()
        else:
            with open(path, "rb") as f:
                data = f.readline()
    except OSError as e:
        raise StateError(f"cannot read the password file {path}: {e.strerror}")
    password = data.rstrip(b"\r\n")
    if not password:
        raise StateError(f"the password file {path} is empty")
    return password


class HubState:
    """The virtual hubs and users under one hub state dir."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self._cache: Dict[str, tuple] = {}

    def _hub_dir(self, hub: str) -> str:
        return os.path.join(self.state_dir, "hubs", hub)

    def _users_path(self, hub: str) -> str:
        return os.path.join(self._hub_dir(hub), "users.json")

    def ensure_default(self) -> None:
        if not self.exists(DEFAULT_HUB):
            self.create_hub(DEFAULT_HUB)

    def hubs(self) -> List[str]:
        try:
            names = os.listdir(os.path.join(self.state_dir, "hubs"))
        except FileNotFoundError:
            names = []
        names = set(n for n in names if wire.valid_name(n))
        names.add(DEFAULT_HUB)
        return sorted(names)

    def exists(self, hub: str) -> bool:
        return hub == DEFAULT_HUB or (wire.valid_name(hub) and os.path.isdir(self._hub_dir(hub)))

    def create_hub(self, hub: str) -> None:
        check_name("virtual hub", hub)
        ensure_dir(self.state_dir)
        ensure_dir(self._hub_dir(hub))
        if not os.path.exists(self._users_path(hub)):
            write_json(self._users_path(hub), {"users": {}})

    def delete_hub(self, hub: str) -> None:
        import shutil

        if hub == DEFAULT_HUB:
            raise StateError("the DEFAULT virtual hub always exists and cannot be deleted")
        if not self.exists(hub):
            raise StateError(f"there is no virtual hub named {hub}")
        shutil.rmtree(self._hub_dir(hub))

    def users(self, hub: str) -> Dict[str, dict]:
        if not self.exists(hub):
            raise StateError(f"there is no virtual hub named {hub}")
        path = self._users_path(hub)
        try:
            mtime = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            return {}
        cached = self._cache.get(hub)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        users = read_json(path, {"users": {}}).get("users", {})
        self._cache[hub] = (mtime, users)
        return users

    def add_user(self, hub: str, user: str, password: bytes) -> bool:
        """Add or change a user; True if the user is new."""
        check_name("user", user)
        if hub == DEFAULT_HUB:
            self.ensure_default()
        users = dict(self.users(hub))
        new = user not in users
        record = dict(users.get(user) or {})  # a new password keeps the user's policy
        record["password"] = hash_password(password)
        users[user] = record
        write_json(self._users_path(hub), {"users": users})
        return new

    def set_cascade_user(self, hub: str, user: str, allowed: bool, max_macs: Optional[int] = None) -> None:
        """
        Let other hubs' cascades log in as C{user} (C{"cascade": true} in
        its record), optionally with a MAC limit (its policy's
        C{"max_macs"}), or no longer.
        """
        users = dict(self.users(hub))
        if user not in users:
            raise StateError(f"there is no user {user} on virtual hub {hub} (add it with 'sevpn hub user add')")
        record = dict(users[user])
        if allowed:
            record["cascade"] = True
            if max_macs is not None:
                policy = record.get("policy")
                record["policy"] = dict(policy if isinstance(policy, dict) else {}, max_macs=max_macs)
        else:
            record.pop("cascade", None)
        users[user] = record
        write_json(self._users_path(hub), {"users": users})

    def cascade_user(self, hub: str, user: str) -> bool:
        """Whether other hubs' cascades may log in as C{user}."""
        record = self.users(hub).get(user) if self.exists(hub) else None
        return isinstance(record, dict) and record.get("cascade") is True

    def delete_user(self, hub: str, user: str) -> None:
        users = dict(self.users(hub))
        if user not in users:
            raise StateError(f"there is no user {user} on virtual hub {hub}")
        del users[user]
        write_json(self._users_path(hub), {"users": users})

    def policy(self, hub: str, user: str) -> dict:
        """
        The user's own limits (C{max_sessions}, C{max_macs}, ...), those
        set in the users file; empty when none are, or no such user.
        """
        if not self.exists(hub):
            return {}
        record = self.users(hub).get(user)
        policy = record.get("policy") if isinstance(record, dict) else None
        return {k: v for k, v in policy.items() if type(v) is int and v >= 0} if isinstance(policy, dict) else {}

    def authenticate(self, hub: str, user: str, password: bytes) -> Optional[str]:
        """
        None if C{user} may join C{hub}; else the refusal's code, which is
        L{wire.Refusal.AUTH_FAILED} for an unknown virtual hub, an unknown
        user, a disabled user and a wrong password alike, each after one
        password check: a guesser learns nothing of which it was.
        """
        record = self.users(hub).get(user) if self.exists(hub) else None
        stored = record.get("password", "") if isinstance(record, dict) else ""
        if not stored:
            verify_password(password, _DUMMY_HASH)
            return wire.Refusal.AUTH_FAILED
        right = verify_password(password, stored)
        if not right or record.get("disabled"):
            return wire.Refusal.AUTH_FAILED
        return None
