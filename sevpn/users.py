"""
The hub's virtual hubs and their users: the store's interface
(L{IUserStore}), the rules every store shares, and the file store
(L{HubState}), kept in the hub's state dir.  The other store, shared by
the hub nodes of a fabric, is PostgreSQL (L{sevpn.pgusers}); a store is
made by L{open_user_store}.

Layout: C{STATE/hubs/NAME/users.json}, one directory per virtual hub:

    {"users": {"alice": {"password": "scrypt$...", "disabled": true,
                         "policy": {"max_sessions": 2, "max_macs": 4, "rate_in": 10000000,
                                    "rate_out": 10000000, "broadcast_pps": 100},
                         "certificates": {"3F:A0:...:7C": {"subject": "CN=alice", "serial": "5d0f...",
                                                           "not_after": "2027-...", "added": "2025-...",
                                                           "revoked": "2026-..."}}}}}

Passwords are kept only as salted scrypt hashes; files are 0600.  The
policy (L{UserPolicy}) and its fields are optional; absent means the hub's
default.  A user without a password logs in only with a certificate.
Certificates (L{CertificateRecord}) are keyed by their SHA-256
fingerprint (L{sevpn.pki.fingerprint}); a revoked one stays, with the
time it was revoked, so that it is never registered again by mistake.  The
files are the single source of truth: the C{sevpn hub ...} commands edit
them with or without a running hub, and the hub reads them at every login
(cheaply, by modification time), so a new user takes effect at once; the
command tells a running hub too, which then ends the sessions of users
who were deleted or disabled (L{HubState.revoked}).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, ClassVar, Dict, List, Optional, Tuple

from twisted.application.service import IService, Service
from zope.interface import Interface, implementer

from sevpn import defaults, wire
from sevpn.files import StateDir, StateError, ensure_dir, os_error, read_json, write_json

DEFAULT_HUB = defaults.VIRTUAL_HUB

# scrypt cost: ~50 ms and 16 MiB per check on this class of machine.
SCRYPT_N = 1 << 14
SCRYPT_R = 8
SCRYPT_P = 1


__all__ = [  # StateError lives in sevpn.files
    "StateError", "IUserStore", "HubState", "UserPolicy", "CertificateRecord", "DEFAULT_HUB", "open_user_store",
]

#: A SHA-256 fingerprint as L{sevpn.pki.fingerprint} writes it: 32 bytes, upper-case hex, colons between.
FINGERPRINT_PATTERN = re.compile(r"[0-9A-F]{2}(:[0-9A-F]{2}){31}\Z")  # StateError lives in sevpn.files


def check_name(kind: str, name: str) -> str:
    """
    C{name}, if it is a valid name of a C{kind} (virtual hub, user, account,
    ...) as the wire and file names take it; else a L{StateError} naming the rule.
    """
    if not wire.valid_name(name):
        raise StateError(
            f"{name!r} is not a valid {kind} name (letters, digits, '.', '_' and '-', up to 64 characters)"
        )
    return name


def hash_password(password: bytes, salt: Optional[bytes] = None, n: int = SCRYPT_N) -> str:
    """
    The stored form of a password: C{scrypt$N$R$P$SALT$DIGEST} (base64), a
    fresh random salt unless one is given; parameters travel in the string so
    that L{verify_password} still checks hashes made with other ones.
    """
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


@dataclass(frozen=True)
class UserPolicy:
    """
    A user's own limits on a virtual hub: C{"policy"} in the user's record
    in C{users.json}.  Each is a whole number; 0 (or absent from the file)
    means the hub's default, which for the rates is no limit.

    @ivar max_sessions: sessions of this user on this virtual hub at once,
        connected or held (default L{defaults.MAX_SESSIONS_PER_USER}).
    @ivar max_macs: source MACs each of the user's sessions may use
        (default: the hub's limit per session).
    @ivar rate_in: bits per second a session may send into the hub.
    @ivar rate_out: bits per second the hub sends to a session.
    @ivar broadcast_pps: broadcast and multicast frames per second a
        session may send into the hub.
    """

    max_sessions: int = 0
    max_macs: int = 0
    rate_in: int = 0
    rate_out: int = 0
    broadcast_pps: int = 0

    #: The largest value each limit may take (a typo guard).
    MAXIMA: ClassVar[Dict[str, int]] = {
        "max_sessions": defaults.MAX_SESSIONS,
        "max_macs": 4096,
        "rate_in": 10**12,
        "rate_out": 10**12,
        "broadcast_pps": 10**7,
    }

    def __post_init__(self) -> None:
        for name, most in self.MAXIMA.items():
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= most:
                raise ValueError(f"{name} must be a whole number from 0 (the default) to {most}, not {value!r}")

    @classmethod
    def of(cls, record: dict) -> "UserPolicy":
        """
        The policy in a user's record (C{ValueError} for a bad one; keys
        this version does not know are left alone).
        """
        policy = record.get("policy", {})
        if not isinstance(policy, dict):
            raise ValueError("'policy' must be an object")
        return cls(**{f.name: policy[f.name] for f in fields(cls) if f.name in policy})

    def limits(self) -> Dict[str, int]:
        """The limits that are set (not 0): what the users file holds under C{"policy"}."""
        return {k: v for k, v in asdict(self).items() if v}


@dataclass(frozen=True)
class CertificateRecord:
    """
    A client certificate registered to a user: what the operator sees of
    it, and whether it was revoked.  The certificate itself is not kept:
    its fingerprint is what a login is matched on.

    @ivar fingerprint: its SHA-256 fingerprint (L{sevpn.pki.fingerprint}).
    @ivar subject: its subject, as RFC 4514 text (C{CN=alice}).
    @ivar serial: its serial number in hex.
    @ivar not_after: when it expires (ISO 8601, UTC).
    @ivar added: when it was registered (ISO 8601, UTC).
    @ivar revoked: when it was revoked (ISO 8601, UTC), or None.
    """

    fingerprint: str
    subject: str
    serial: str
    not_after: str
    added: str
    revoked: Optional[str] = None

    def to_json(self) -> dict:
        """Its entry under C{"certificates"} in the user's record (keyed by the fingerprint)."""
        info = {k: v for k, v in asdict(self).items() if v is not None}
        del info["fingerprint"]
        return info

    @classmethod
    def from_json(cls, fingerprint: str, info: object) -> "CertificateRecord":
        """The record of C{fingerprint} in a users file; C{ValueError} for a bad one."""
        if not FINGERPRINT_PATTERN.match(fingerprint):
            raise ValueError(f"{wire.quote(fingerprint)} is not a SHA-256 fingerprint")
        if not isinstance(info, dict):
            raise ValueError(f"certificate {fingerprint} is not an object")
        values = {}
        for f in fields(cls):
            if f.name == "fingerprint":
                continue
            value = info.get(f.name)
            if not isinstance(value, str) and not (f.name == "revoked" and value is None):
                raise ValueError(f"certificate {fingerprint} has no {f.name!r} text")
            values[f.name] = value
        return cls(fingerprint, **values)


