"""
A throwaway PostgreSQL cluster for the tests: Debian's server binaries
(C{/usr/lib/postgresql/VERSION/bin}), a data directory and a Unix socket
in a temporary directory, run as the user C{postgres} when the tests run
as root (the server refuses root), trust authentication on the socket
only.  One cluster is shared by a test process (L{shared}; each test takes
a fresh database); tests that stop their database make their own.
Stopped and removed when the process exits, also after failures.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from typing import List, Optional

from twisted.trial.unittest import SkipTest


def binaries() -> Optional[str]:
    """The newest installed server's bin directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(found[-1]) if found else None


def why_not() -> Optional[str]:
    """Why no cluster can run here (a skip reason), or None."""
    if binaries() is None:
        return "PostgreSQL's server is not installed (apt-get install postgresql: initdb and pg_ctl)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "there is no user postgres to run PostgreSQL's server as (it refuses to run as root)"
    try:
        import psycopg  # noqa: F401
    except ImportError as e:
        return f"the Python package psycopg is not installed ({e})"
    return None


class Cluster:
    """One PostgreSQL server in a temporary directory."""

    def __init__(self) -> None:
        reason = why_not()
        if reason:
            raise SkipTest(reason)
        self.bin = binaries()
        self.dir = tempfile.mkdtemp(prefix="sevpn-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "server.log")
        self.running = False
        self._databases = 0
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        else:
            self._as = []
        os.chmod(self.dir, 0o755)
        atexit.register(self.destroy)
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(self._as + [os.path.join(self.bin, tool), *args], capture_output=True, text=True,
                                timeout=120)
        if result.returncode:
            tail = ""
            if os.path.exists(self.log):
                with open(self.log) as f:
                    tail = f.read()[-2000:]
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.strip()}\n{tail}")

    def start(self) -> None:
        if self.running:
            return
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o",
                  f"-k {self.dir} -c listen_addresses='' -F -c max_connections=200", "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        if self.running:
            self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")
            self.running = False

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except (RuntimeError, subprocess.SubprocessError, OSError):
            pass
        shutil.rmtree(self.dir, True)

    def url(self, database: str = "postgres") -> str:
        """A URL for the database: the socket in the cluster's directory, user postgres, no password."""
        return f"postgresql://postgres@/{database}?host={self.dir}"

    def sql(self, statement: str, database: str = "postgres") -> List[tuple]:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            cursor = conn.execute(statement)
            return cursor.fetchall() if cursor.description else []

    def database(self, testcase) -> str:
        """A fresh database for C{testcase} (dropped after it): its name (L{url} makes its URL)."""
        self._databases += 1
        name = f"t{os.getpid()}_{self._databases}"
        self.sql(f"CREATE DATABASE {name}")
        testcase.addCleanup(self._drop, name)
        return name

    def _drop(self, name: str) -> None:
        if self.running:
            self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


_shared: Optional[Cluster] = None


def shared() -> Cluster:
    """The test process's cluster, started at the first call (raises SkipTest where none can run)."""
    global _shared
    if _shared is None:
        _shared = Cluster()
        _shared.start()
    elif not _shared.running:
        _shared.start()
    return _shared
