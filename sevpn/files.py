"""
State-dir files: written atomically, private, and refused when another
user could have planted them.

A state dir (the hub's users and CA, a card's accounts and MAC) decides
who may join a hub and which hub a card trusts, so whoever can write in
it owns the VPN.  The rules, checked by L{StateDir.check} when a hub or
card starts and by every read of a file here:

 - the state dir and everything in it belong to one user (the state
   dir's owner: the user the hub or card runs as) and are writable by
   nobody else; nothing in it is a symbolic link;
 - its parents are not writable by others (unless sticky, as C{/tmp})
   and belong to root or to that user: nobody else could swap it;
 - new directories are 0700, secrets 0600; when root edits a state dir
   that belongs to another user (the C{sevpn} command run as root beside
   a hub running as a service user), what it creates belongs to that
   user too, so that the service can read it and nothing root-owned
   sits where that user's files belong.

Every C{OSError} here becomes a L{StateError} whose message is a sentence
naming the path and what to do.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import stat
import tempfile
from typing import Optional

#: Parents of a state dir that we create are 0755: a service user must be
#: able to reach its own state dir through them.
PARENT_MODE = 0o755
#: Directories inside and the state dir itself.
DIR_MODE = 0o700


class StateError(Exception):
    """A request on the state dir that cannot be done; the message says why."""


class UnsafeState(StateError):
    """Another user could have planted something in the state dir."""


def user_name(uid: int) -> str:
    """A user's name for a message, or C{uid N} when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


_ADVICE = {
    errno.EACCES: "run this as root (or as the owner of the state dir), or pass --state-dir",
    errno.EPERM: "run this as root (or as the owner of the state dir), or pass --state-dir",
    errno.EROFS: "pass --state-dir with a directory on a writable file system",
    errno.ENOSPC: "free some space",
    errno.ENOTDIR: "a part of that path is a file, not a directory; pass --state-dir with a directory",
    errno.ELOOP: "it is a symbolic link, which a state dir must not hold; remove it",
}


def os_error(e: OSError, doing: str, advice: Optional[str] = None) -> StateError:
    """
    One sentence for C{e}: C{"cannot DOING PATH: WHY; WHAT TO DO"}.

    @param doing: what was being done, e.g. C{"write"} or C{"create the
        state dir"}.
    """
    why = (e.strerror or str(e)).lower()
    path = e.filename if e.filename is not None else ""
    text = f"cannot {doing} {path}".rstrip() + f": {why}"
    advice = advice if advice is not None else _ADVICE.get(e.errno)
    return StateError(f"{text}; {advice}" if advice else text)


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _check_entry(path: str, st: os.stat_result, owner: int, what: str = "") -> None:
    """Refuse C{path} (its C{lstat}) if it could have been planted."""
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeState(f"{path} is a symbolic link; a state dir holds no links: remove it")
    if st.st_uid != owner:
        raise UnsafeState(
            f"{path} belongs to {user_name(st.st_uid)}, not to {user_name(owner)} who owns the state dir, "
            f"so another user may have planted it: if you trust it, run 'chown {user_name(owner)} {path}', "
            f"else remove it"
        )
    if st.st_mode & 0o022:
        raise UnsafeState(
            f"{path} is writable by other users (mode {_mode(st)}), who could plant {what or 'files'} there: "
            f"run 'chmod go-w {path}'"
        )


def ensure_dir(path: str, mode: int = DIR_MODE) -> str:
    """
    Make C{path} and its missing parents, each C{mode}.  When run as root,
    each new directory belongs to the owner of the one it is made in.
    """
    missing = []
    head = os.path.abspath(path)
    while True:
        try:
            st = os.stat(head)
        except FileNotFoundError:
            missing.append(head)
            head = os.path.dirname(head)
            continue
        except OSError as e:
            raise os_error(e, "reach")
        if not stat.S_ISDIR(st.st_mode):
            raise StateError(f"{head} is a file, not a directory: it cannot hold {path}")
        break
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            continue  # made meanwhile: it is checked where it matters
        except OSError as e:
            raise os_error(e, "create the directory")
        try:
            os.chmod(directory, mode)  # not narrowed by the umask, nor widened
            if os.geteuid() == 0:
                parent = os.stat(os.path.dirname(directory))
                os.chown(directory, parent.st_uid, parent.st_gid)
        except OSError as e:
            raise os_error(e, "set up the directory")
    return path


def write_private(path: str, data: bytes, mode: int = 0o600) -> None:
    """
    Replace C{path} atomically with C{data}, created with C{mode}.  When
    run as root the file belongs to the owner of its directory.
    """
    directory = os.path.dirname(os.path.abspath(path))
    ensure_dir(directory)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    except OSError as e:
        e.filename = e.filename or directory
        raise os_error(e, "write in")
    try:
        os.fchmod(fd, mode)
        if os.geteuid() == 0:
            st = os.stat(directory)
            os.fchown(fd, st.st_uid, st.st_gid)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            e.filename = path
            raise os_error(e, "write")
        raise


