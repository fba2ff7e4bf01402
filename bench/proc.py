"""Child processes, readiness waits and the small system chores the benchmarks need.

Every long-lived child (servers, nbdfuse) is started in its own session, so that a Ctrl-C
in the terminal reaches only the harness, which then tears things down in order (umount,
detach, unmount FUSE, stop the server). Each child also gets PR_SET_PDEATHSIG, so that it
goes away with the harness even if the harness is killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1
NBD_MAGIC = b"NBDMAGIC"


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and why."""


class Unavailable(BenchError):
    """A row cannot run on this machine (a tool or a feature is missing)."""


def _child_setup() -> None:  # pragma: no cover - runs in the child
    os.setsid()
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def tail(path: Path, lines: int = 12) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def spawn(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    log: Path,
    stdout: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-lived child; its stderr (and stdout, unless redirected) goes to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as err:
        out = open(stdout, "wb") if stdout is not None else err  # noqa: SIM115
        try:
            return subprocess.Popen(
                [os.fspath(c) for c in cmd],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                preexec_fn=_child_setup,
            )
        finally:
            if stdout is not None:
                out.close()


def stop(proc: subprocess.Popen[bytes], *, timeout: float = 15.0) -> int | None:
    """SIGTERM a child and wait for it; SIGKILL it if it does not exit in time."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)
    return proc.returncode


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def stop_pid(pid: int, *, timeout: float = 15.0) -> None:
    """SIGTERM a process that is not our child (a daemon), then SIGKILL it if it lingers."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    what: str,
    timeout: float = 600.0,
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run a command to completion and return its stdout; raise BenchError on failure."""
    argv = [os.fspath(c) for c in cmd]
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{what}: timed out after {timeout:.0f} s: {' '.join(argv)}") from e
    except FileNotFoundError as e:
        raise Unavailable(f"{what}: {argv[0]} is not installed") from e
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"$ {' '.join(argv)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        raise BenchError(
            f"{what}: exit status {proc.returncode}: {' '.join(argv)}\n" + "\n".join(detail)
        )
    return proc.stdout


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def nbd_greets(address: tuple[str, int] | str, timeout: float = 1.0) -> bool:
    """Connect, read the server's first 8 bytes and hang up: True if they are NBDMAGIC."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(address)
            data = b""
            while len(data) < len(NBD_MAGIC):
                chunk = s.recv(len(NBD_MAGIC) - len(data))
                if not chunk:
                    break
                data += chunk
            return data == NBD_MAGIC
    except OSError:
        return False


def wait_until(
    ready: Callable[[], bool],
    *,
    what: str,
    timeout: float = 30.0,
    alive: Callable[[], bool] | None = None,
    log: Path | None = None,
    interval: float = 0.05,
) -> None:
    """Poll ``ready()`` until it is true; fail early if ``alive()`` turns false."""
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        if alive is not None and not alive():
            detail = f"\n{tail(log)}" if log is not None else ""
            raise BenchError(f"{what}: the process exited before it was ready{detail}")
        if time.monotonic() > deadline:
            detail = f"\n{tail(log)}" if log is not None else ""
            raise BenchError(f"{what}: not ready after {timeout:.0f} s{detail}")
        time.sleep(interval)


def tapnbd_command() -> list[str]:
    """How to run this checkout's tapnbd: the script beside our interpreter, else PATH."""
    beside = Path(sys.executable).with_name("tapnbd")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("tapnbd")
    if found:
        return [found]
    return [sys.executable, "-m", "tapnbd"]


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def is_root() -> bool:
    return os.geteuid() == 0


def drop_caches() -> str:
    """sync, then drop the page cache if we may; say what was done."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"sync only (drop_caches not permitted: {e.strerror})"
    return "sync + drop_caches"


def warm(path: Path, chunk: int = 8 << 20) -> None:
    """Read a file once so that it is in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(chunk):
            pass


def ready_for(path: Path, writes: bool) -> None:
    """Put an image's page cache in the state a cell measures servers from.

    First its dirty pages are written back (outside the cell's timing): a cell that
    starts with an earlier cell's dirty pages meets their writeback, since a write to a
    page under writeback waits for it, and that stall lands on whichever server runs
    then. Reads are then measured from a warm cache. Writes start with the pages
    dropped: on this kernel, pages cached by big reads (readahead) or big writes sit in
    large folios, and ext4 walks every block of the folio on each 4k write into it
    (``ext4_block_write_begin`` took 65 % of the server's CPU in such a cell). Every
    server then ran 4k random writes at about 11k IOPS, against 40-60k from dropped
    pages, so the cell measured ext4 and not the server.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        if writes:  # clean now, so all of them can go
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if not writes:
        warm(path)


@contextlib.contextmanager
def cleanup_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt, so that every ``finally`` runs."""

    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def cpu_seconds(pid: int) -> float:
    """CPU time (user+system, including reaped children) of a process and its live children."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == pid:
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    pids.append(int(entry.name))
    for p in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            # fields[11..14] are utime, stime, cutime, cstime (stat fields 14-17)
            total += sum(int(x) for x in fields[11:15]) / tick
    return total
