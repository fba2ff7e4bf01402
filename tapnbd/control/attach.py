"""Local block devices for exports: the kernel nbd client, or nbdfuse plus a loop device.

blktap gave dom0 a ``/dev/xen/blktapN`` per disk; we give the host a block device per
attached export, ready for mkfs and mount, in one of two ways:

- **nbd**: the kernel's own NBD client (``nbd-client`` configures ``/dev/nbdN`` and hands
  it a socket to our server). Used when ``/dev/nbd*`` exists or ``modprobe nbd`` works.
- **fuse**: ``nbdfuse`` presents the export as a file in a FUSE mount under the state
  directory, and ``losetup`` turns that file into ``/dev/loopN``.

Everything here is synchronous and runs external commands. The daemon calls it from a
worker thread, never on its event loop. The device's NBD server is the attachment's own
data-path process (``tapdisk``), so neither this code nor the device depends on the
daemon staying alive.

The nbd-client command line is built by a pure function (``nbd_client_command``) so it
can be tested where the kernel path cannot run.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import stat
import subprocess
import time

from tapnbd.control.messages import Attachment
from tapnbd.control.messages import ViaName as ViaName  # for callers that choose one
from tapnbd.errors import TapnbdError

#: nbd-client's default port, and the IANA one.
NBD_PORT = 10809
#: The name of the file nbdfuse shows in its mount point.
FUSE_FILE = "disk"
#: Seconds to wait for nbdfuse to be ready, or to exit after its unmount.
FUSE_TIMEOUT = 15.0


class AttachError(TapnbdError):
    """A device could not be attached or detached."""


# The kernel nbd client.


def nbd_client_command(
    device: str,
    export: str,
    *,
    socket: str | None = None,
    host: str | None = None,
    port: int = NBD_PORT,
    read_only: bool = False,
    connections: int = 1,
    block_size: int = 512,
    timeout: int | None = None,
) -> list[str]:
    """The ``nbd-client`` command that connects ``device`` to ``export``.

    Exactly one of ``socket`` (a unix socket path) and ``host`` is given. The export is
    named with ``-N`` (fixed newstyle), the block size is 512 unless the export asks for
    more, and ``-C`` opens several connections when the export allows multi-conn.
    """
    if (socket is None) == (host is None):
        raise ValueError("give exactly one of socket and host")
    if block_size not in (512, 1024, 2048, 4096):
        raise ValueError(f"nbd-client accepts block sizes 512 to 4096, not {block_size}")
    if connections < 1:
        raise ValueError("connections must be at least 1")
    if not export:
        raise ValueError("the kernel client needs an export name")
    cmd = ["nbd-client"]
    if socket is not None:
        cmd += ["-unix", socket]
    else:
        assert host is not None
        cmd += [host, str(port)]
    cmd += [device, "-N", export, "-b", str(block_size)]
    if connections > 1:
        cmd += ["-C", str(connections)]
    if read_only:
        cmd.append("-R")
    if timeout is not None:
        cmd += ["-t", str(timeout)]
    return cmd


def nbd_disconnect_command(device: str) -> list[str]:
    return ["nbd-client", "-d", device]


def _nbd_devices() -> list[str]:
    def number(path: str) -> int:
        return int(re.sub(r"\D", "", os.path.basename(path)) or 0)

    return sorted(glob.glob("/dev/nbd[0-9]*"), key=number)


def kernel_nbd_status(load: bool = True) -> tuple[bool, str]:
    """Whether the kernel nbd path can be used, and why (or why not)."""
    if shutil.which("nbd-client") is None:
        return False, "nbd-client is not installed"
    if _nbd_devices():
        return True, "/dev/nbd* exists"
    if not load:
        return False, "no /dev/nbd* devices"
    if shutil.which("modprobe") is None:
        return False, "no /dev/nbd* devices and no modprobe"
    proc = subprocess.run(["modprobe", "nbd"], capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        for _ in range(50):
            if _nbd_devices():
                return True, "loaded the nbd module"
            time.sleep(0.02)
    why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no devices appeared"
    why = re.sub(r"^modprobe: (FATAL|ERROR): ", "", why)
    return False, f"no /dev/nbd* devices and the nbd module cannot be loaded: {why}"


def fuse_status() -> tuple[bool, str]:
    """Whether the nbdfuse + losetup path can be used, and why not."""
    for tool in ("nbdfuse", "losetup"):
        if shutil.which(tool) is None:
            return False, f"{tool} is not installed"
    if _fusermount() is None:
        return False, "fusermount3 is not installed"
    if not os.path.exists("/dev/fuse"):
        return False, "/dev/fuse does not exist"
    if not os.path.exists("/dev/loop-control"):
        return False, "/dev/loop-control does not exist (no loop driver)"
    return True, "nbdfuse and losetup"


def choose_via(via: str) -> tuple[ViaName, str]:
    """Pick the attach path: ``auto`` prefers the kernel client. Returns (via, reason)."""
    if via == "nbd":
        ok, why = kernel_nbd_status()
        if not ok:
            raise AttachError(f"cannot attach with the kernel nbd client: {why}")
        return "nbd", f"kernel nbd client (forced; {why})"
    if via == "socket":
        return "socket", "the data path's NBD socket, for a VM's client (no local device)"
    if via == "fuse":
        ok, why = fuse_status()
        if not ok:
            raise AttachError(f"cannot attach with nbdfuse: {why}")
        return "fuse", "nbdfuse + losetup (forced)"
    if via != "auto":
        raise AttachError(f"unknown attach path {via!r}: use auto, nbd, fuse or socket")
    ok, nbd_why = kernel_nbd_status()
    if ok:
        return "nbd", f"kernel nbd client ({nbd_why})"
    ok, fuse_why = fuse_status()
    if ok:
        return "fuse", f"nbdfuse + losetup (the kernel nbd client is unavailable: {nbd_why})"
    raise AttachError(f"cannot attach: kernel nbd: {nbd_why}; fuse: {fuse_why}")


def free_nbd_device() -> str:
    """The first /dev/nbdN with no client connected."""
    for dev in _nbd_devices():
        name = os.path.basename(dev)
        if os.path.exists(f"/sys/block/{name}/pid"):
            continue
        with contextlib.suppress(OSError), open(f"/sys/block/{name}/size") as f:
            if int(f.read().strip() or 0) != 0:
                continue
        return dev
    raise AttachError("every /dev/nbd* device is in use")


def attach_nbd(att: Attachment, *, socket: str, connections: int = 1) -> None:
    """Connect a free /dev/nbdN to the export over the daemon's unix socket."""
    device = free_nbd_device()
    cmd = nbd_client_command(
        device, att.export, socket=socket, read_only=att.read_only, connections=connections
    )
    _run(cmd, f"nbd-client could not connect {device}")
    att.device = device


