"""
The users the hub nodes of a fabric share, in PostgreSQL
(C{--users postgresql://USER@HOST/DATABASE}): L{PostgresUserStore}, an
L{IUserStore} beside the file store, and L{UserDatabaseWatcher}, which
tells a running hub when another node changed them.

Driver: psycopg 3, blocking, in the reactor's thread pool.  The hub
already runs every password check there (scrypt takes ~50 ms), so the
one query a login needs rides along in the same thread; the C{sevpn}
command uses the same store synchronously, and one store serves both.
(txpostgres, the driver made for Twisted, sits on psycopg2 and has had
no release since 2019.)  Change notifications come on a second
connection whose socket the reactor reads (L{NotifyReader}).

Tables (created on first use, L{MIGRATIONS}; names prefixed C{sevpn_} so
the database may hold other things): C{sevpn_schema} (the schema's
version), C{sevpn_hubs}, C{sevpn_users} (password hash, disabled,
cascade, policy as JSON), C{sevpn_certificates} (client certificates'
records, one user's per virtual hub), C{sevpn_generation} (a number
every change raises; each change also sends C{NOTIFY sevpn_users}).  Every change is
one transaction that first raises the generation, so changes from
several nodes are applied one after another.

What a node holds (its copy) and what an outage costs, exactly:

 - The hub reads every user at start (a database it cannot reach is a
   start-up error) and reads again whenever the generation moved: at
   once on a notification, else at its next check (every
   L{defaults.USERS_POLL} s); then it applies the change to live sessions
   (L{sevpn.hub.Hub.users_changed}: a disabled or deleted user's sessions
   end on every node).
 - A login reads its user's row from the database, waiting at most
   L{defaults.USERS_TIMEOUT} s.  If the database does not answer, the
   login uses the copy if the copy was checked against the database at
   most L{defaults.USERS_GRACE} s ago (C{--users-grace}); a user the copy
   does not hold is refused, and so is one it holds as disabled.  For
   L{defaults.USERS_RETRY} s after a failure logins do not wait for the
   database at all.
 - Changes (the C{sevpn hub ...} commands) fail with a sentence while the
   database does not answer.
 - The outage is logged once when it is noticed and once when it ends.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb
from twisted.application.service import Service
from twisted.internet import main
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from sevpn import defaults, wire
from sevpn.quantities import format_duration
from sevpn.users import (
    DEFAULT_HUB, CertificateRecord, IUserStore, StateError, UserPolicy, UserRules, check_login, check_name,
    hash_password, no_such_user, record_certificates, utc_now, with_cascade, with_settings,
)

#: The schema this code reads and writes.
SCHEMA_VERSION = 2
#: The channel every change is announced on.
CHANNEL = "sevpn_users"
#: The advisory lock under which a node migrates the schema ("sevpnusr").
MIGRATION_LOCK = 0x736576706E757372

_NAME = r"CHECK ({column} ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}$')"

#: (version, statements): what brings the schema from the version before
#: to this one.  Each runs once, in one transaction, under L{MIGRATION_LOCK}.
MIGRATIONS: Tuple[Tuple[int, Tuple[str, ...]], ...] = (
    (1, (
        "CREATE TABLE sevpn_hubs (name text PRIMARY KEY " + _NAME.format(column="name") + ")",
        "CREATE TABLE sevpn_users ("
        " hub text NOT NULL REFERENCES sevpn_hubs (name) ON DELETE CASCADE,"
        " name text NOT NULL " + _NAME.format(column="name") + ","
        " password text NOT NULL,"
        " disabled boolean NOT NULL DEFAULT false,"
        " cascade boolean NOT NULL DEFAULT false,"
        " policy jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(policy) = 'object'),"
        " PRIMARY KEY (hub, name))",
        "CREATE TABLE sevpn_generation (one boolean PRIMARY KEY DEFAULT true CHECK (one), n bigint NOT NULL)",
        "INSERT INTO sevpn_generation (n) VALUES (0)",
    )),
    (2, (  # client certificates; users who log in only with one have no password
        "ALTER TABLE sevpn_users ALTER COLUMN password DROP NOT NULL",
        "CREATE TABLE sevpn_certificates ("
        " hub text NOT NULL,"
        " user_name text NOT NULL,"
        " fingerprint text NOT NULL CHECK (fingerprint ~ '^[0-9A-F]{2}(:[0-9A-F]{2}){31}$'),"
        " subject text NOT NULL, serial text NOT NULL, not_after text NOT NULL, added text NOT NULL, revoked text,"
        " PRIMARY KEY (hub, fingerprint),"  # one certificate, one user of a virtual hub
        " FOREIGN KEY (hub, user_name) REFERENCES sevpn_users (hub, name) ON DELETE CASCADE)",
    )),
)

_USER_COLUMNS = "password, disabled, cascade, policy"
_CERTIFICATE_COLUMNS = "fingerprint, subject, serial, not_after, added, revoked"


class Unavailable(StateError):
    """The user database did not answer (refused, timed out, went away)."""


def connection_settings(url: str, timeout: float) -> Dict[str, str]:
    """
    libpq's parameters for C{url}, with sevpn's bounds where the URL sets
    none: connecting within C{timeout} (whole seconds, at least 2, as
    libpq counts), statements within C{timeout}, unacknowledged data and
    a silent peer noticed within seconds (TCP user timeout, keepalives).
    """
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as e:
        raise StateError(f"--users: cannot read the URL ({_first_line(e)})")
    params.setdefault("connect_timeout", str(max(2, int(timeout + 0.999))))
    params.setdefault("application_name", "sevpn")
    params.setdefault("tcp_user_timeout", str(int(timeout * 1000)))
    params.setdefault("keepalives", "1")
    params.setdefault("keepalives_idle", "10")
    params.setdefault("keepalives_interval", "5")
    params.setdefault("keepalives_count", "3")
    statement = f"-c statement_timeout={int(timeout * 1000)}"
    params["options"] = f"{params['options']} {statement}" if params.get("options") else statement
    return params


def describe_location(params: Dict[str, str]) -> str:
    """Where the database is, for sentences: C{postgresql://USER@HOST:PORT/DATABASE}, never the password."""
    user = params.get("user", "")
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user + '@' if user else ''}{host}{port}/{params.get('dbname', '')}"


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _record(password: Optional[str], disabled: bool, cascade: bool, policy, certificates=()) -> dict:
    """A row (and its certificates' rows) as the user's record (the users file's shape)."""
    record = {} if password is None else {"password": password}
    if disabled:
        record["disabled"] = True
    if cascade:
        record["cascade"] = True
    if policy:
        record["policy"] = dict(policy)
    if certificates:
        record["certificates"] = {row[0]: CertificateRecord(*row).to_json() for row in certificates}
    return record


