"""The state directory: where the daemon keeps its socket, pidfile, log and state file.

One directory (default ``/run/tapnbd``; ``--state-dir`` or ``TAPNBD_STATE_DIR``), mode
0700 and refused if it is not ours alone (``tapnbd.safefs``), holds::

    control.sock   the control socket, mode 0600
    nbd.sock       NBD for the owner's clients on this host, mode 0600 and SO_PEERCRED
                   checked (``nbd+unix:///NAME?socket=...``)
    attach.sock    left by older daemons (their attachments' NBD); removed if stale
    tapnbd.pid     the pidfile, locked with flock(2) for as long as the daemon lives
    tapnbd.log     the daemon's log
    state.json     exports and attachments, rewritten atomically on every change
    attach/        nbdfuse mount points, one per attached export

The pidfile lock is what says whether a daemon lives (blktapctrl kept a lock-checked
pidfile too): a pid can be reused and a process killed with SIGKILL leaves its files,
but the kernel drops its locks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time

import msgspec

from tapnbd import safefs
from tapnbd.control.messages import Attachment, ExportRecord, MessageError, decode_as
from tapnbd.errors import TapnbdError, UnsafePathError

STATE_VERSION = 1
#: AF_UNIX paths are limited to 108 bytes including the NUL (sun_path).
MAX_SOCKET_PATH = 107
#: The largest state file read back (thousands of exports fit); a bigger one is not ours.
MAX_STATE = 16 << 20


def default_state_dir() -> str:
    """``$TAPNBD_STATE_DIR``, else /run/tapnbd (root) or $XDG_RUNTIME_DIR/tapnbd."""
    env = os.environ.get("TAPNBD_STATE_DIR")
    if env:
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if os.geteuid() != 0 and runtime:
        return os.path.join(runtime, "tapnbd")
    return "/run/tapnbd"


class State(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The state file: the same records the control messages carry."""

    version: int = STATE_VERSION
    exports: list[ExportRecord] = []
    attachments: list[Attachment] = []


class StateDir:
    """Paths in the state directory, the state file and the pidfile lock.

    Every file here is opened through ``tapnbd.safefs``: the directory is ours alone
    (0700, refused if another user made it or others can write it) and no name in it is
    followed if it is a symlink.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.control = os.path.join(self.path, "control.sock")
        self.nbd_socket = os.path.join(self.path, "nbd.sock")
        self.attach_socket = os.path.join(self.path, "attach.sock")
        self.pidfile = os.path.join(self.path, "tapnbd.pid")
        self.log = os.path.join(self.path, "tapnbd.log")
        self.state = os.path.join(self.path, "state.json")
        self.run_dir = os.path.join(self.path, "attach")

    def create(self) -> None:
        """Make (or check) the directory and its ``attach/``; UnsafePathError if either is
        not ours alone."""
        # A tapdisk's sockets are the deepest: tapdisk/ID/ctl.sock (attachments.py).
        deepest = os.path.join(self.path, "tapdisk", "9" * 10, "ctl.sock")
        for sock in (self.control, self.nbd_socket, self.attach_socket, deepest):
            if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
                raise TapnbdError(
                    f"state directory {self.path} is too long for a unix socket path "
                    f"({len(os.fsencode(sock))} > {MAX_SOCKET_PATH} bytes); use a shorter one"
                )
        safefs.ensure_private_dir(self.path)
        safefs.ensure_private_dir(self.run_dir)

    def check(self) -> bool:
        """Whether the directory exists; UnsafePathError if it does and is not ours alone
        (a client must not trust, or start a daemon in, someone else's directory), or if
        any directory or symlink on the way to it could be swapped by another user."""
        return safefs.check_private_path(self.path)

    def open_log(self) -> int:
        """The log, opened for appending (never through a symlink)."""
        return safefs.open_private(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    # The state file.

    def load(self) -> State:
        try:
            data = safefs.read_capped(self.state, MAX_STATE)
        except FileNotFoundError:
            return State()
        except UnsafePathError as e:
            raise TapnbdError(f"refusing the state file: {e}") from None
        except OSError as e:
            raise TapnbdError(f"{self.state}: unreadable state file: {e}") from None
        try:
            state: State = decode_as(data, State, self.state)
        except MessageError as e:
            raise TapnbdError(f"malformed state file {e}") from None
        if state.version != STATE_VERSION:
            raise TapnbdError(f"{self.state}: not a version {STATE_VERSION} state file")
        return state

    def save(self, state: State) -> None:
        """Write the state file atomically: an unpredictably named temporary file,
        fsync, rename, fsync dir."""
        data = msgspec.json.format(msgspec.json.encode(state), indent=2) + b"\n"
        safefs.atomic_write(self.state, data)

    # The pidfile.

    def lock(self, wait: float = 2.0) -> int | None:
        """Take the pidfile lock; the fd to keep, or None if a daemon holds it.

        Retries for ``wait`` seconds: a client probing the lock holds it for an instant.
        """
        fd = safefs.open_private(self.pidfile, os.O_RDWR | os.O_CREAT)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(0.02)

    def write_pid(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def read_pid(self) -> int | None:
        try:
            text = safefs.read_capped(self.pidfile, safefs.MAX_PIDFILE).decode(errors="replace")
        except (OSError, UnsafePathError):
            return None
        text = text.strip()
        return int(text) if text.isdigit() else None

    def daemon_alive(self) -> bool:
        """Whether a daemon holds the pidfile lock."""
        try:
            fd = safefs.open_private(self.pidfile, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        finally:
            os.close(fd)  # also drops our shared lock at once
        return False

    def clear_pid(self, fd: int) -> None:
        """Empty the pidfile (held locked by ``fd``); it is never unlinked, so that every
        process locks the same inode."""
        os.ftruncate(fd, 0)

    def remove_sockets(self) -> list[str]:
        """Remove sockets a dead daemon left; returns their names. Anything else at
        those names (a symlink to someone's socket, a file) was not left by a daemon:
        UnsafePathError."""
        gone = []
        for path in (self.control, self.nbd_socket, self.attach_socket):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISSOCK(st.st_mode):
                what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a socket"
                raise UnsafePathError(f"{path}: is {what}; remove it if you put it there")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                gone.append(os.path.basename(path))
        return gone