def record_certificates(record: dict) -> Dict[str, CertificateRecord]:
    """The certificates in a user's record, by fingerprint (C{ValueError} for a bad one)."""
    return {fp: CertificateRecord.from_json(fp, info) for fp, info in record.get("certificates", {}).items()}


def utc_now() -> str:
    """Now, as certificate records keep times (ISO 8601, UTC, seconds)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class IUserStore(Interface):
    """
    Where a hub's virtual hubs and users live: the hub (L{sevpn.hub.Hub}),
    the hub service, cascades and the C{sevpn hub ...} commands use a store
    only through these methods.

    A user's record is a dict as the users file holds it: C{"password"}
    (a L{hash_password} string), and when set C{"disabled": True},
    C{"cascade": True} and C{"policy"} (L{UserPolicy}'s limits).

    Threads: L{authenticate} and L{refresh} may wait for the store (the
    hub runs them in its thread pool); the hub calls the other reads in
    the reactor thread, so a store that is not local answers them from
    what it holds.  Every method may raise L{StateError} with a sentence.
    """

    def describe() -> dict:
        """Where the users live and how the store is doing: C{{"store", "where", ...}} for status."""

    def ensure_default() -> None:
        """Make sure the DEFAULT virtual hub can be used."""

    def hubs() -> List[str]:
        """The virtual hubs' names, sorted; DEFAULT is always one."""

    def exists(hub: str) -> bool:
        """Whether virtual hub C{hub} exists (DEFAULT always does)."""

    def create_hub(hub: str) -> None:
        """Add virtual hub C{hub} (nothing happens if it exists)."""

    def delete_hub(hub: str) -> None:
        """Delete virtual hub C{hub} and its users (not DEFAULT)."""

    def users(hub: str) -> Dict[str, dict]:
        """The user records of C{hub}, by name (read-only)."""

    def add_user(hub: str, user: str, password: Optional[bytes]) -> bool:
        """
        Add a user or change a password (keeping the user's policy and
        certificates); True if the user is new.  With C{password} None a
        new user has no password (they log in with a certificate) and an
        existing one keeps theirs.
        """

    def set_user(hub: str, user: str, password: Optional[bytes] = None, disabled: Optional[bool] = None,
                 **limits: int) -> UserPolicy:
        """Change a user's password, disabled flag and limits (L{UserPolicy}'s names); the user's policy."""

    def delete_user(hub: str, user: str) -> None:
        """Delete a user."""

    def set_cascade_user(hub: str, user: str, allowed: bool, max_macs: Optional[int] = None) -> None:
        """Let other hubs' cascades log in as C{user} (optionally with a MAC limit), or no longer."""

    def cascade_user(hub: str, user: str) -> bool:
        """Whether other hubs' cascades may log in as C{user}."""

    def revoked(hub: str, user: str, certificate: Optional[str] = None) -> Optional[str]:
        """
        Why a session of C{user} on C{hub} must end now (a sentence), or
        None if it may stay; C{certificate}: the fingerprint it logged in
        with, which must still be the user's and not revoked.
        """

    def policy(hub: str, user: str) -> Dict[str, int]:
        """The user's own limits that are set; empty when none are, or no such user."""

    def authenticate(hub: str, user: str, password: bytes) -> Optional[str]:
        """
        None if C{user} may join C{hub} with C{password}; else the refusal
        code (L{wire.Refusal.AUTH_FAILED}), the same for every reason.
        May wait for the store.
        """

    def add_certificate(hub: str, user: str, certificate: CertificateRecord) -> bool:
        """
        Register a client certificate to C{user}; True if it is new to the
        user, a L{StateError} when it is another user's or was revoked.
        """

    def certificates(hub: str, user: str) -> List[CertificateRecord]:
        """C{user}'s certificates on C{hub}, revoked ones too, the newest last."""

    def revoke_certificates(hub: str, user: str, fingerprint: Optional[str] = None) -> List[str]:
        """Revoke C{user}'s certificate C{fingerprint}, or all of theirs; the fingerprints revoked now."""

    def certificate_user(hub: str, fingerprint: str) -> Optional[str]:
        """The user the certificate C{fingerprint} logs in as on C{hub}: None if none (or revoked)."""

    def certificate_login(hub: str, user: str, fingerprint: str) -> Optional[str]:
        """
        None if a card whose TLS connection carried the verified
        certificate C{fingerprint} may join C{hub} as C{user}; else
        L{wire.Refusal.AUTH_FAILED}, as for a wrong password.  May wait
        for the store.
        """

    def refresh() -> bool:
        """
        Bring what this process holds up to date with the store: True if
        the users changed since the last look.  May wait for the store.
        """

    def watch(reactor, changed: Callable[[], None]) -> IService:
        """
        A service that calls C{changed()} in the reactor thread when
        another process changed the users (a store with nothing to watch
        returns one that does nothing: the C{sevpn} command tells its
        hub itself).
        """

    def close() -> None:
        """Let go of what the store holds open."""


class UserRules:
    """
    What every store decides the same way from a virtual hub's records
    (C{self.exists}, C{self.users}): why a session must end, a user's
    policy and certificates, whether a user may cascade, whose a
    certificate is.  A store sets C{self._certificate_index = {}}.
    """

    _certificate_index: Dict[str, tuple]

    def revoked(self, hub: str, user: str, certificate: Optional[str] = None) -> Optional[str]:
        """
        L{IUserStore.revoked}: the hub, the user or the certificate gone, the
        user disabled, or the certificate revoked.
        """
        if not self.exists(hub):
            return f"virtual hub {hub} was deleted by the operator"
        record = self.users(hub).get(user)
        if record is None:
            return f"user {user} was deleted by the operator"
        if record.get("disabled"):
            return f"user {user} was disabled by the operator"
        if certificate is not None:
            cert = record_certificates(record).get(certificate)
            if cert is None:
                return f"the certificate {certificate} of user {user} was removed by the operator"
            if cert.revoked is not None:
                return f"the certificate {certificate} of user {user} was revoked by the operator"
        return None

    def policy(self, hub: str, user: str) -> Dict[str, int]:
        if not self.exists(hub):
            return {}
        record = self.users(hub).get(user)
        return UserPolicy.of(record).limits() if record is not None else {}

    def cascade_user(self, hub: str, user: str) -> bool:
        record = self.users(hub).get(user) if self.exists(hub) else None
        return isinstance(record, dict) and record.get("cascade") is True

    def certificates(self, hub: str, user: str) -> List[CertificateRecord]:
        users = self.users(hub)
        if user not in users:
            raise no_such_user(hub, user)
        return sorted(record_certificates(users[user]).values(), key=lambda c: (c.added, c.fingerprint))

    def certificate_user(self, hub: str, fingerprint: str) -> Optional[str]:
        """
        L{IUserStore.certificate_user}, from an index of the live certificates
        that is rebuilt only when the virtual hub's user records are new.
        """
        if not self.exists(hub):
            return None
        users = self.users(hub)
        index = self._certificate_index.get(hub)
        if index is None or index[0] is not users:
            live = {cert.fingerprint: user for user, record in users.items()
                    for cert in record_certificates(record).values() if cert.revoked is None}
            index = self._certificate_index[hub] = (users, live)
        return index[1].get(fingerprint)


def check_login(record: Optional[dict], password: bytes) -> Optional[str]:
    """
    None if C{password} opens C{record} (a user's record, or None for no
    such user or virtual hub); else L{wire.Refusal.AUTH_FAILED}, which is
    the answer for an unknown virtual hub, an unknown user, a disabled
    user and a wrong password alike, each after one password check: a
    guesser learns nothing of which it was.
    """
    stored = record.get("password", "") if isinstance(record, dict) else ""
    if not stored:
        verify_password(password, _DUMMY_HASH)
        return wire.Refusal.AUTH_FAILED
    right = verify_password(password, stored)
    if not right or record.get("disabled"):
        return wire.Refusal.AUTH_FAILED
    return None


def no_such_user(hub: str, user: str, advice: str = "see 'sevpn hub user list'") -> StateError:
    """The L{StateError} for a missing user, with C{advice} on what to do."""
    return StateError(f"there is no user {user} on virtual hub {hub} ({advice})")


def with_settings(
    record: dict, password: Optional[bytes], disabled: Optional[bool], limits: Dict[str, int]
) -> Tuple[dict, UserPolicy]:
    """C{record} changed as L{IUserStore.set_user} says, and the user's policy."""
    record = dict(record)
    try:
        policy = replace(UserPolicy.of(record), **limits)
    except (TypeError, ValueError) as e:
        raise StateError(str(e))
    kept = {k: v for k, v in record.get("policy", {}).items() if k not in UserPolicy.MAXIMA}
    record["policy"] = dict(kept, **policy.limits())
    if not record["policy"]:
        del record["policy"]
    if disabled is not None:
        record.pop("disabled", None)
        if disabled:
            record["disabled"] = True
    if password is not None:
        record["password"] = hash_password(password)
    return record, policy


def with_cascade(record: dict, allowed: bool, max_macs: Optional[int]) -> dict:
    """C{record} changed as L{IUserStore.set_cascade_user} says."""
    record = dict(record)
    if allowed:
        record["cascade"] = True
        if max_macs is not None:
            policy = record.get("policy")
            record["policy"] = dict(policy if isinstance(policy, dict) else {}, max_macs=max_macs)
    else:
        record.pop("cascade", None)
    return record


@implementer(IUserStore)
class HubState(UserRules):
    """
    The file store: the virtual hubs and users under one hub state dir.
    The files are read at every call (cheaply, by modification time), so
    there is nothing to refresh and nothing to watch: the C{sevpn}
    command tells a running hub on the same state dir itself.
    """

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.dir = StateDir(state_dir)
        self._cache: Dict[str, tuple] = {}
        #: Per virtual hub: (the users it was made from, {live certificate's fingerprint: user}).
        self._certificate_index: Dict[str, tuple] = {}

    def _hub_dir(self, hub: str) -> str:
        return self.dir.join("hubs", hub)

    def _users_path(self, hub: str) -> str:
        return os.path.join(self._hub_dir(hub), "users.json")

    def describe(self) -> dict:
        return {"store": "files", "where": os.path.join(os.path.abspath(self.state_dir), "hubs")}

    def refresh(self) -> bool:
        return False

    def watch(self, reactor, changed: Callable[[], None]) -> IService:
        return Service()

    def close(self) -> None:
        pass

    def ensure_default(self) -> None:
        if not self.exists(DEFAULT_HUB):
            self.create_hub(DEFAULT_HUB)

    def hubs(self) -> List[str]:
        """L{IUserStore.hubs}: the directories under C{STATE/hubs/}, and DEFAULT (which needs none)."""
        try:
            names = os.listdir(self.dir.join("hubs"))
        except FileNotFoundError:
            names = []
        except OSError as e:
            raise os_error(e, "read the virtual hubs in")
        names = set(n for n in names if wire.valid_name(n) and os.path.isdir(self._hub_dir(n)))
        names.add(DEFAULT_HUB)
        return sorted(names)

    def exists(self, hub: str) -> bool:
        return hub == DEFAULT_HUB or (wire.valid_name(hub) and os.path.isdir(self._hub_dir(hub)))

    def create_hub(self, hub: str) -> None:
        """L{IUserStore.create_hub}: its directory and an empty users file (an existing one is kept)."""
        check_name("virtual hub", hub)
        self.dir.create()
        ensure_dir(self._hub_dir(hub))
        if read_json(self._users_path(hub), None, "users") is None:
            write_json(self._users_path(hub), {"users": {}})

    def delete_hub(self, hub: str) -> None:
        if hub == DEFAULT_HUB:
            raise StateError("the DEFAULT virtual hub always exists and cannot be deleted")
        if not self.exists(hub):
            raise StateError(f"there is no virtual hub named {hub}")
        try:
            shutil.rmtree(self._hub_dir(hub))
        except OSError as e:
            raise os_error(e, "delete")

    def users(self, hub: str) -> Dict[str, dict]:
        """The user records of C{hub} (checked: a damaged file is a L{StateError})."""
        if not self.exists(hub):
            raise StateError(f"there is no virtual hub named {hub}")
        path = self._users_path(hub)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise os_error(e, "read")
        mtime = (st.st_mtime_ns, st.st_ino, st.st_size)
        cached = self._cache.get(hub)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        users = _checked_users(path, read_json(path, {"users": {}}, "users"))
        self._cache[hub] = (mtime, users)
        return users

    def _write(self, hub: str, users: Dict[str, dict]) -> None:
        write_json(self._users_path(hub), {"users": users})

    def _record(self, hub: str, user: str, advice: str = "see 'sevpn hub user list'") -> dict:
        users = self.users(hub)
        if user not in users:
            raise no_such_user(hub, user, advice)
        return dict(users[user])

    def add_user(self, hub: str, user: str, password: Optional[bytes]) -> bool:
        """L{IUserStore.add_user}: the DEFAULT virtual hub's directory is made on its first user."""
        check_name("user", user)
        if hub == DEFAULT_HUB:
            self.ensure_default()
        users = dict(self.users(hub))
        new = user not in users
        record = dict(users.get(user) or {})  # a new password keeps the user's policy
        if password is not None:
            record["password"] = hash_password(password)
        users[user] = record
        self._write(hub, users)
        return new

    def set_cascade_user(self, hub: str, user: str, allowed: bool, max_macs: Optional[int] = None) -> None:
        """
        Let other hubs' cascades log in as C{user} (C{"cascade": true} in
        its record), optionally with a MAC limit (its policy's
        C{"max_macs"}), or no longer.
        """
        record = with_cascade(self._record(hub, user, "add it with 'sevpn hub user add'"), allowed, max_macs)
        users = dict(self.users(hub))
        users[user] = record
        self._write(hub, users)

    def set_user(
        self, hub: str, user: str, password: Optional[bytes] = None, disabled: Optional[bool] = None, **limits: int
    ) -> UserPolicy:
        """
        Change a user's password, whether they are disabled, and limits
        (L{UserPolicy}'s names, e.g. C{rate_in=10_000_000}; 0 for the
        default); returns the user's policy.
        """
        record, policy = with_settings(self._record(hub, user), password, disabled, limits)
        users = dict(self.users(hub))
        users[user] = record
        self._write(hub, users)
        return policy

    def delete_user(self, hub: str, user: str) -> None:
        """L{IUserStore.delete_user}; a L{StateError} if there is no such user."""
        self._record(hub, user)
        users = dict(self.users(hub))
        del users[user]
        self._write(hub, users)

    def authenticate(self, hub: str, user: str, password: bytes) -> Optional[str]:
        """See L{check_login}: the same refusal for every reason, after one password check."""
        record = self.users(hub).get(user) if self.exists(hub) else None
        return check_login(record, password)

    # certificates ------------------------------------------------------------

    def add_certificate(self, hub: str, user: str, certificate: CertificateRecord) -> bool:
        """
        Register a client certificate to C{user} (who must exist): a card
        presenting it over TLS then logs in as C{user} without a password.
        True if it is new to the user; a L{StateError} when it is another
        user's on this virtual hub, or was revoked.
        """
        users = dict(self.users(hub))
        if user not in users:
            raise StateError(f"there is no user {user} on virtual hub {hub} (add it with 'sevpn hub user add')")
        fp = certificate.fingerprint
        for other, record in users.items():
            known = record_certificates(record).get(fp)
            if known is None:
                continue
            if known.revoked is not None:
                raise StateError(
                    f"the certificate {fp} was revoked on {known.revoked[:10]} (user {other}): "
                    f"a revoked certificate is never taken back; issue a new one with "
                    f"'sevpn hub user add {user} --cert'"
                )
            if other != user:
                raise StateError(f"the certificate {fp} is already user {other}'s on virtual hub {hub}: "
                                 f"a certificate logs in as one user")
            return False
        record = dict(users[user])
        certs = dict(record.get("certificates", {}))
        certs[fp] = certificate.to_json()
        record["certificates"] = certs
        users[user] = record
        self._write(hub, users)
        return True

    def revoke_certificates(self, hub: str, user: str, fingerprint: Optional[str] = None) -> List[str]:
        """
        Revoke C{user}'s certificate C{fingerprint}, or all of theirs (None);
        return the fingerprints revoked now.  Their sessions end when the
        running hub is told (L{revoked}).
        """
        record = self._record(hub, user)
        certs = record_certificates(record)
        if fingerprint is not None and fingerprint not in certs:
            raise StateError(f"user {user} on virtual hub {hub} has no certificate {fingerprint} "
                             f"(see 'sevpn hub user cert list {user}')")
        now = utc_now()
        done = []
        for fp, cert in certs.items():
            if cert.revoked is None and fingerprint in (None, fp):
                certs[fp] = replace(cert, revoked=now)
                done.append(fp)
        if done:
            record["certificates"] = {fp: cert.to_json() for fp, cert in certs.items()}
            users = dict(self.users(hub))
            users[user] = record
            self._write(hub, users)
        return done

    def certificate_login(self, hub: str, user: str, fingerprint: str) -> Optional[str]:
        """
        None if a card whose TLS connection carried the verified
        certificate C{fingerprint} may join C{hub} as C{user}; else the
        refusal's code: L{wire.Refusal.AUTH_FAILED} when the certificate is
        unknown, revoked, another user's, or its user disabled, as for a
        wrong password.
        """
        if self.certificate_user(hub, fingerprint) != user:
            return wire.Refusal.AUTH_FAILED
        if self.users(hub)[user].get("disabled"):
            return wire.Refusal.AUTH_FAILED
        return None


def open_user_store(state_dir: str, users: Optional[str] = None, **settings) -> IUserStore:
    """
    The store of a hub: the files in C{state_dir}, or with C{users} (a
    C{postgresql://} URL, L{users_location}) the database the hub nodes
    of a fabric share (L{sevpn.pgusers.PostgresUserStore}, which takes
    C{settings}).
    """
    if users is None:
        return HubState(state_dir)
    try:
        from sevpn.pgusers import PostgresUserStore
    except ImportError as e:
        raise StateError(f"--users needs the Python package psycopg ({e}): pip install 'psycopg[binary]'")
    return PostgresUserStore(users, **settings)


def users_location(url: Optional[str] = None, path: Optional[str] = None, option: str = "--users") -> Optional[str]:
    """
    The shared store's URL from C{--users URL} or C{--users-file PATH}
    (the file's first line), or None for the files in the state dir.
    A password is refused on the command line, where every user of the
    machine can read it in the process list, and in a file others may
    read: it belongs in a 0600 file, or in libpq's C{~/.pgpass}.
    """
    if url is not None and path is not None:
        raise StateError(f"give {option} or {option}-file, not both")
    if path is not None:
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                line = f.readline(4096).decode("utf-8", "replace").strip()
        except OSError as e:
            raise os_error(e, f"read {option}-file", "give the file holding the user database's URL")
        if not line:
            raise StateError(
                f"{option}-file {path} is empty: its first line must be a postgresql://USER@HOST/DATABASE URL")
        _check_location(line, f"{option}-file {path}")
        if _has_password(line) and mode & 0o077:
            raise StateError(f"{option}-file {path} holds the database password but other users may read it: "
                             f"chmod 600 {path}")
        return line
    if url is None:
        return None
    _check_location(url, option)
    if _has_password(url):
        raise StateError(f"{option}: the URL holds a password, which every user of this machine can read in the "
                         f"process list: put the URL in a file only you can read and give {option}-file FILE, "
                         "or keep the password in ~/.pgpass")
    return url


def _check_location(url: str, where: str) -> None:
    from urllib.parse import urlsplit

    if urlsplit(url).scheme not in ("postgresql", "postgres"):
        shown = wire.quote(url.split("@")[-1]) if "@" in url else wire.quote(url)
        raise StateError(f"{where}: {shown} is not a postgresql://USER@HOST/DATABASE URL (the users of several hub "
                         "nodes are shared in PostgreSQL; without the option the hub keeps them in its state dir)")


def _has_password(url: str) -> bool:
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    return bool(parts.password) or "password" in parse_qs(parts.query)


def _checked_users(path: str, data) -> Dict[str, dict]:
    """The users of a users file, or a L{StateError} naming what is wrong in it."""

    def damaged(why: str) -> StateError:
        return StateError(f"the users file {path} is damaged ({why}): fix it, or restore it from a backup")

    users = data.get("users") if isinstance(data, dict) else None
    if not isinstance(users, dict):
        raise damaged("it holds no 'users' object")
    for name, record in users.items():
        if not wire.valid_name(name):
            raise damaged(f"{wire.quote(name)} is not a valid user name")
        if not isinstance(record, dict) or not isinstance(record.get("password", ""), str):
            raise damaged(f"user {name}: 'password' must be a password hash")
        if not isinstance(record.get("disabled", False), bool):
            raise damaged(f"user {name}: 'disabled' must be true or false")
        try:
            UserPolicy.of(record)
            if not isinstance(record.get("certificates", {}), dict):
                raise ValueError("'certificates' must be an object")
            record_certificates(record)
        except (TypeError, ValueError) as e:
            raise damaged(f"user {name}: {e}")
    return users
