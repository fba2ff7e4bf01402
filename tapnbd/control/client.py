"""The client the CLI uses: connect to the daemon, starting it (or cleaning up) as needed.

``Client.connect(autostart=True)`` returns a ``Connection`` to a live daemon:

1. If the control socket answers, that is it.
2. If a daemon holds the pidfile lock but does not answer yet, it is starting: wait.
3. Otherwise no daemon runs. If one left traces (a pid in the pidfile, sockets,
   attachments in the state file) it died without cleaning up: say so, and remove its
   sockets while holding the pidfile lock. Attached devices are left alone: their data
   paths outlive the daemon, and the next one re-adopts them.
4. Start a daemon (``python -m tapnbd daemon start --foreground`` in a new session,
   output to its log), wait until it answers, and say where its log is.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from tapnbd import safefs
from tapnbd.control.messages import (
    MAX_LINE,
    ErrorReply,
    Reply,
    Request,
    StatusReply,
    StatusRequest,
    decode,
    encode,
    message_type,
)
from tapnbd.control.state import State, StateDir
from tapnbd.errors import TapnbdError

#: Seconds to wait for a starting daemon to answer.
START_TIMEOUT = 30.0
#: Seconds to wait for a reply (attach and stop may fsync and drain).
REPLY_TIMEOUT = 300.0

R = TypeVar("R", bound=Reply)


class DaemonNotRunning(TapnbdError):
    """No daemon runs for this state directory (and none was started)."""


class Connection:
    """One connection to the control socket: send a request, read its reply."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""

    def request(self, req: Request, timeout: float = REPLY_TIMEOUT) -> Reply:
        """Send ``req``; its reply, or TapnbdError with the daemon's message."""
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(encode(req))
            line = self._readline()
        except TimeoutError:
            raise TapnbdError(
                f"the daemon did not answer {message_type(req)!r} in {timeout:.0f} s"
            ) from None
        except (ConnectionError, BrokenPipeError) as e:
            raise TapnbdError(f"lost the connection to the daemon: {e}") from None
        reply = decode(line, expect=req.REPLY)
        if isinstance(reply, ErrorReply):
            raise TapnbdError(reply.message)
        assert isinstance(reply, Reply)
        return reply

    def call(self, req: Request, reply_type: type[R], timeout: float = REPLY_TIMEOUT) -> R:
        """``request``, typed."""
        reply = self.request(req, timeout)
        assert isinstance(reply, reply_type)
        return reply

    def _readline(self) -> bytes:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the daemon closed the connection")
            self._buf += chunk
            if len(self._buf) > MAX_LINE + 1:
                raise TapnbdError("reply too long")
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """Finds, starts and cleans up after the daemon of one state directory."""

    def __init__(self, state_dir: str, report: Callable[[str], None] | None = None) -> None:
        self.dir = StateDir(state_dir)
        self.report = report or (lambda msg: print(f"tapnbd: {msg}", file=sys.stderr))

    # Connecting.

    def try_connect(self) -> Connection | None:
        """A connection to a daemon that answers, or None."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(START_TIMEOUT)
        try:
            sock.connect(self.dir.control)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None
        except PermissionError:
            sock.close()
            raise TapnbdError(
                f"permission denied on {self.dir.control}: the daemon belongs to another user"
            ) from None
        except OSError:
            sock.close()
            raise
        # The daemon must be ours or root's: never hand requests to an impostor.
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", raw)
        if uid not in (0, os.geteuid()):
            sock.close()
            raise TapnbdError(f"{self.dir.control} belongs to uid {uid}, not to us or root")
        return Connection(sock)

    def connect(self, autostart: bool = True) -> Connection:
        """A connection to the daemon, starting it if ``autostart``."""
        conn = self.try_connect()
        if conn is not None:
            return conn
        if self.dir.daemon_alive():
            return self._wait_ready(None)
        self.recover()
        if not autostart:
            raise DaemonNotRunning(f"the tapnbd daemon is not running (state in {self.dir.path})")
        return self.start()

    def status(self) -> StatusReply | None:
        """The daemon's status, or None when it is not running (after any recovery)."""
        try:
            conn = self.connect(autostart=False)
        except DaemonNotRunning:
            return None
        with conn:
            return conn.call(StatusRequest(), StatusReply)

    def has_attachments(self) -> bool:
        """Whether the state file records attached devices (running without a daemon)."""
        try:
            return bool(self.dir.load().attachments)
        except TapnbdError:
            return False

    # Starting.

    def start(self, args: list[str] | None = None) -> Connection:
        """Start a daemon in the background, wait until it answers, say where its log is."""
        self.dir.create()
        cmd = [sys.executable, "-m", "tapnbd", "daemon", "start", "--foreground"]
        cmd += ["--state-dir", self.dir.path, *(args or [])]
        logfd = self.dir.open_log()
        with open(logfd, "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
                close_fds=True,
                cwd="/",
            )
        conn = self._wait_ready(proc)
        status = conn.call(StatusRequest(), StatusReply)
        self.report(f"started the daemon (pid {status.pid}); its log is {status.log}")
        for note in status.notes:
            self.report(note)
        return conn

    def _wait_ready(self, proc: subprocess.Popen[bytes] | None) -> Connection:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            conn = self.try_connect()
            if conn is not None:
                return conn
            if proc is not None and proc.poll() is not None:
                if self.dir.daemon_alive():  # lost a race with another starter: use theirs
                    proc = None
                    continue
                raise TapnbdError(
                    f"the daemon exited with status {proc.returncode} while starting: "
                    f"{self._log_tail()} (log: {self.dir.log})"
                )
            time.sleep(0.02)
        raise TapnbdError(
            f"the daemon did not answer within {START_TIMEOUT:.0f} s (log: {self.dir.log})"
        )

    def _log_tail(self, lines: int = 3) -> str:
        try:
            with open(safefs.open_private(self.dir.log, os.O_RDONLY), "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
                text = f.read().decode(errors="replace")
        except (OSError, TapnbdError):
            return "(no log)"
        tail = [line for line in text.splitlines() if line.strip()][-lines:]
        return " / ".join(tail) or "(empty log)"

    # Recovering from a daemon that died.

    def recover(self) -> list[str]:
        """If a dead daemon left traces, report it and clean them up. What was done."""
        if not self.dir.check():  # refuses a directory that is not ours alone
            return []
        fd = self.dir.lock(wait=0.5) if os.path.exists(self.dir.pidfile) else None
        if os.path.exists(self.dir.pidfile) and fd is None:
            return []  # a daemon appeared meanwhile
        try:
            pid = self.dir.read_pid()
            try:
                state = self.dir.load()
            except TapnbdError as e:
                self.report(f"ignoring {e}")
                state = State()
            sockets = [
                p
                for p in (self.dir.control, self.dir.nbd_socket, self.dir.attach_socket)
                if os.path.lexists(p)
            ]
            if pid is None and not sockets:
                return []  # stopped cleanly (attachments it left run on their own)
            who = f"the daemon (pid {pid})" if pid else "the daemon"
            self.report(f"{who} is not running: it died without cleaning up; cleaning up")
            notes = []
            if state.attachments:
                # Their data paths run on their own; the next daemon re-adopts them (or
                # undoes the dead ones that nothing uses). Never touched from here.
                n = len(state.attachments)
                notes.append(
                    f"left {n} attached device{'s' if n != 1 else ''} as "
                    f"{'they are' if n != 1 else 'it is'}, for the next daemon to re-adopt"
                )
            removed = self.dir.remove_sockets()
            if removed:
                notes.append(f"removed stale {', '.join(removed)}")
            if fd is not None and pid is not None:
                self.dir.clear_pid(fd)
                notes.append(f"removed stale pid {pid}")
            for note in notes:
                self.report(note)
            return notes
        finally:
            if fd is not None:
                os.close(fd)

    # Stopping.

    def wait_stopped(self, timeout: float = 60.0) -> bool:
        """Wait until the daemon has let go of its pidfile lock (exited)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.dir.daemon_alive():
                return True
            time.sleep(0.02)
        return False
