"""Block devices for the Bonnie rows, and the file system on them.

Every NBD row reaches the kernel through the same path, so that only the server differs:
``nbdfuse`` shows the export as a file over a unix socket, ``losetup`` turns the file into
``/dev/loopN``. That is what ``tapnbd attach --via fuse`` does (issue 4), and tapnbd's
own rows go through it (``TAPNBD_ATTACH`` below); the peers' rows do the same two steps
by hand against their own server.

After the device exists, its loop device is switched to direct I/O (``losetup
--direct-io=on``): the loop driver then passes each request straight to nbdfuse instead
of through a second page cache on the FUSE file, which would absorb writes and serve
re-reads from memory. With that, each NBD row has exactly one page cache below ext4, the
server's on the image file, and so does the Loop row (a buffered loop device straight on
the image file).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench.proc import (
    BenchError,
    Unavailable,
    have,
    is_root,
    run,
    spawn,
    stop,
    tail,
    tapnbd_command,
    wait_until,
)
from bench.servers import ServerOptions, serve

AttachVia = Literal["tapnbd-attach", "nbdfuse"]

#: How tapnbd's Bonnie rows get their device: "tapnbd-attach" runs ``tapnbd attach
#: --via fuse`` (the daemon, issue 4); "nbdfuse" serves with ``tapnbd serve`` and attaches
#: by hand, exactly like the peer rows. This one line is the switch.
TAPNBD_ATTACH: AttachVia = "tapnbd-attach"


@dataclass
class Device:
    path: str
    how: str  # a short description for the results
    server: str = ""  # the command that served it, if any
    direct_io: bool | None = None


def block_path_unavailable() -> str | None:
    """Why the block-device rows cannot run here, or None."""
    if not is_root():
        return "needs root (losetup, mount)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    for tool in ("losetup", "nbdfuse", "mkfs.ext4", "bonnie++"):
        if not have(tool):
            return f"{tool} is not installed"
    if not (have("fusermount3") or have("fusermount")):
        return "fusermount3 is not installed"
    return None


def _fusermount() -> str:
    return "fusermount3" if have("fusermount3") else "fusermount"


def set_direct_io(device: str, on: bool) -> bool | None:
    """Switch a loop device's direct I/O; return what the kernel reports afterwards."""
    name = os.path.basename(device)
    if not name.startswith("loop"):
        return None
    run(["losetup", f"--direct-io={'on' if on else 'off'}", device], what="losetup --direct-io")
    try:
        return Path(f"/sys/block/{name}/loop/dio").read_text().strip() == "1"
    except OSError:
        return None


