"""The daemon's side of the data-path processes (``tapdisk``): start, ask, recognise, stop.

Everything here is synchronous (sockets with timeouts, subprocesses) and is called from
worker threads. A tapdisk is another process, so waiting on it never waits on the
daemon's own event loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

from tapnbd.control import tapdisk
from tapnbd.control.attach import AttachError, cmdline, pid_alive, tail_of, wait_exit
from tapnbd.control.auth import allowed, peer_uid
from tapnbd.control.messages import Attachment, Trust

#: Seconds for a tapdisk to open its image and listen.
START_TIMEOUT = 30.0
#: Seconds for a tapdisk to drain, flush and close on "stop".
STOP_TIMEOUT = 120.0
#: Replies from a tapdisk are small; a longer one is not from ours.
MAX_REPLY = 1 << 20


def remove_dir(directory: str, root: str) -> bool:
    """Remove a tapdisk's directory, if it is one: ``ROOT/ID`` exactly, a real directory.

    Its path comes from the state file or a process's command line, so it is checked
    before anything is deleted: never ``..``, a symlink, or anything outside ``root``.
    """
    if (
        os.path.dirname(directory) != root.rstrip("/")
        or not os.path.basename(directory).isdigit()
        or os.path.islink(directory)
        or os.path.realpath(directory)
        != os.path.join(os.path.realpath(root), os.path.basename(directory))
    ):
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return True


def new_token() -> str:
    return secrets.token_hex(16)


def spawn(
    directory: str,
    *,
    image: str,
    name: str,
    fmt: str,
    read_only: bool,
    stats: bool,
    token: str,
    share: bool = False,
    snapshot: str | None = None,
    poll_us: int = 0,
    cache: str = "writeback",
    throwaway: bool = False,
    probed_raw: bool = False,
    trust: Trust | None = None,
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start a tapdisk in a session of its own and wait for its ready record."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(directory)  # a dead predecessor's, with this id
    os.mkdir(directory, 0o700)
    cmd = [sys.executable, "-m", tapdisk.MODULE, directory, "--image", image, "--name", name]
    cmd += ["--token", token, "--format", fmt]
    if snapshot is not None:
        cmd += ["--snapshot", snapshot]
    if share:
        cmd.append("--share")
    if read_only:
        cmd.append("--read-only")
    if not stats:
        cmd.append("--no-stats")
    if poll_us > 0:  # off is tapdisk's default: its command line stays as it was
        cmd += ["--poll-us", str(poll_us)]
    if cache != "writeback":  # (likewise)
        cmd += ["--cache", cache]
    if throwaway:
        cmd.append("--throwaway")
    if probed_raw:
        cmd.append("--probed-raw")
    cmd += tapdisk.trust_argv(trust or Trust())
    logpath = os.path.join(directory, "tapdisk.log")
    logfd = os.open(logpath, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=logfd,
            start_new_session=True,  # a kill -9 of the daemon's group leaves it running
            close_fds=True,
            cwd="/",
        )
    finally:
        os.close(logfd)
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AttachError(f"the data path for {image} did not start in {START_TIMEOUT} s")
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            line += chunk
            if len(line) > MAX_REPLY:
                break
        try:
            record = json.loads(line) if line.endswith(b"\n") else {}
        except ValueError:
            record = {}
        if not isinstance(record, dict) or record.get("token") != token:
            why = record.get("error") if isinstance(record, dict) else None
            raise AttachError(
                f"the data path for {image} could not start: {why or tail_of(logpath)}"
            )
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        proc.stdout.close()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    proc.stdout.close()
    return proc, record


def request(control: str, op: str, timeout: float = 10.0, **fields: str) -> dict[str, Any]:
    """One request to a tapdisk's control socket; its reply (an ``error`` key if refused)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(control)
        _pid, uid = peer_uid(sock)
        if not allowed(uid):
            raise AttachError(f"{control} belongs to uid {uid}, not to us or root")
        sock.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise AttachError(f"the data path at {control} closed the connection")
            buf += chunk
            if len(buf) > MAX_REPLY:
                raise AttachError(f"the data path at {control} sent an over-long reply")
    except OSError as e:
        raise AttachError(f"cannot reach the data path at {control}: {e.strerror or e}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(buf)
    except (ValueError, RecursionError):
        raise AttachError(f"the data path at {control} sent a malformed reply") from None
    if not isinstance(reply, dict):
        raise AttachError(f"the data path at {control} sent a malformed reply")
    if "error" in reply:
        raise AttachError(f"the data path at {control}: {reply['error']}")
    return reply


def control_socket(att: Attachment) -> str:
    return os.path.join(att.tapdisk_dir, tapdisk.CONTROL_SOCKET)


def nbd_socket(att: Attachment) -> str:
    return os.path.join(att.tapdisk_dir, tapdisk.NBD_SOCKET)


def why_not_ours(att: Attachment) -> str | None:
    """None if ``att``'s tapdisk runs and is the one we started; else why not.

    A pid can be reused and files in the state directory could be anyone's, so three
    things must agree: the process runs our module for this directory
    (/proc/PID/cmdline), and its control socket answers with this pid and our token.
    """
    pid = att.tapdisk_pid
    if not pid or not att.tapdisk_dir:
        return "it has no data-path process"
    if not pid_alive(pid):
        return f"its data path (pid {pid}) is gone"
    cmd = cmdline(pid)
    if tapdisk.MODULE not in cmd or att.tapdisk_dir not in cmd:
        return f"pid {pid} is no longer its data path"
    try:
        status = request(control_socket(att), "status", timeout=5)
    except AttachError as e:
        return str(e)
    if status.get("pid") != pid or status.get("token") != att.token:
        return f"the data path at {att.tapdisk_dir} is not the one recorded"
    return None


def stats(att: Attachment) -> dict[str, Any]:
    return request(control_socket(att), "stats")


def tell_device(att: Attachment) -> None:
    """Let the tapdisk record its device and mount point (for whoever reads its record)."""
    request(control_socket(att), "device", device=att.device, mountdir=att.mountdir)


def stop(att: Attachment, proc: subprocess.Popen[bytes] | None, root: str) -> bool:
    """Ask the tapdisk to drain, flush and exit; wait for it; remove its directory.
    False: it closed the image without a last flush (its log says why)."""
    pid = att.tapdisk_pid
    alive = why_not_ours(att) is None
    flushed = True
    if alive:
        reply = request(control_socket(att), "stop", timeout=STOP_TIMEOUT)
        flushed = reply.get("flushed") is not False
        wait_exit(pid, proc, patience=STOP_TIMEOUT)
    elif proc is not None:
        wait_exit(pid, proc, patience=1.0)
    if att.tapdisk_dir:
        remove_dir(att.tapdisk_dir, root)
    return flushed