def _row(record: dict) -> tuple:
    policy = record.get("policy")
    return (record.get("password"), bool(record.get("disabled")), record.get("cascade") is True,
            Jsonb(policy if isinstance(policy, dict) else {}))


@implementer(IUserStore)
class PostgresUserStore(UserRules):
    """
    Virtual hubs and users in a PostgreSQL database several hub nodes
    share.  Reads answer from this process's copy (loaded at the first
    read, brought up to date by L{refresh}); L{authenticate} asks the
    database, falling back to the copy by the rule in the module's
    docstring; changes go to the database at once.  Thread-safe: one
    connection, used by one thread at a time.

    @param clock: seconds, monotonic (the outage rule's clock).
    @param connect: makes a connection from libpq parameters.
    """

    log = Logger()

    def __init__(
        self, url: str, grace: float = defaults.USERS_GRACE, timeout: float = defaults.USERS_TIMEOUT,
        retry: float = defaults.USERS_RETRY, poll: float = defaults.USERS_POLL,
        clock: Callable[[], float] = time.monotonic, connect: Callable[..., psycopg.Connection] = psycopg.connect,
    ) -> None:
        self.params = connection_settings(url, timeout)
        self.where = describe_location(self.params)
        self.grace = grace
        self.timeout = timeout
        self.retry = retry
        self.poll = poll
        self.clock = clock
        self._connect = connect
        self._lock = threading.Lock()
        self._conn: Optional[psycopg.Connection] = None
        #: hub -> user -> record; replaced, never changed in place (the reactor thread reads it).
        self._copy: Optional[Dict[str, Dict[str, dict]]] = None
        self._copy_lock = threading.Lock()
        self._generation: Optional[int] = None
        self._last_seen: Optional[int] = None
        self._checked: Optional[float] = None
        self._certificate_index: Dict[str, tuple] = {}
        self._health = threading.Lock()
        self._down_since: Optional[float] = None
        self._failed_at: Optional[float] = None
        self.outages = 0

    # talking to the database -----------------------------------------------

    def _connected(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            conn = self._connect(**self.params, autocommit=True)
            try:
                self._migrate(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _migrate(self, conn: psycopg.Connection) -> None:
        """
        Bring the schema to L{SCHEMA_VERSION}: idempotent, one node at a
        time (a session lock, then a transaction that starts after it, so
        that it sees what a node before it made).
        """
        if self._version(conn) == SCHEMA_VERSION:
            return
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            with conn.transaction():
                if conn.execute("SELECT to_regclass('sevpn_schema')").fetchone()[0] is None:
                    conn.execute("CREATE TABLE sevpn_schema (one boolean PRIMARY KEY DEFAULT true CHECK (one), "
                                 "version integer NOT NULL)")
                    conn.execute("INSERT INTO sevpn_schema (version) VALUES (0)")
                version = self._version(conn)
                if version > SCHEMA_VERSION:
                    raise StateError(
                        f"the user database {self.where} has schema version {version}, newer than this sevpn "
                        f"knows ({SCHEMA_VERSION}): upgrade sevpn on this node"
                    )
                for target, statements in MIGRATIONS:
                    if target > version:
                        for statement in statements:
                            conn.execute(statement)
                        conn.execute("UPDATE sevpn_schema SET version = %s", (target,))
                        self.log.info("user database {where}: schema brought to version {v}",
                                      where=self.where, v=target)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))

    @staticmethod
    def _version(conn: psycopg.Connection) -> int:
        if conn.execute("SELECT to_regclass('sevpn_schema')").fetchone()[0] is None:
            return 0
        return conn.execute("SELECT version FROM sevpn_schema").fetchone()[0]

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def _transaction(self, work: Callable[[psycopg.Connection], object], doing: str, login: bool = False):
        """
        C{work(connection)} in one transaction; its result.  Raises
        L{Unavailable} when the database does not answer (at once for a
        C{login} while it is known to be down), L{StateError} when it
        refuses.
        """
        if login and self._known_down():
            raise Unavailable(f"cannot {doing}: the user database {self.where} does not answer")
        if not self._lock.acquire(timeout=2 * self.timeout + 1):
            why = f"it is busy with another request for more than {format_duration(2 * self.timeout + 1)}"
            self._failed(why)
            raise Unavailable(f"cannot {doing}: the user database {self.where} does not answer ({why})")
        try:
            conn = self._connected()
            with conn.transaction():
                result = work(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            self._drop()
            self._failed(_first_line(e))
            raise Unavailable(f"cannot {doing}: the user database {self.where} does not answer ({_first_line(e)})")
        except psycopg.Error as e:
            self._answered()
            raise StateError(f"cannot {doing}: the user database {self.where} refused it ({_first_line(e)})")
        except StateError:
            self._answered()  # it answered: the request is what cannot be done
            raise
        finally:
            self._lock.release()
        self._answered()
        return result

    def _known_down(self) -> bool:
        failed = self._failed_at
        return failed is not None and self.clock() - failed < self.retry

    def _failed(self, why: str) -> None:
        with self._health:
            now = self.clock()
            self._failed_at = now
            if self._down_since is not None:
                return
            self._down_since = now
            self.outages += 1
        checked = self._checked
        self.log.warn(
            "the user database {where} does not answer ({why}): logins use this node's copy of the users "
            "({copy}) for up to {grace}; users it does not hold are refused and users cannot be changed "
            "until the database answers",
            where=self.where, why=why, grace=format_duration(self.grace),
            copy=f"checked {format_duration(now - checked)} ago" if checked is not None else "empty",
        )

    def _answered(self) -> None:
        with self._health:
            since, self._down_since, self._failed_at = self._down_since, None, None
        if since is not None:
            self.log.info("the user database {where} answers again (it did not for {d})",
                          where=self.where, d=format_duration(self.clock() - since))

    def _write(self, work: Callable[[psycopg.Connection], object]):
        """A change: raise the generation first (changes from every node queue here), announce it at commit."""

        def change(conn):
            generation = conn.execute("UPDATE sevpn_generation SET n = n + 1 RETURNING n").fetchone()[0]
            result = work(conn)
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(generation)))
            return result

        result = self._transaction(change, "change the users")
        if self._copy is not None:  # this process reads what it wrote
            with self._copy_lock:
                self._generation = None
            try:
                self.refresh()
            except StateError:
                self._forget_copy()
        return result

    # the copy ------------------------------------------------------------------

    def refresh(self) -> bool:
        """
        L{IUserStore.refresh}: if the generation moved (or there is no copy
        yet), read every virtual hub, user and certificate in one transaction
        and replace the copy; either way the copy counts as checked now.
        """
        def read(conn):
            generation = conn.execute("SELECT n FROM sevpn_generation").fetchone()[0]
            if generation == self._generation and self._copy is not None:
                return generation, None
            hubs = [name for (name,) in conn.execute("SELECT name FROM sevpn_hubs")]
            rows = conn.execute(f"SELECT hub, name, {_USER_COLUMNS} FROM sevpn_users").fetchall()
            certificates: Dict[tuple, list] = {}
            query = f"SELECT hub, user_name, {_CERTIFICATE_COLUMNS} FROM sevpn_certificates ORDER BY added, fingerprint"
            for hub, user, *columns in conn.execute(query):
                certificates.setdefault((hub, user), []).append(columns)
            return generation, (hubs, rows, certificates)

        generation, data = self._transaction(read, "read the users")
        now = self.clock()
        if data is None:
            self._checked = now
            return False
        hubs, rows, certificates = data
        if self._last_seen is not None and generation < self._last_seen:
            self.log.warn(
                "the user database {where} went back from change {old} to change {new}: it was restored from a "
                "backup or replaced; its users are what counts now", where=self.where, old=self._last_seen,
                new=generation,
            )
        self._last_seen = generation
        copy: Dict[str, Dict[str, dict]] = {name: {} for name in hubs}
        for hub, name, *columns in rows:
            record = _record(*columns, certificates.get((hub, name), ()))
            try:
                copy.setdefault(hub, {})[name] = self._checked_record(hub, name, record)
            except StateError as e:  # that user is left out (cannot log in); the others are not held back
                self.log.error("{why}; the user cannot log in until then", why=str(e))
        with self._copy_lock:
            self._copy, self._generation, self._checked = copy, generation, now
        return True

    def _checked_record(self, hub: str, user: str, record: dict) -> dict:
        try:
            UserPolicy.of(record)
        except (TypeError, ValueError) as e:
            raise StateError(f"the user database {self.where} holds a damaged policy for user {user} on virtual "
                             f"hub {hub} ({e}): fix it with 'sevpn hub user set'")
        try:
            record_certificates(record)
        except (TypeError, ValueError) as e:
            raise StateError(f"the user database {self.where} holds a damaged certificate of user {user} on "
                             f"virtual hub {hub} ({e})")
        return record

    def _held(self) -> Dict[str, Dict[str, dict]]:
        copy = self._copy
        if copy is None:
            self.refresh()
            copy = self._copy or {}
        return copy

    def _forget_copy(self) -> None:
        with self._copy_lock:
            self._copy, self._generation = None, None

    def _hold(self, hub: str, user: str, record: Optional[dict]) -> None:
        """Put what a login read into the copy, so the join that follows sees the same."""
        with self._copy_lock:
            if self._copy is None:
                return
            users = dict(self._copy.get(hub, {}))
            if record is None:
                users.pop(user, None)
            else:
                users[user] = record
            self._copy = dict(self._copy, **{hub: users})

    # IUserStore: reading ---------------------------------------------------------

    def describe(self) -> dict:
        now = self.clock()
        down = self._down_since
        return {
            "store": "postgresql",
            "where": self.where,
            "answering": down is None,
            "not_answering_seconds": round(now - down, 1) if down is not None else None,
            "checked_seconds": round(now - self._checked, 1) if self._checked is not None else None,
            "generation": self._generation,
            "outages": self.outages,
        }

    def ensure_default(self) -> None:
        pass  # DEFAULT always exists; its row is made with its first user

    def hubs(self) -> List[str]:
        return sorted(set(self._held()) | {DEFAULT_HUB})

    def exists(self, hub: str) -> bool:
        return hub == DEFAULT_HUB or (wire.valid_name(hub) and hub in self._held())

    def users(self, hub: str) -> Dict[str, dict]:
        if not self.exists(hub):
            raise StateError(f"there is no virtual hub named {hub}")
        return self._held().get(hub, {})

    def authenticate(self, hub: str, user: str, password: bytes) -> Optional[str]:
        return check_login(self._login_record(hub, user), password)

    def certificate_login(self, hub: str, user: str, fingerprint: str) -> Optional[str]:
        """As the file store's: the certificate must be the user's, not revoked, and the user not disabled."""
        record = self._login_record(hub, user)
        cert = record_certificates(record).get(fingerprint) if record is not None else None
        if cert is None or cert.revoked is not None or record.get("disabled"):
            return wire.Refusal.AUTH_FAILED
        return None

    def _login_record(self, hub: str, user: str) -> Optional[dict]:
        """The user's record for a login: the database's, else the copy's by the outage rule."""
        if not (wire.valid_name(hub) and wire.valid_name(user)):
            return None

        def read(conn):
            row = conn.execute(
                f"SELECT h.name, u.name, {', '.join('u.' + c.strip() for c in _USER_COLUMNS.split(','))} "
                "FROM sevpn_hubs h LEFT JOIN sevpn_users u ON u.hub = h.name AND u.name = %s WHERE h.name = %s",
                (user, hub),
            ).fetchone()
            if row is None or row[1] is None:
                return row, ()
            return row, conn.execute(
                f"SELECT {_CERTIFICATE_COLUMNS} FROM sevpn_certificates WHERE hub = %s AND user_name = %s "
                "ORDER BY added, fingerprint", (hub, user)).fetchall()

        try:
            row, certificates = self._transaction(read, "check a login", login=True)
        except Unavailable:
            return self._copied_record(hub, user)
        except StateError as e:
            self.log.error("refused a login of {user} on {hub}: {why}", user=wire.quote(user), hub=hub, why=str(e))
            return None
        if row is None or row[1] is None:
            if row is not None:
                self._hold(hub, user, None)
            return None
        try:
            record = self._checked_record(hub, user, _record(*row[2:], certificates))
        except StateError as e:
            self.log.error("refused a login of {user} on {hub}: {why}", user=wire.quote(user), hub=hub, why=str(e))
            return None
        self._hold(hub, user, record)
        return record

    def _copied_record(self, hub: str, user: str) -> Optional[dict]:
        checked, copy = self._checked, self._copy
        if checked is None or copy is None or self.clock() - checked > self.grace:
            return None
        return copy.get(hub, {}).get(user)

    # IUserStore: changing --------------------------------------------------------

    def create_hub(self, hub: str) -> None:
        check_name("virtual hub", hub)
        self._write(lambda conn: conn.execute(
            "INSERT INTO sevpn_hubs (name) VALUES (%s) ON CONFLICT DO NOTHING", (hub,)))

    def delete_hub(self, hub: str) -> None:
        if hub == DEFAULT_HUB:
            raise StateError("the DEFAULT virtual hub always exists and cannot be deleted")

        def delete(conn):
            if conn.execute("DELETE FROM sevpn_hubs WHERE name = %s", (hub,)).rowcount == 0:
                raise StateError(f"there is no virtual hub named {hub}")

        self._write(delete)

    def _read_record(self, conn: psycopg.Connection, hub: str, user: str, advice: str) -> dict:
        """A user's record inside a change (the generation's lock keeps it as read)."""
        if hub != DEFAULT_HUB and conn.execute("SELECT 1 FROM sevpn_hubs WHERE name = %s", (hub,)).fetchone() is None:
            raise StateError(f"there is no virtual hub named {hub}")
        row = conn.execute(f"SELECT {_USER_COLUMNS} FROM sevpn_users WHERE hub = %s AND name = %s",
                           (hub, user)).fetchone()
        if row is None:
            raise no_such_user(hub, user, advice)
        return _record(*row)

    def _put_record(self, conn: psycopg.Connection, hub: str, user: str, record: dict) -> None:
        conn.execute(f"UPDATE sevpn_users SET ({_USER_COLUMNS}) = (%s, %s, %s, %s) WHERE hub = %s AND name = %s",
                     (*_row(record), hub, user))

    def add_user(self, hub: str, user: str, password: Optional[bytes]) -> bool:
        """
        L{IUserStore.add_user} as one upsert: the password is hashed before the
        transaction (it is the slow part), and a C{None} password keeps the
        user's old one.
        """
        check_name("user", user)
        hashed = hash_password(password) if password is not None else None  # the slow part, before the transaction

        def add(conn):
            if hub == DEFAULT_HUB:
                conn.execute("INSERT INTO sevpn_hubs (name) VALUES (%s) ON CONFLICT DO NOTHING", (hub,))
            elif conn.execute("SELECT 1 FROM sevpn_hubs WHERE name = %s", (hub,)).fetchone() is None:
                raise StateError(f"there is no virtual hub named {hub}")
            # a new password keeps the user's policy, flags and certificates; none keeps the old one
            return conn.execute(
                "INSERT INTO sevpn_users (hub, name, password) VALUES (%s, %s, %s) ON CONFLICT (hub, name) "
                "DO UPDATE SET password = COALESCE(EXCLUDED.password, sevpn_users.password) RETURNING (xmax = 0)",
                (hub, user, hashed),
            ).fetchone()[0]

        return self._write(add)

    def set_user(
        self, hub: str, user: str, password: Optional[bytes] = None, disabled: Optional[bool] = None, **limits: int
    ) -> UserPolicy:
        hashed = hash_password(password) if password is not None else None

        def change(conn):
            record, policy = with_settings(self._read_record(conn, hub, user, "see 'sevpn hub user list'"),
                                           None, disabled, limits)
            if hashed is not None:
                record["password"] = hashed
            self._put_record(conn, hub, user, record)
            return policy

        return self._write(change)

    def delete_user(self, hub: str, user: str) -> None:
        def delete(conn):
            self._read_record(conn, hub, user, "see 'sevpn hub user list'")
            conn.execute("DELETE FROM sevpn_users WHERE hub = %s AND name = %s", (hub, user))

        self._write(delete)

    def set_cascade_user(self, hub: str, user: str, allowed: bool, max_macs: Optional[int] = None) -> None:
        def change(conn):
            record = self._read_record(conn, hub, user, "add it with 'sevpn hub user add'")
            self._put_record(conn, hub, user, with_cascade(record, allowed, max_macs))

        self._write(change)

    def add_certificate(self, hub: str, user: str, certificate: CertificateRecord) -> bool:
        fp = certificate.fingerprint

        def add(conn):
            self._read_record(conn, hub, user, "add it with 'sevpn hub user add'")
            known = conn.execute(
                "SELECT user_name, revoked FROM sevpn_certificates WHERE hub = %s AND fingerprint = %s", (hub, fp),
            ).fetchone()
            if known is not None:
                other, revoked = known
                if revoked is not None:
                    raise StateError(
                        f"the certificate {fp} was revoked on {revoked[:10]} (user {other}): a revoked certificate "
                        f"is never taken back; issue a new one with 'sevpn hub user add {user} --cert'"
                    )
                if other != user:
                    raise StateError(f"the certificate {fp} is already user {other}'s on virtual hub {hub}: "
                                     "a certificate logs in as one user")
                return False
            conn.execute(
                f"INSERT INTO sevpn_certificates (hub, user_name, {_CERTIFICATE_COLUMNS}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (hub, user, fp, certificate.subject, certificate.serial, certificate.not_after, certificate.added,
                 certificate.revoked),
            )
            return True

        return self._write(add)

    def revoke_certificates(self, hub: str, user: str, fingerprint: Optional[str] = None) -> List[str]:
        def revoke(conn):
            self._read_record(conn, hub, user, "see 'sevpn hub user list'")
            certs = conn.execute(
                "SELECT fingerprint, revoked FROM sevpn_certificates WHERE hub = %s AND user_name = %s "
                "ORDER BY added, fingerprint", (hub, user),
            ).fetchall()
            if fingerprint is not None and fingerprint not in {fp for fp, _ in certs}:
                raise StateError(f"user {user} on virtual hub {hub} has no certificate {fingerprint} "
                                 f"(see 'sevpn hub user cert list {user}')")
            done = [fp for fp, revoked in certs if revoked is None and fingerprint in (None, fp)]
            if done:
                conn.execute(
                    "UPDATE sevpn_certificates SET revoked = %s WHERE hub = %s AND user_name = %s "
                    "AND fingerprint = ANY(%s)", (utc_now(), hub, user, done),
                )
            return done

        return self._write(revoke)

    # the running hub -------------------------------------------------------------

    def listener(self) -> psycopg.Connection:
        """A new connection listening on L{CHANNEL} (blocking: run it in a thread)."""
        try:
            conn = self._connect(**self.params, autocommit=True)
            conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as e:
            raise Unavailable(f"cannot listen for changes: the user database {self.where} does not answer "
                              f"({_first_line(e)})")
        return conn

    def watch(self, reactor, changed: Callable[[], None]) -> "UserDatabaseWatcher":
        run = lambda f, *a: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a)  # noqa: E731
        return UserDatabaseWatcher(self, reactor, changed, run, self.poll, reactor)

    def close(self) -> None:
        if self._lock.acquire(timeout=2 * self.timeout + 1):
            try:
                self._drop()
            finally:
                self._lock.release()