def detach_nbd(att: Attachment) -> None:
    if att.device and os.path.exists(f"/sys/block/{os.path.basename(att.device)}/pid"):
        _run(nbd_disconnect_command(att.device), f"nbd-client could not disconnect {att.device}")


# nbdfuse + losetup.


def _fusermount() -> str | None:
    return shutil.which("fusermount3") or shutil.which("fusermount")


def start_nbdfuse(att: Attachment, *, uri: str, mountdir: str) -> subprocess.Popen[bytes]:
    """Mount the export as ``mountdir/disk`` with nbdfuse and wait until it is ready."""
    os.makedirs(mountdir, mode=0o700, exist_ok=True)
    pidfile = mountdir + ".pid"
    errfile = mountdir + ".err"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    cmd = ["nbdfuse", "-P", pidfile]
    if att.read_only:
        cmd.append("-r")
    cmd += [os.path.join(mountdir, FUSE_FILE), uri]
    with open(errfile, "wb") as err:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # not killed with the daemon's process group
        )
    att.mountdir = mountdir
    att.fuse_file = os.path.join(mountdir, FUSE_FILE)
    att.fuse_pid = proc.pid
    deadline = time.monotonic() + FUSE_TIMEOUT
    try:
        while not os.path.exists(pidfile) or os.path.getsize(pidfile) == 0:
            if proc.poll() is not None:
                raise AttachError(
                    f"nbdfuse exited with status {proc.returncode}: {tail_of(errfile)}"
                )
            if time.monotonic() > deadline:
                raise AttachError(f"nbdfuse was not ready after {FUSE_TIMEOUT:.0f} s")
            time.sleep(0.01)
    except BaseException:
        stop_nbdfuse(att, proc)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(errfile)
    return proc


