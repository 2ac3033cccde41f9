"""
State-dir files: written atomically, secrets readable by root only.
"""

from __future__ import annotations

import json
import os
import tempfile


def ensure_dir(path: str, mode: int = 0o700) -> str:
    os.makedirs(path, mode=mode, exist_ok=True)
    return path


def write_private(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace C{path} atomically with C{data}, created with C{mode}."""
    directory = os.path.dirname(os.path.abspath(path))
    ensure_dir(directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_json(path: str, default):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return default


def write_json(path: str, obj, mode: int = 0o600) -> None:
    write_private(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)