def read_private(path: str, what: str = "") -> Optional[bytes]:
    """
    The content of C{path}, or None if there is none.  Refused (with
    L{UnsafeState}) when it is a link, not a regular file, writable by
    others, or not owned by the owner of its directory.

    @param what: what the file holds, for messages (e.g. C{"users"}).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeState(f"{path} is a symbolic link; a state dir holds no links: remove it")
        raise os_error(e, "read")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeState(f"{path} is not a regular file: remove it")
        _check_entry(path, st, os.stat(os.path.dirname(os.path.abspath(path))).st_uid, what)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    except OSError as e:
        e.filename = e.filename or path
        raise os_error(e, "read")
    finally:
        os.close(fd)


def read_json(path: str, default, what: str = "state"):
    """
    The JSON in C{path} (see L{read_private}), or C{default} if there is
    no such file; a damaged file is a L{StateError} naming it.
    """
    data = read_private(path, what)
    if data is None:
        return default
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise StateError(f"the {what} file {path} is damaged ({e}): restore it from a backup or remove it")


def write_json(path: str, obj, mode: int = 0o600) -> None:
    """
    Replace C{path} atomically with C{obj} as indented JSON (L{write_private};
    private unless C{mode} says otherwise).
    """
    write_private(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)


def _file_in_the_way(path: str) -> Optional[str]:
    """The first part of C{path} that exists and is not a directory, if any."""
    head = os.path.abspath(path)
    parts = []
    while head != os.path.dirname(head):
        parts.append(head)
        head = os.path.dirname(head)
    for part in reversed(parts):
        try:
            if not stat.S_ISDIR(os.stat(part).st_mode):
                return part
        except OSError:
            return None
    return None


def _not_a_directory(path: str) -> StateError:
    blocker = _file_in_the_way(path) or path
    if blocker == path:
        return StateError(f"the state dir {path} is a file, not a directory: pass --state-dir with a directory")
    return StateError(f"{blocker} is a file, not a directory, so the state dir {path} cannot be there: "
                      f"pass --state-dir with a directory")


class StateDir:
    """
    A hub's or card's state directory: making it, requiring it, and
    checking that nobody else could have planted anything in it (see the
    module docstring).

    @param skip: names directly in the state dir that L{check} leaves to
        their owner (the control socket, which L{sevpn.control} replaces
        safely when it is stale).
    """

    def __init__(self, path: str, skip=("control.sock",)) -> None:
        self.path = path
        self.skip = frozenset(skip)

    def join(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def require(self) -> "StateDir":
        """For commands that only read or ask: the state dir must exist."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise StateError(f"there is no state dir {self.path}: pass --state-dir with the right directory")
        except NotADirectoryError:
            raise _not_a_directory(self.path)
        except OSError as e:
            raise os_error(e, "reach the state dir")
        if not stat.S_ISDIR(st.st_mode):
            raise _not_a_directory(self.path)
        return self

    def create(self) -> "StateDir":
        """Make the state dir if it is missing: 0700, owned by whoever runs this; missing parents 0755."""
        try:
            os.stat(self.path)
        except FileNotFoundError:
            parent = os.path.dirname(os.path.abspath(self.path))
            ensure_dir(parent, PARENT_MODE)
            try:
                os.mkdir(self.path, DIR_MODE)
                os.chmod(self.path, DIR_MODE)
            except FileExistsError:
                pass
            except OSError as e:
                raise os_error(e, "create the state dir")
        except NotADirectoryError:
            raise _not_a_directory(self.path)
        except OSError as e:
            raise os_error(e, "reach the state dir")
        return self.require()

    def owner(self) -> int:
        """The user the state dir belongs to."""
        try:
            return os.stat(self.path).st_uid
        except OSError as e:
            raise os_error(e, "reach the state dir")

    def check(self, runner: Optional[int] = None) -> "StateDir":
        """
        Refuse (L{UnsafeState}, a sentence) a state dir in which another
        user could have planted files (the module docstring's rules).

        @param runner: the user the hub or card runs as, who must own the
            state dir; None for the C{sevpn} command, which may be the
            owner or root.
        """
        self.require()
        real = os.path.realpath(self.path)
        try:
            top = os.lstat(real)
            owner = top.st_uid
            if runner is not None and owner != runner:
                raise UnsafeState(
                    f"the state dir {self.path} belongs to {user_name(owner)}, but this runs as "
                    f"{user_name(runner)}: run it as {user_name(owner)}, or give it the state dir with "
                    f"'chown -R {user_name(runner)} {self.path}'"
                )
            if runner is None and os.geteuid() not in (0, owner):
                who = "root" if owner == 0 else f"root or as {user_name(owner)}"
                raise StateError(f"the state dir {self.path} belongs to {user_name(owner)}: run this as {who}")
            if top.st_mode & 0o022:
                raise UnsafeState(
                    f"the state dir {self.path} is writable by other users (mode {_mode(top)}), who could plant "
                    f"users, accounts or certificates there: run 'chmod 700 {self.path}'"
                )
            self._check_parents(real, owner)
            for directory, dirs, files in os.walk(real, onerror=_raise):
                for name in sorted(dirs + files):
                    if directory == real and name in self.skip:
                        continue
                    path = os.path.join(directory, name)
                    _check_entry(path, os.lstat(path), owner)
        except OSError as e:
            raise os_error(e, "check")
        return self

    def _check_parents(self, real: str, owner: int) -> None:
        parent = os.path.dirname(real)
        while True:
            st = os.stat(parent)
            if st.st_uid not in (0, owner):
                raise UnsafeState(
                    f"{parent}, a parent of the state dir {self.path}, belongs to {user_name(st.st_uid)}, "
                    f"who could replace the state dir: move the state dir elsewhere"
                )
            if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
                raise UnsafeState(
                    f"{parent}, a parent of the state dir {self.path}, is writable by every user "
                    f"(mode {_mode(st)}), who could replace the state dir: run 'chmod o-w {parent}'"
                )
            if parent == os.path.dirname(parent):
                return
            parent = os.path.dirname(parent)


def _raise(e: OSError) -> None:
    raise e