@implementer(IReadDescriptor)
class NotifyReader:
    """
    The listening connection's socket, read by the reactor: each read
    takes what arrived (C{PGconn.consume_input}, psycopg's documented
    libpq layer) and reports whether a notification came.  The reactor
    watches a duplicate of the socket's descriptor, which stays valid
    until L{connectionLost} even when libpq closes its own on an error.
    """

    def __init__(self, conn: psycopg.Connection, notified: Callable[[], None], lost: Callable[[], None]) -> None:
        self.conn = conn
        self.notified = notified
        self.lost = lost
        self._fd = os.dup(conn.pgconn.socket)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "user-database"

    def doRead(self):
        """
        Take what arrived; report once however many notifications came.  A
        libpq error means the connection is lost.
        """
        pgconn = self.conn.pgconn
        try:
            pgconn.consume_input()
        except psycopg.Error:
            return main.CONNECTION_LOST
        came = False
        while pgconn.notifies() is not None:
            came = True
        if came:
            self.notified()
        return None

    def connectionLost(self, reason) -> None:
        """Close the duplicate descriptor and the connection, then tell the watcher (which checks again)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        try:
            self.conn.close()
        except psycopg.Error:
            pass
        self.lost()


class UserDatabaseWatcher(Service):
    """
    Keeps a running hub's copy of the users current and tells the hub
    (C{changed()}, in the reactor thread) when they changed: at once on a
    notification, and every C{poll} seconds in any case (which also finds
    when the database answers again).  One check at a time; a request
    during a check runs one more after it.

    @param run: runs a blocking call in a thread, giving a Deferred.
    @param fds: the reactor to read the listening connection in, or None
        to only poll.
    """

    log = Logger()

    def __init__(self, store: PostgresUserStore, clock, changed: Callable[[], None],
                 run: Callable[..., Deferred], poll: float, fds=None) -> None:
        self.store = store
        self.clock = clock
        self.changed = changed
        self.run = run
        self.poll = poll
        self.fds = fds
        self.reader: Optional[NotifyReader] = None
        self.checks = 0
        self._loop: Optional[LoopingCall] = None
        self._checking = False
        self._again = False
        self._listening = False
        self._complaint: Optional[str] = None

    def startService(self) -> None:
        """Poll every C{poll} seconds and start listening for notifications."""
        Service.startService(self)
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(self.poll, now=False)
        self._listen()

    def stopService(self):
        """Stop polling and close the listening connection (without the check its loss would start)."""
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        reader, self.reader = self.reader, None
        if reader is not None:
            self.fds.removeReader(reader)
            reader.lost = lambda: None
            reader.connectionLost(None)

    def check(self) -> None:
        """Read the users again if they changed; tell the hub if they did."""
        if self._checking:
            self._again = True
            return
        self._checking, self._again = True, False
        self.checks += 1
        d = self.run(self.store.refresh)
        d.addCallbacks(self._checked, self._failed)
        d.addBoth(self._done)

    def _checked(self, changed: bool) -> None:
        self._complaint = None
        if not self.running:
            return
        if changed:
            self.changed()
        if self.reader is None:
            self._listen()

    def _failed(self, failure) -> None:
        if not failure.check(StateError):
            self.log.failure("checking the user database for changes failed", failure)
            return
        if failure.check(Unavailable):
            return  # the store said it once
        why = failure.getErrorMessage()
        if why != self._complaint:
            self._complaint = why
            self.log.error("cannot apply the users of the user database: {why}", why=why)

    def _done(self, _) -> None:
        self._checking = False
        if self._again and self.running:
            self.check()

    def _listen(self) -> None:
        if self._listening or self.fds is None or not self.running:
            return
        self._listening = True
        d = self.run(self.store.listener)
        d.addCallbacks(self._listened, self._not_listening)

    def _listened(self, conn: psycopg.Connection) -> None:
        self._listening = False
        if not self.running:
            conn.close()
            return
        self.reader = NotifyReader(conn, self.check, self._lost)
        self.fds.addReader(self.reader)
        self.check()  # what changed while nobody listened

    def _not_listening(self, failure) -> None:
        self._listening = False
        failure.trap(StateError)  # tried again after the next check that works

    def _lost(self) -> None:
        self.reader = None
        if self.running:
            self.check()  # gone with the database? the check finds out (and the store says so once)