def losetup(att: Attachment) -> None:
    """Give the nbdfuse file a loop device."""
    cmd = ["losetup", "--find", "--show"]
    if att.read_only:
        cmd.append("--read-only")
    cmd.append(att.fuse_file)
    out = _run(cmd, "losetup failed").strip()
    if not out.startswith("/dev/"):
        raise AttachError(f"losetup printed {out!r}, not a device")
    att.device = out


def detach_loop(device: str, backing_prefix: str | None = None, *, wait: bool = True) -> bool:
    """Detach a loop device and wait until it is gone; False if it was not attached.

    With ``backing_prefix``, only a loop device whose backing file is under it is
    touched (a stale record must not detach a device someone else has since taken).
    """
    backing = loop_backing_file(device)
    if backing is None:
        return False
    if backing_prefix is not None and not backing.startswith(backing_prefix):
        return False
    proc = subprocess.run(["losetup", "-d", device], capture_output=True, text=True, check=False)
    if proc.returncode != 0 and loop_backing_file(device) is not None:
        raise AttachError(f"losetup -d {device} failed: {proc.stderr.strip()}")
    if not wait:
        return True  # autoclear: it goes when its last user closes it
    # The loop driver lets go of its file asynchronously; FUSE cannot unmount before.
    deadline = time.monotonic() + 10
    while loop_backing_file(device) is not None:
        if time.monotonic() > deadline:
            raise AttachError(f"{device} is still attached after losetup -d")
        time.sleep(0.01)
    return True


def loop_backing_file(device: str) -> str | None:
    """The file behind a loop device, or None when it is not attached."""
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().strip()
    except OSError:
        return None