def _loop_backing(device: str) -> str | None:
    try:
        return Path(f"/sys/block/{os.path.basename(device)}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def detach_loop(device: str) -> None:
    """losetup -d, then wait until the loop driver has let go of its file."""
    with contextlib.suppress(BenchError):
        run(["losetup", "-d", device], what=f"losetup -d {device}")
    with contextlib.suppress(BenchError):
        wait_until(lambda: _loop_backing(device) is None, what=f"detach {device}", timeout=15)


@contextlib.contextmanager
def loop_device(path: Path, *, direct_io: bool = False) -> Iterator[Device]:
    """The kernel loop device straight on a file."""
    cmd = ["losetup", "--find", "--show", f"--direct-io={'on' if direct_io else 'off'}"]
    dev = run([*cmd, str(path)], what="losetup").strip()
    if not dev.startswith("/dev/"):
        raise BenchError(f"losetup printed {dev!r}")
    try:
        dio = set_direct_io(dev, direct_io)
        yield Device(dev, "losetup on the image file", direct_io=dio)
    finally:
        detach_loop(dev)


@contextlib.contextmanager
def nbdfuse_device(uri: str, workdir: Path, tag: str) -> Iterator[Device]:
    """nbdfuse + losetup against any server's URI: the attach path, done by hand."""
    mountdir = workdir / f"fuse-{tag}"
    mountdir.mkdir(parents=True, exist_ok=True)
    pidfile = workdir / f"fuse-{tag}.pid"
    pidfile.unlink(missing_ok=True)
    log = workdir / "logs" / f"nbdfuse-{tag}.log"
    proc = spawn(["nbdfuse", "-P", str(pidfile), str(mountdir / "nbd"), uri], log=log)
    dev: str | None = None
    try:
        wait_until(
            lambda: pidfile.exists() and pidfile.stat().st_size > 0,
            what="nbdfuse",
            alive=lambda: proc.poll() is None,
            log=log,
        )
        dev = run(["losetup", "--find", "--show", str(mountdir / "nbd")], what="losetup").strip()
        yield Device(dev, "nbdfuse + losetup (by hand)")
    finally:
        if dev:
            detach_loop(dev)
        _unmount_fuse(mountdir)
        if stop(proc) not in (0, None, -15):
            log.write_text(log.read_text() + "[bench] nbdfuse exited badly\n")
        with contextlib.suppress(OSError):
            mountdir.rmdir()
        pidfile.unlink(missing_ok=True)


def _unmount_fuse(mountdir: Path) -> None:
    for _ in range(50):
        try:
            run([_fusermount(), "-u", str(mountdir)], what="fusermount -u")
            return
        except BenchError:
            if not os.path.ismount(mountdir):
                return
            time.sleep(0.1)
    with contextlib.suppress(BenchError):
        run([_fusermount(), "-u", "-z", str(mountdir)], what="fusermount -u -z")


@contextlib.contextmanager
def tapnbd_daemon(state_dir: Path) -> Iterator[Path]:
    """A private tapnbd daemon (its own state dir, no TCP port), stopped at the end."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tap = tapnbd_command()
    run(
        [*tap, "daemon", "start", "--state-dir", str(state_dir), "--tcp", "none"],
        what="tapnbd daemon start",
        timeout=60,
    )
    try:
        yield state_dir
    finally:
        try:
            run(
                [*tap, "daemon", "stop", "--state-dir", str(state_dir), "--all", "--force"],
                what="tapnbd daemon stop",
                timeout=120,
            )
        except BenchError as e:
            log = state_dir / "daemon.log"
            raise BenchError(f"{e}\n{tail(log)}") from e


@contextlib.contextmanager
def tapnbd_attached(image: Path, fmt: str, state_dir: Path) -> Iterator[Device]:
    """``tapnbd attach IMAGE --via fuse``; ``tapnbd detach`` at the end."""
    tap = tapnbd_command()
    out = run(
        [
            *tap,
            "attach",
            str(image),
            "--via",
            "fuse",
            "--format",
            fmt,
            "--state-dir",
            str(state_dir),
        ],
        what="tapnbd attach",
        timeout=120,
    )
    found = re.findall(r"/dev/[a-z]+\d+", out)
    if not found:
        raise BenchError(f"tapnbd attach printed no device: {out!r}")
    dev = found[-1]
    try:
        yield Device(dev, "tapnbd attach --via fuse", server="tapnbd daemon")
    finally:
        run(
            [*tap, "detach", dev, "--state-dir", str(state_dir)],
            what="tapnbd detach",
            timeout=120,
        )


@contextlib.contextmanager
def nbd_device(
    server: str,
    image: Path,
    fmt: str,
    workdir: Path,
    *,
    via: AttachVia,
    state_dir: Path | None,
    options: ServerOptions | None = None,
) -> Iterator[Device]:
    """A block device for ``image`` served by ``server``, through the common attach path."""
    if server == "tapnbd" and via == "tapnbd-attach":
        if state_dir is None:
            raise BenchError("tapnbd attach needs the daemon's state dir")
        with tapnbd_attached(image, fmt, state_dir) as dev:
            dev.direct_io = set_direct_io(dev.path, True)
            yield dev
        return
    with (
        serve(
            server, image, fmt, logdir=workdir / "logs", transport="unix", options=options
        ) as served,
        nbdfuse_device(served.uri, workdir, f"{server}-{image.stem}") as dev,
    ):
        dev.server = " ".join(served.command)
        dev.direct_io = set_direct_io(dev.path, True)
        yield dev


def tapnbd_attach_unavailable() -> str | None:
    """Why ``tapnbd attach --via fuse`` cannot be used, or None."""
    try:
        text = run([*tapnbd_command(), "attach", "--help"], what="tapnbd attach --help")
    except BenchError:
        return "this tapnbd has no `attach` command"
    if "--via" not in text:
        return "this tapnbd's `attach` has no --via"
    return None


@contextlib.contextmanager
def ext4_mounted(device: str, mountpoint: Path, log: Path) -> Iterator[Path]:
    """mkfs.ext4 (inode tables and journal written now, not lazily later), mount, umount."""
    # lazy init would leave a kernel thread zeroing inode tables during the benchmark.
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
            device,
        ],
        what="mkfs.ext4",
        timeout=600,
        log=log,
    )
    mountpoint.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "ext4", device, str(mountpoint)], what="mount", log=log)
    try:
        yield mountpoint
    finally:
        _umount(mountpoint)


def _umount(mountpoint: Path) -> None:
    for _ in range(30):
        try:
            run(["umount", str(mountpoint)], what="umount", timeout=300)
            return
        except BenchError:
            if not os.path.ismount(mountpoint):
                return
            time.sleep(0.2)
    with contextlib.suppress(BenchError):
        run(["umount", "-l", str(mountpoint)], what="umount -l")


def unavailable_for(server: str, via: AttachVia) -> str | None:
    """Why the NBD rows of ``server`` cannot run, or None."""
    if server == "tapnbd" and via == "tapnbd-attach":
        return tapnbd_attach_unavailable()
    return None


__all__ = [
    "TAPNBD_ATTACH",
    "AttachVia",
    "Device",
    "Unavailable",
    "block_path_unavailable",
    "ext4_mounted",
    "loop_device",
    "nbd_device",
    "set_direct_io",
    "tapnbd_daemon",
    "unavailable_for",
]
