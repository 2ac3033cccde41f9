"""
`make install-system` staged under a temporary DESTDIR, made once per test
process and shared by the tests that need the installed layout
(L{tests.test_units}, L{tests.test_deploy}).  The real /opt, /usr/local
and /etc are not touched; the staging root is removed when the process
ends.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from typing import Optional

from scripts.netns import REPO

#: Where the Makefile puts the venv (its PREFIX), and what the units name.
PREFIX = "/opt/sevpn"
#: The Python the Makefile makes the venv with (its SYSTEM_PYTHON).
SYSTEM_PYTHON = "/usr/bin/python3"


def staging_unavailable() -> Optional[str]:
    """Why `make install-system` cannot run here, or None."""
    if shutil.which("make") is None:
        return "make is not installed"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"make install-system makes its venv with Debian's {SYSTEM_PYTHON}, which this machine lacks"
    return None


def make(target: str, destdir: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", REPO, target, f"DESTDIR={destdir}", *extra],
        capture_output=True, text=True, timeout=900,
    )


class Staged:
    """One `make install-system DESTDIR=...` per process, shared by the tests."""

    _instance: Optional["Staged"] = None

    @classmethod
    def get(cls) -> "Staged":
        """
        The staged installation.

        @raise AssertionError: if `make install-system` failed (its output).
        """
        if cls._instance is None:
            cls._instance = cls()
        if cls._instance.error:
            raise AssertionError(cls._instance.error)
        return cls._instance

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="dp-units-")
        atexit.register(shutil.rmtree, self.root, True)
        result = make("install-system", self.root)
        self.output = result.stdout + result.stderr
        self.error = None if result.returncode == 0 else f"make install-system failed:\n{self.output[-3000:]}"

    def path(self, *parts: str) -> str:
        """C{parts}, an installed path, under the staging root."""
        return os.path.join(self.root, *(p.lstrip("/") for p in parts))

    def unit(self, name: str) -> str:
        return self.path("/etc/systemd/system", name)
