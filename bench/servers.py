"""Start and stop each NBD server under test, serving a given image, and hand back its URI.

One place knows how to run every server: tapnbd (raw and qcow), qemu-nbd (``-f raw`` and
``-f qcow``), nbdkit's file plugin and nbd-server. Each is started on a free TCP port on
127.0.0.1 (or on a unix socket), waited for until it sends the NBD greeting, and stopped
with SIGTERM when the ``with`` block ends, whatever happens inside it. The export name is
always the image's file name, so every URI has the same shape.

The peers run the way ../shared/bench/peers.md ran them, which is their defaults:

- ``qemu-nbd -f FMT -t -x NAME`` with the default ``--shared=1``: one client at a time,
  and so no multi-conn (``--qemu-shared N`` turns on multi-conn for N clients); for
  qcow2 with ``--cache=writeback --aio=threads`` too, as issue 13 measured it;
- ``nbdkit file file=IMAGE``: its default thread pool, multi-conn advertised;
- ``nbd-server`` from a generated config (with ``allowlist = true`` so that LIST works),
  daemonised, one process per client, multi-conn advertised.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bench.proc import (
    BenchError,
    Unavailable,
    free_port,
    have,
    nbd_greets,
    pid_alive,
    spawn,
    stop,
    stop_pid,
    tail,
    tapnbd_command,
    wait_until,
)

Transport = Literal["tcp", "unix"]
HOST = "127.0.0.1"
READY_TIMEOUT = 30.0


@dataclass(frozen=True)
class ServerKind:
    key: str
    label: str
    formats: tuple[str, ...]
    tool: str
    peer: bool


#: The window of the tapnbd-poll rows, in µs: about one round trip of a 4 KiB READ.
POLL_US = 50

SERVERS: dict[str, ServerKind] = {
    k.key: k
    for k in (
        ServerKind("tapnbd", "tapnbd", ("raw", "qcow", "qcow2", "vhd"), "tapnbd", peer=False),
        # The same server with TAPNBD_STATS=off: what counting costs (issue 15).
        ServerKind("tapnbd-nostats", "tapnbd, statistics off", ("raw",), "tapnbd", peer=False),
        # The same server polling for the next request (serve --poll-us, session 24).
        ServerKind("tapnbd-poll", f"tapnbd, --poll-us {POLL_US}", ("raw",), "tapnbd", peer=False),
        ServerKind("qemu-nbd", "qemu-nbd", ("raw", "qcow", "qcow2", "vhd"), "qemu-nbd", peer=True),
        ServerKind("nbdkit", "nbdkit file", ("raw",), "nbdkit", peer=True),
        ServerKind("nbd-server", "nbd-server", ("raw",), "nbd-server", peer=True),
    )
}


@dataclass(frozen=True)
class ServerOptions:
    #: qemu-nbd --shared (-e): 1 is plain qemu-nbd (one client, no multi-conn).
    qemu_shared: int = 1


@dataclass
class Served:
    """A running server: where to reach it and how it was started."""

    kind: ServerKind
    image: Path
    fmt: str
    uri: str
    pid: int
    command: list[str]
    log: Path
    extra: dict[str, str] = field(default_factory=dict)


_counter = itertools.count(1)


def unavailable_reason(key: str, fmt: str) -> str | None:
    """Why server ``key`` cannot serve format ``fmt`` here, or None if it can."""
    kind = SERVERS[key]
    if fmt not in kind.formats:
        return f"{kind.label} does not serve {fmt}"
    if kind.tool != "tapnbd" and not have(kind.tool):
        return f"{kind.tool} is not installed"
    return None


def tcp_uri(port: int, name: str) -> str:
    return f"nbd://{HOST}:{port}/{urllib.parse.quote(name)}"


def unix_uri(sock: Path, name: str) -> str:
    return f"nbd+unix:///{urllib.parse.quote(name)}?socket={sock}"


@contextlib.contextmanager
def serve(
    key: str,
    image: Path,
    fmt: str,
    *,
    logdir: Path,
    transport: Transport = "tcp",
    options: ServerOptions | None = None,
) -> Iterator[Served]:
    """Serve ``image`` (format ``fmt``) with server ``key``; stop it when the block ends."""
    why = unavailable_reason(key, fmt)
    if why:
        raise Unavailable(why)
    options = options or ServerOptions()
    image = image.resolve()
    n = next(_counter)
    log = logdir / f"{key}-{n}.log"
    starter = _STARTERS[key]
    attempts = 3 if transport == "tcp" and SERVERS[key].tool != "tapnbd" else 1
    for attempt in range(attempts):
        try:
            served, stopper = starter(image, fmt, logdir, log, n, transport, options)
            break
        except BenchError:
            if attempt == attempts - 1:
                raise
            # most likely a port race: another process took our free port; try another
    try:
        yield served
    finally:
        stopper()


_Stopper = Callable[[], None]
_Started = tuple[Served, _Stopper]


def _watch(proc: subprocess.Popen[bytes], what: str, log: Path, ready: Callable[[], bool]) -> None:
    try:
        wait_until(
            ready, what=what, timeout=READY_TIMEOUT, alive=lambda: proc.poll() is None, log=log
        )
    except BaseException:
        stop(proc)
        raise


def _address(transport: Transport, logdir: Path, n: int) -> tuple[int, Path]:
    if transport == "tcp":
        return free_port(HOST), Path()
    sock = logdir / f"nbd-{n}.sock"
    sock.unlink(missing_ok=True)
    return 0, sock


def _greets(transport: Transport, port: int, sock: Path) -> Callable[[], bool]:
    if transport == "tcp":
        return lambda: nbd_greets((HOST, port))
    return lambda: sock.exists() and nbd_greets(str(sock))


def _start_tapnbd(
    image: Path,
    fmt: str,
    logdir: Path,
    log: Path,
    n: int,
    transport: Transport,
    options: ServerOptions,
    key: str = "tapnbd",
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> _Started:
    """``tapnbd serve``; ``args`` and ``env`` make the variants (see _STARTERS)."""
    out = logdir / f"tapnbd-{n}.uri"
    cmd = [*tapnbd_command(), "serve", str(image), "--format", fmt]
    if transport == "tcp":
        cmd += ["--bind", HOST, "--port", "0"]
    else:
        sock = logdir / f"nbd-{n}.sock"
        sock.unlink(missing_ok=True)
        cmd += ["--socket", str(sock)]
    cmd += args
    proc = spawn(cmd, log=log, stdout=out, env={**os.environ, **env} if env else None)

    def uri_line() -> str | None:
        try:
            for line in out.read_text().splitlines():
                if line.startswith("nbd"):
                    return line.strip()
        except OSError:
            pass
        return None

    _watch(proc, "tapnbd serve", log, lambda: uri_line() is not None)
    uri = uri_line()
    assert uri is not None
    served = Served(SERVERS[key], image, fmt, uri, proc.pid, cmd, log)
    return served, lambda: _stop_checked(proc, "tapnbd serve", log)


def _stop_checked(proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    rc = stop(proc)
    if rc not in (0, None, -15):
        # Not fatal for a benchmark, but worth a line in the log we keep.
        with open(log, "a") as f:
            f.write(f"[bench] {what} exited with status {rc}\n")


def _start_qemu_nbd(
    image: Path,
    fmt: str,
    logdir: Path,
    log: Path,
    n: int,
    transport: Transport,
    options: ServerOptions,
) -> _Started:
    port, sock = _address(transport, logdir, n)
    # qemu calls VHD "vpc".
    cmd = ["qemu-nbd", "-f", "vpc" if fmt == "vhd" else fmt, "-t", "-x", image.name]
    cmd += ["-b", HOST, "-p", str(port)] if transport == "tcp" else ["-k", str(sock)]
    if options.qemu_shared != 1:
        cmd += ["-e", str(options.qemu_shared)]
    if fmt == "qcow2":
        # How qemu is run in production (issue 13's reference): the page cache, and a
        # thread pool for I/O.
        cmd += ["--cache=writeback", "--aio=threads"]
    cmd.append(str(image))
    return _launch("qemu-nbd", cmd, image, fmt, log, transport, port, sock)


def _start_nbdkit(
    image: Path,
    fmt: str,
    logdir: Path,
    log: Path,
    n: int,
    transport: Transport,
    options: ServerOptions,
) -> _Started:
    port, sock = _address(transport, logdir, n)
    cmd = ["nbdkit", "-f", "--exit-with-parent"]
    cmd += ["-i", HOST, "-p", str(port)] if transport == "tcp" else ["-U", str(sock)]
    cmd += ["file", f"file={image}"]
    return _launch("nbdkit", cmd, image, fmt, log, transport, port, sock)


def _launch(
    key: str,
    cmd: list[str],
    image: Path,
    fmt: str,
    log: Path,
    transport: Transport,
    port: int,
    sock: Path,
) -> _Started:
    """Start a peer that stays in the foreground and wait until it greets."""
    proc = spawn(cmd, log=log)
    _watch(proc, key, log, _greets(transport, port, sock))
    uri = tcp_uri(port, image.name) if transport == "tcp" else unix_uri(sock, image.name)
    served = Served(SERVERS[key], image, fmt, uri, proc.pid, cmd, log)
    return served, lambda: _stop_checked(proc, key, log)


def _start_nbd_server(
    image: Path,
    fmt: str,
    logdir: Path,
    log: Path,
    n: int,
    transport: Transport,
    options: ServerOptions,
) -> _Started:
    # nbd-server has no foreground mode that still serves more than one client (-d
    # serves one and exits), so it runs as the daemon it wants to be, found by pidfile.
    port, sock = _address(transport, logdir, n)
    conf = logdir / f"nbd-server-{n}.conf"
    pidfile = logdir / f"nbd-server-{n}.pid"
    pidfile.unlink(missing_ok=True)
    generic = ["[generic]", "    allowlist = true"]
    if transport == "tcp":
        generic += [f"    listenaddr = {HOST}", f"    port = {port}"]
    else:
        generic += ["    port = 0", f"    unixsock = {sock}"]
    conf.write_text(
        "\n".join([*generic, f"[{image.name}]", f"    exportname = {image}", ""]),
    )
    cmd = ["nbd-server", "-C", str(conf), "-p", str(pidfile)]
    launcher = spawn(cmd, log=log)
    try:
        launcher.wait(READY_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop(launcher)
        raise BenchError(f"nbd-server did not daemonise\n{tail(log)}") from None
    if launcher.returncode != 0:
        raise BenchError(f"nbd-server exited with status {launcher.returncode}\n{tail(log)}")

    def daemon_pid() -> int | None:
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    wait_until(lambda: daemon_pid() is not None, what="nbd-server pidfile", log=log)
    pid = daemon_pid()
    assert pid is not None
    try:
        wait_until(
            _greets(transport, port, sock),
            what="nbd-server",
            timeout=READY_TIMEOUT,
            alive=lambda: pid_alive(pid),
            log=log,
        )
    except BaseException:
        stop_pid(pid)
        raise
    uri = tcp_uri(port, image.name) if transport == "tcp" else unix_uri(sock, image.name)
    served = Served(SERVERS["nbd-server"], image, fmt, uri, pid, cmd, log)
    return served, lambda: stop_pid(pid)


_STARTERS: dict[
    str,
    Callable[[Path, str, Path, Path, int, Transport, ServerOptions], _Started],
] = {
    "tapnbd": _start_tapnbd,
    "tapnbd-nostats": functools.partial(
        _start_tapnbd, key="tapnbd-nostats", env={"TAPNBD_STATS": "off"}
    ),
    "tapnbd-poll": functools.partial(
        _start_tapnbd, key="tapnbd-poll", args=("--poll-us", str(POLL_US))
    ),
    "qemu-nbd": _start_qemu_nbd,
    "nbdkit": _start_nbdkit,
    "nbd-server": _start_nbd_server,
}
