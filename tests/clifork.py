"""``python -m tapnbd ARGS`` for the tests, forked from a process that imported the CLI once.

The suite runs the CLI several hundred times, and each run spends about 0.2 s starting
Python and importing typer before it does anything. Here a server process (started on
first use, one per test process) imports the CLI's entry module once; each call is a
``fork`` of it that takes the caller's argv, environment, working directory and
standard streams, runs the CLI as ``python -m tapnbd`` would, and exits. So every call
is still a process of its own, with its own exit status, output and module state after
start-up; only the interpreter's start-up is shared. The server imports nothing of
tapnbd that reads the environment on import (``check_imports``).

``helpers.run`` sends a call here when it is plain (``cwd`` and ``env`` only); anything
else, and ``TAPNBD_TEST_FORK=0``, takes ``subprocess.run``.
"""

from __future__ import annotations

import array
import contextlib
import locale
import os
import pickle
import selectors
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENABLED = os.environ.get("TAPNBD_TEST_FORK", "1") != "0"
#: tapnbd modules the server may hold: the CLI's entry, which reads no environment.
PRELOADED = ("tapnbd", "tapnbd.cli", "tapnbd.cli.app", "tapnbd.errors", "tapnbd.text")


def check_imports() -> None:
    """The server's tapnbd modules must not have read the environment on import: a
    child would see the server's values, not its caller's."""
    held = sorted(m for m in sys.modules if m == "tapnbd" or m.startswith("tapnbd."))
    extra = set(held) - set(PRELOADED)
    if extra:
        raise RuntimeError(f"the fork server imported more of tapnbd: {sorted(extra)}")


def _child(argv: list[str], cwd: str | None, env: dict[str, str], fds: list[int]) -> None:
    """In the forked child: become ``python -m tapnbd ARGV`` and exit with its status."""
    import atexit
    import runpy
    import traceback

    code: object = 0
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        # Python's stream objects were made for the server's 0-2: new ones for the call's.
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        if cwd is not None:
            os.chdir(cwd)
        sys.path[0] = os.getcwd()  # as ``python -m`` has it (the server's is "")
        os.environ.clear()
        os.environ.update(env)
        sys.argv = ["tapnbd", *argv]
        runpy.run_module("tapnbd", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        import threading

        threading._shutdown()  # type: ignore[attr-defined]  # joins threads, as exit does
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        if code is None:
            status = 0
        elif isinstance(code, int):
            status = code & 0xFF
        else:  # sys.exit("message"), as the interpreter does it
            print(code, file=sys.stderr, flush=True)
            status = 1
        os._exit(status)


def serve(sock_fd: int) -> None:
    """The server's loop: one call at a time, answered with the child's pid (and a
    pidfd), then its wait status."""
    import tapnbd.cli.app  # noqa: F401  (the point: imported once, inherited by forks)

    check_imports()
    sock = socket.socket(fileno=sock_fd)
    while True:
        fds = array.array("i")
        msg, ancdata, _flags, _addr = sock.recvmsg(1 << 20, socket.CMSG_SPACE(3 * fds.itemsize))
        if not msg:
            return  # the test process is gone
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        argv, cwd, env = pickle.loads(msg)
        pid = os.fork()
        if pid == 0:
            sock.close()
            _child(argv, cwd, env, list(fds))
        for fd in fds:
            os.close(fd)
        # With a pidfd, opened before the child can be reaped: the caller's kill at a
        # timeout then never reaches another process that took the pid since.
        pidfd = os.pidfd_open(pid)
        sock.sendmsg(
            [pid.to_bytes(4, "little")],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd]).tobytes())],
        )
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        sock.sendall(status.to_bytes(4, "little"))


class ForkServer:
    """The test process's side: one server, one call at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> socket.socket:
        if self._sock is None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            code = f"import tests.clifork as f; f.serve({theirs.fileno()})"
            self._proc = subprocess.Popen(
                [sys.executable, "-c", code],
                cwd=ROOT,
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
            theirs.close()
            self._sock = ours
        return self._sock

    def run(
        self,
        args: list[str],
        cwd: str | os.PathLike[str] | None,
        env: dict[str, str] | None,
        timeout: float,
    ) -> subprocess.CompletedProcess[str] | None:
        """The call's result, or None when the server is busy with another thread's call."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._call(args, cwd, env, timeout)
        finally:
            self._lock.release()

    def _call(
        self,
        args: list[str],
        cwd: str | os.PathLike[str] | None,
        env: dict[str, str] | None,
        timeout: float,
    ) -> subprocess.CompletedProcess[str]:
        sock = self._start()
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        request = pickle.dumps(
            (
                args,
                None if cwd is None else os.fspath(cwd),
                dict(os.environ if env is None else env),
            )
        )
        stdin = 0 if _valid(0) else os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fds = array.array("i", [stdin, out_w, err_w])
            sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
        finally:
            os.close(out_w)
            os.close(err_w)
            if stdin:
                os.close(stdin)
        pidfd = _pidfd(sock)
        try:
            try:
                out, err = _read_both(out_r, err_r, timeout)
            except subprocess.TimeoutExpired:
                _kill(pidfd)
                _word(sock)
                raise subprocess.TimeoutExpired(["tapnbd", *args], timeout) from None
            finally:
                os.close(out_r)
                os.close(err_r)
            sock.settimeout(timeout)
            try:
                status = _word(sock)
            except TimeoutError:
                _kill(pidfd)
                sock.settimeout(None)
                _word(sock)
                raise subprocess.TimeoutExpired(["tapnbd", *args], timeout) from None
            finally:
                sock.settimeout(None)
        finally:
            os.close(pidfd)
        code = os.waitstatus_to_exitcode(status)
        cmd = [sys.executable, "-m", "tapnbd", *args]
        return subprocess.CompletedProcess(cmd, code, _text(out), _text(err))


def _kill(pidfd: int) -> None:
    """SIGKILL a call's process, which may have exited already (then the server reaps
    it and answers, as after any exit)."""
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def _pidfd(sock: socket.socket) -> int:
    """The server's first answer to a call: a pidfd of the call's process."""
    fds = array.array("i")
    try:
        _msg, ancdata, _flags, _addr = sock.recvmsg(4, socket.CMSG_SPACE(fds.itemsize))
    except ConnectionError:
        ancdata = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if len(fds) != 1:
        raise RuntimeError("the CLI fork server is gone")
    return fds[0]


def _text(data: bytes) -> str:
    """As ``subprocess.run(text=True)`` decodes: the locale's encoding, universal newlines."""
    text = data.decode(locale.getpreferredencoding(False))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _valid(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _word(sock: socket.socket) -> int:
    """One of the server's 4-byte answers (SOCK_SEQPACKET: whole or nothing)."""
    try:
        data = sock.recv(4)
    except ConnectionError:
        data = b""
    if len(data) != 4:
        raise RuntimeError("the CLI fork server is gone")
    return int.from_bytes(data, "little")


def _read_both(out_fd: int, err_fd: int, timeout: float) -> tuple[bytes, bytes]:
    """Both pipes to their ends, as ``subprocess.run(capture_output=True)`` reads them."""
    import time

    got: dict[int, list[bytes]] = {out_fd: [], err_fd: []}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for fd in got:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired("tapnbd", timeout)
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 1 << 16)
                if chunk:
                    got[key.fd].append(chunk)
                else:
                    sel.unregister(key.fd)
    return b"".join(got[out_fd]), b"".join(got[err_fd])


SERVER = ForkServer()