def stop_nbdfuse(
    att: Attachment, proc: subprocess.Popen[bytes] | None = None, *, lazy: bool = False
) -> None:
    """Unmount nbdfuse's mount point, wait for nbdfuse to exit, remove the directory."""
    mountdir = att.mountdir
    if mountdir and is_mountpoint(mountdir):
        fusermount = _fusermount() or "fusermount3"
        for attempt in range(50):
            args = [fusermount, "-u"] + (["-z"] if lazy or attempt == 49 else []) + [mountdir]
            p = subprocess.run(args, capture_output=True, text=True, check=False)
            if p.returncode == 0 or not is_mountpoint(mountdir):
                break
            time.sleep(0.05)  # EBUSY: a loop device is letting go of the file
    pid = proc.pid if proc is not None else att.fuse_pid
    if pid and (proc is not None or _is_nbdfuse(pid, mountdir)):
        wait_exit(pid, proc, patience=1.0 if lazy else FUSE_TIMEOUT)
    if mountdir:
        for leftover in (mountdir + ".pid", mountdir + ".err"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        with contextlib.suppress(OSError):
            os.rmdir(mountdir)


def wait_exit(pid: int, proc: subprocess.Popen[bytes] | None, patience: float) -> None:
    """Wait for nbdfuse to exit after its unmount; SIGTERM, then SIGKILL, if it does not."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (patience if sig is None else 5)
        while time.monotonic() < deadline:
            if proc is not None:
                if proc.poll() is not None:
                    return
            elif not pid_alive(pid):
                return
            time.sleep(0.01)


def attach_fuse(att: Attachment, *, uri: str, mountdir: str) -> subprocess.Popen[bytes]:
    """nbdfuse, then losetup; undone if either fails."""
    proc = start_nbdfuse(att, uri=uri, mountdir=mountdir)
    try:
        losetup(att)
    except BaseException:
        stop_nbdfuse(att, proc)
        raise
    return proc


def detach_fuse(
    att: Attachment, proc: subprocess.Popen[bytes] | None, *, lazy: bool = False
) -> None:
    if att.device:
        detach_loop(att.device, backing_prefix=att.mountdir or None, wait=not lazy)
    stop_nbdfuse(att, proc, lazy=lazy)


# Flushing and mount checks.


def flush_device(device: str) -> None:
    """fsync the block device: its page cache goes down to the export, then FLUSH."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # a dead export: nothing more to save
    finally:
        os.close(fd)


def _devnums(device: str) -> set[int]:
    """The device number of ``device`` and of its partitions."""
    try:
        st = os.stat(device)
    except OSError:
        return set()
    if not stat.S_ISBLK(st.st_mode):
        return set()
    nums = {st.st_rdev}
    name = os.path.basename(os.path.realpath(device))
    for part in glob.glob(f"/sys/class/block/{name}/{name}*/dev"):
        with contextlib.suppress(OSError, ValueError):
            with open(part) as f:
                major, minor = f.read().strip().split(":")
            nums.add(os.makedev(int(major), int(minor)))
    return nums


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_of(device: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Where ``device`` (or one of its partitions) is mounted, from /proc/self/mountinfo.

    A line is ``id parent major:minor root mountpoint options ... - fstype source superopts``;
    a block device's filesystem has the device's own number as ``major:minor``.
    """
    nums = _devnums(device)
    real = os.path.realpath(device)
    out: list[str] = []
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) < 5:
            continue
        try:
            major, minor = parts[2].split(":")
            num = os.makedev(int(major), int(minor))
        except ValueError:
            continue
        source = ""
        if " - " in line:
            tail = line.split(" - ", 1)[1].split()
            source = _unescape(tail[1]) if len(tail) > 1 else ""
        if num in nums or (source.startswith("/dev/") and os.path.realpath(source) == real):
            out.append(_unescape(parts[4]))
    return out


def holders_of(device: str) -> list[str]:
    """Devices stacked on ``device`` (device-mapper, md): /sys/class/block/NAME/holders."""
    name = os.path.basename(os.path.realpath(device))
    try:
        return sorted(os.listdir(f"/sys/class/block/{name}/holders"))
    except OSError:
        return []


def busy_reason(device: str) -> str | None:
    """Why ``device`` cannot be detached now, or None."""
    where = mounts_of(device)
    if where:
        return f"{device} is mounted on {', '.join(where)}; unmount it first"
    holders = holders_of(device)
    if holders:
        return f"{device} is in use by {', '.join(holders)}"
    return None


def attachment_busy(att: Attachment) -> str | None:
    """Why ``att`` must not be taken down now (its device, or its nbdfuse file, is in
    use: mounted, stacked on, or looped again by someone else), or None."""
    if att.device and att.via != "socket":
        busy = busy_reason(att.device)
        if busy:
            return busy
    if att.via == "fuse" and att.mountdir:
        for device in loops_under(att.mountdir.rstrip("/") + "/"):
            if device == att.device:
                continue
            busy = busy_reason(device)
            return busy or f"{att.fuse_file} is in use by {device}"
    return None


def device_present(att: Attachment) -> bool:
    """Whether ``att``'s device is still connected to something."""
    if not att.device or att.via == "socket":
        return False
    if att.via == "nbd":
        return os.path.exists(f"/sys/block/{os.path.basename(att.device)}/pid")
    return loop_backing_file(att.device) is not None


def loops_under(prefix: str) -> list[str]:
    """Loop devices whose backing file is under ``prefix``."""
    out = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing) as f:
                path = f.read().strip()
        except OSError:
            continue
        if path.startswith(prefix):
            out.append("/dev/" + backing.split("/")[3])
    return out


def is_mountpoint(path: str) -> bool:
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(_unescape(line.split()[4]) == target for line in f if len(line.split()) > 4)
    except OSError:
        return os.path.ismount(path)


# Processes.


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and pid_alive(int(e))]


def _is_nbdfuse(pid: int, mountdir: str) -> bool:
    """Is ``pid`` still the nbdfuse we started for ``mountdir`` (pids get reused)?"""
    cmd = cmdline(pid)
    return (
        pid_alive(pid)
        and bool(cmd)
        and os.path.basename(cmd[0]) == "nbdfuse"
        and any(a.startswith(mountdir) for a in cmd)
    )


# Cleaning up after a daemon that died.


