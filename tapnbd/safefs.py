"""Files and directories a privileged process can trust: its own, and nobody else's.

A daemon running as root that opens ``/run/tapnbd/tapnbd.log`` must not be tricked into
appending to ``/etc/shadow`` by a symlink planted there, nor keep its socket in a
directory another user created (and can empty or refill at will). The rules:

- A private directory is made with mkdir at 0700. One that exists must be a real
  directory (not a symlink), owned by us, and writable by nobody else. Every component
  of the path as given (not its realpath) is checked from / down: no directory on the
  way may be replaceable by another user (owned by someone else, or writable by others
  without the sticky bit), and a symlink on the way must be root's or ours, its target
  walked by the same rules; missing parents are made only after that, 0700, each
  checked as it is made.
- A private file is opened with O_NOFOLLOW (a symlink in the last component fails with
  ELOOP), O_CLOEXEC and O_NONBLOCK (a FIFO planted there cannot block the open), then
  checked with fstat on the descriptor itself: a regular file, ours, with one link.
- New files that replace old ones (state, pidfiles) are written under an unpredictable
  temporary name created with O_EXCL, and renamed over: rename(2) replaces a symlink
  at the target, it never follows it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat

from tapnbd.errors import UnsafePathError

__all__ = [
    "UnsafePathError",
    "atomic_write",
    "check_private_dir",
    "check_private_path",
    "ensure_private_dir",
    "open_private",
    "read_capped",
    "remove_pidfile",
    "write_pidfile",
]

#: Longest pidfile we read: a pid and a newline, with room to spare.
MAX_PIDFILE = 64


def _owner_ok(uid: int) -> bool:
    return uid == os.geteuid()


def check_private_dir(path: str, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"{path}: is a symlink, not a directory")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path}: exists and is not a directory")
    if not _owner_ok(st.st_uid):
        raise UnsafePathError(
            f"{path}: belongs to uid {st.st_uid}, not to uid {os.geteuid()}; "
            "remove it or choose another directory"
        )
    if st.st_mode & 0o022:
        raise UnsafePathError(
            f"{path}: is writable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "remove it or chmod it 0700"
        )


#: Symlinks followed in one path before giving up, as the kernel's ELOOP limit.
MAX_SYMLINKS = 40


def _check_parent(path: str, component: str, st: os.stat_result) -> None:
    """Refuse a directory on the way to ``path`` that another user could rename or refill.

    A directory is safe when root or we own it and it is not writable by others, or when
    it is sticky (like /tmp): there only an entry's owner may rename or remove it.
    """
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path}: its parent {component} is not a directory")
    foreign = st.st_uid not in (0, os.geteuid())
    open_to_others = bool(st.st_mode & 0o022) and not st.st_mode & stat.S_ISVTX
    if foreign or open_to_others:
        why = f"belongs to uid {st.st_uid}" if foreign else "is writable by others"
        raise UnsafePathError(f"{path}: its parent {component} {why}, so it could be swapped")


def _walk_parents(path: str, names: list[str], *, create: bool) -> str | None:
    """Follow ``names`` from / as the kernel would, checking every step; the directory
    they lead to, with no symlink in it.

    Every directory passed through must be safe (``_check_parent``), and a symlink may
    only be followed if root or we own it: it sits in a directory already checked, so no
    one else can replace it, and its target is walked by the same rules. A missing
    directory is made (mkdir 0700) if ``create``, and checked as it is made; otherwise
    None is returned.
    """
    current = "/"
    _check_parent(path, current, os.lstat(current))
    pending = list(names)
    followed = 0
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":  # ``current`` holds no symlink: its parent is a checked prefix
            current = os.path.dirname(current)
            continue
        component = os.path.join(current, name)
        try:
            st = os.lstat(component)
        except FileNotFoundError:
            if not create:
                return None
            with contextlib.suppress(FileExistsError):  # made meanwhile: checked below
                os.mkdir(component, 0o700)
            st = os.lstat(component)
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (0, os.geteuid()):
                raise UnsafePathError(
                    f"{path}: its parent {component} is a symlink belonging to uid "
                    f"{st.st_uid}, so it could be pointed elsewhere"
                )
            followed += 1
            if followed > MAX_SYMLINKS:
                raise UnsafePathError(f"{path}: too many levels of symlinks at {component}")
            target = os.readlink(component)
            if target.startswith("/"):
                current = "/"
            pending[:0] = target.split("/")
            continue
        _check_parent(path, component, st)
        current = component
    return current


def _split(path: str) -> tuple[list[str], str]:
    """The directories leading to ``path`` (absolute, but not resolved) and its name."""
    full = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    names = full.rstrip("/").split("/")
    return names[:-1], names[-1]


def ensure_private_dir(path: str) -> None:
    """Make ``path`` a directory only we can change (mkdir 0700), or refuse it.

    Every component of the path as given is checked from / down before anything is
    made, and missing parents are made one at a time (mkdir 0700) and checked in turn.
    """
    parents, name = _split(path)
    if name in ("", ".", ".."):
        raise UnsafePathError(f"{path}: does not name a directory to make")
    parent = _walk_parents(path, parents, create=True)
    if parent is None:  # never: create=True makes what is missing
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    full = os.path.join(parent, name)
    try:
        os.mkdir(full, 0o700)
    except FileExistsError:
        pass
    check_private_dir(path, os.lstat(full))


def check_private_path(path: str) -> bool:
    """Whether ``path`` exists; UnsafePathError if it is not a directory of ours alone or
    any component on the way to it is unsafe (as ``ensure_private_dir``, making nothing)."""
    parents, name = _split(path)
    if name in ("", ".", ".."):
        raise UnsafePathError(f"{path}: does not name a directory")
    parent = _walk_parents(path, parents, create=False)
    if parent is None:
        return False
    try:
        st = os.lstat(os.path.join(parent, name))
    except FileNotFoundError:
        return False
    check_private_dir(path, st)
    return True


def _check_private_file(path: str, fd: int) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{path}: is not a regular file")
    if not _owner_ok(st.st_uid):
        raise UnsafePathError(f"{path}: belongs to uid {st.st_uid}, not to uid {os.geteuid()}")
    # A second name for the file may have been made by someone who can write elsewhere
    # (a hard link to a file of ours); writing through it would write there too.
    if st.st_nlink != 1:
        raise UnsafePathError(f"{path}: has {st.st_nlink} hard links, expected 1")


def open_private(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that refuses symlinks, FIFOs, devices and other users' files.

    Returns a blocking, close-on-exec descriptor to a regular file of ours.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePathError(f"{path}: is a symlink") from None
        if e.errno == errno.ENXIO:  # O_WRONLY|O_NONBLOCK on a FIFO without a reader
            raise UnsafePathError(f"{path}: is not a regular file") from None
        raise
    try:
        _check_private_file(path, fd)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_capped(path: str, limit: int) -> bytes:
    """The contents of a private file of at most ``limit`` bytes; UnsafePathError if
    it is larger (the file may grow while we read, so the cap is on what is read)."""
    fd = open_private(path, os.O_RDONLY)
    try:
        chunks = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise UnsafePathError(f"{path}: larger than {limit} bytes")
    return data


def _fsync_dir(path: str) -> None:
    dirfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` (it must not exist, even as a symlink), write, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` all at once: a temporary file with an unpredictable
    name in the same directory, fsync, rename over, fsync the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    try:
        _write_new(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read_pid(path: str) -> int | None:
    """The pid in a pidfile of ours; None if it holds no pid."""
    text = read_capped(path, MAX_PIDFILE).decode("ascii", errors="replace").strip()
    return int(text) if text.isdigit() and 0 < int(text) < 1 << 22 else None


def write_pidfile(path: str) -> None:
    """Create ``path`` holding our pid. A stale pidfile of ours (its pid is dead) is
    replaced; anything else there (a live pid, garbage, a symlink, another user's
    file) is refused with UnsafePathError."""
    data = f"{os.getpid()}\n".encode()
    try:
        _write_new(path, data, 0o644)
        return
    except FileExistsError:
        pass
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePathError(f"{path}: is a symlink") from None
        raise
    pid = _read_pid(path)  # refuses symlinks and files not ours
    if pid is None:
        raise UnsafePathError(f"{path}: exists and holds no pid; not replacing it")
    if pid == os.getpid() or _pid_alive(pid):
        raise UnsafePathError(f"{path}: pid {pid} is running; not replacing its pidfile")
    # Stale: rename a fresh file over it, so the pidfile is never missing or half written.
    atomic_write(path, data, 0o644)


def remove_pidfile(path: str) -> bool:
    """Remove ``path`` if it is a pidfile of ours holding our pid; whether it was."""
    try:
        pid = _read_pid(path)
    except (OSError, UnsafePathError):
        return False
    if pid != os.getpid():
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True
