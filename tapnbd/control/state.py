"""The state directory: where the daemon keeps its socket, pidfile, log and state file.

One directory (default ``/run/tapnbd``; ``--state-dir`` or ``TAPNBD_STATE_DIR``) holds::

    control.sock   the control socket, mode 0600
    nbd.sock       NBD for clients on this host (``nbd+unix:///NAME?socket=...``)
    attach.sock    NBD for the daemon's own attachments, so they are told from clients
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
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from tapnbd.control.attach import Attachment
from tapnbd.errors import TapnbdError

STATE_VERSION = 1
#: AF_UNIX paths are limited to 108 bytes including the NUL (sun_path).
MAX_SOCKET_PATH = 107


def default_state_dir() -> str:
    """``$TAPNBD_STATE_DIR``, else /run/tapnbd (root) or $XDG_RUNTIME_DIR/tapnbd."""
    env = os.environ.get("TAPNBD_STATE_DIR")
    if env:
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if os.geteuid() != 0 and runtime:
        return os.path.join(runtime, "tapnbd")
    return "/run/tapnbd"


@dataclass
class ExportEntry:
    """An export as the state file records it: enough to open it again."""

    name: str
    image: str
    format: str
    read_only: bool
    origin: Literal["export", "attach"] = "export"


@dataclass
class State:
    exports: list[ExportEntry] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)


class StateDir:
    """Paths in the state directory, the state file and the pidfile lock."""

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
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        for sock in (self.control, self.nbd_socket, self.attach_socket):
            if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
                raise TapnbdError(
                    f"state directory {self.path} is too long for a unix socket path "
                    f"({len(os.fsencode(sock))} > {MAX_SOCKET_PATH} bytes); use a shorter one"
                )

    # The state file.

    def load(self) -> State:
        try:
            with open(self.state) as f:
                obj = json.load(f)
        except FileNotFoundError:
            return State()
        except (OSError, ValueError) as e:
            raise TapnbdError(f"{self.state}: unreadable state file: {e}") from None
        if not isinstance(obj, dict) or obj.get("version") != STATE_VERSION:
            raise TapnbdError(f"{self.state}: not a version {STATE_VERSION} state file")
        try:
            exports = [ExportEntry(**e) for e in obj.get("exports", [])]
            attachments = [Attachment.from_json(a) for a in obj.get("attachments", [])]
        except TypeError as e:
            raise TapnbdError(f"{self.state}: malformed state file: {e}") from None
        return State(exports, attachments)

    def save(self, state: State) -> None:
        """Write the state file atomically: a temporary file, fsync, rename, fsync dir."""
        obj: dict[str, Any] = {
            "version": STATE_VERSION,
            "exports": [vars(e) for e in state.exports],
            "attachments": [a.to_json() for a in state.attachments],
        }
        tmp = f"{self.state}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state)
        dirfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    # The pidfile.

    def lock(self, wait: float = 2.0) -> int | None:
        """Take the pidfile lock; the fd to keep, or None if a daemon holds it.

        Retries for ``wait`` seconds: a client probing the lock holds it for an instant.
        """
        fd = os.open(self.pidfile, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
            with open(self.pidfile) as f:
                text = f.read().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def daemon_alive(self) -> bool:
        """Whether a daemon holds the pidfile lock."""
        try:
            fd = os.open(self.pidfile, os.O_RDONLY | os.O_CLOEXEC)
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
        """Remove sockets a dead daemon left; returns their names."""
        gone = []
        for path in (self.control, self.nbd_socket, self.attach_socket):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                gone.append(os.path.basename(path))
        return gone