def cleanup_stale(
    records: list[Attachment], run_dir: str, keep: list[Attachment] | None = None
) -> list[str]:
    """Undo attachments whose data path is gone; returns what was done, for the user.

    Works from ``records`` and also sweeps ``run_dir`` (where nbdfuse mount points live)
    for loop devices, FUSE mounts and nbdfuse processes nobody recorded, as a crash can
    come between making a resource and recording it. What belongs to ``keep`` (the
    attachments that still run) is not touched, and neither is anything in use: a
    mounted device, or the FUSE mount under it, is left as it is with a note saying
    where it is mounted (tearing it down would lose the file system's unwritten data).
    """
    notes: list[str] = []
    prefix = run_dir.rstrip("/") + "/"
    for att in records:
        if att.mountdir and not (
            att.mountdir.startswith(prefix)
            and os.path.realpath(att.mountdir).startswith(os.path.realpath(prefix) + "/")
        ):
            # The record names a mount point outside ours: not ours to unmount.
            notes.append(f"ignored a recorded mount point outside {prefix}: {att.mountdir!r}")
            continue
        try:
            busy = attachment_busy(att)
            if busy:
                notes.append(f"left {att.device or att.image} attached: {busy}")
                continue
            if att.via == "nbd":
                if device_present(att):
                    detach_nbd(att)
                    notes.append(f"disconnected {att.device} ({att.image})")
                continue
            if (
                att.device
                and loop_backing_file(att.device) is not None
                and detach_loop(att.device, backing_prefix=prefix)
            ):
                notes.append(f"detached {att.device} ({att.image})")
            pid_was = att.fuse_pid if _is_nbdfuse(att.fuse_pid, att.mountdir or prefix) else 0
            stop_nbdfuse(att, lazy=True)
            if pid_was:
                notes.append(f"stopped nbdfuse (pid {pid_was})")
        except (OSError, TapnbdError) as e:
            notes.append(f"could not clean up {att.device or att.image}: {e}")
    spared = {a.mountdir.rstrip("/") + "/" for a in (keep or []) if a.mountdir}
    spared |= {a.mountdir.rstrip("/") + "/" for a in records if a.mountdir and attachment_busy(a)}
    notes += _sweep(prefix, spared)
    return notes


def _sweep(prefix: str, spared: set[str]) -> list[str]:
    """Take down what is under ``prefix`` but not under a ``spared`` mount point."""
    notes: list[str] = []

    def is_spared(path: str) -> bool:
        return any((path.rstrip("/") + "/").startswith(s) for s in spared)

    for device in loops_under(prefix):
        backing = loop_backing_file(device) or ""
        if is_spared(backing):
            continue
        busy = busy_reason(device)
        if busy:
            notes.append(f"left {device} attached: {busy}")
            spared.add(os.path.dirname(backing).rstrip("/") + "/")
            continue
        try:
            if detach_loop(device, backing_prefix=prefix):
                notes.append(f"detached {device}")
        except TapnbdError as e:
            notes.append(str(e))
            spared.add(os.path.dirname(backing).rstrip("/") + "/")
    with contextlib.suppress(OSError):
        with open("/proc/self/mountinfo") as f:
            points = [_unescape(line.split()[4]) for line in f if len(line.split()) > 4]
        for point in points:
            if point.startswith(prefix) and not is_spared(point):
                att = Attachment(
                    id="", export="", image="", via="fuse", read_only=False, mountdir=point
                )
                stop_nbdfuse(att, lazy=True)
                notes.append(f"unmounted {point}")
    for pid_dir in glob.glob("/proc/[0-9]*"):
        pid = int(os.path.basename(pid_dir))
        cmd = cmdline(pid)
        if (
            cmd
            and os.path.basename(cmd[0]) == "nbdfuse"
            and any(a.startswith(prefix) for a in cmd)
            and not any(is_spared(a) for a in cmd if a.startswith(prefix))
        ):
            _wait_exit_quick(pid)
            notes.append(f"stopped nbdfuse (pid {pid})")
    with contextlib.suppress(OSError):
        for entry in os.listdir(prefix):
            path = prefix + entry
            if is_spared(path) or any(path.startswith(s.rstrip("/") + ".") for s in spared):
                continue
            if os.path.isdir(path) and not is_mountpoint(path):
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            elif entry.endswith((".pid", ".err")):
                with contextlib.suppress(OSError):
                    os.unlink(path)
    return notes


def _wait_exit_quick(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.01)
        if not pid_alive(pid):
            return


# Helpers.


def _run(cmd: list[str], what: str) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
    except FileNotFoundError:
        raise AttachError(f"{what}: {cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise AttachError(f"{what}: {cmd[0]} did not finish in 60 s") from None
    if proc.returncode != 0:
        msg = proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}"
        raise AttachError(f"{what}: {msg}")
    return proc.stdout


def tail_of(path: str, limit: int = 500) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace").strip()
    except OSError:
        return "(no message)"
    return text[-limit:] or "(no message)"
