"""Test helpers: start ``tapnbd serve`` as a real process and talk to it with real clients."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import clifork

ROOT = Path(__file__).resolve().parents[1]
#: libnbd's Python bindings are Debian's, for Debian's interpreter.
SYSTEM_PYTHON = "/usr/bin/python3"


def need(*tools: str) -> None:
    """Skip the calling test unless every tool is installed (make test installs them)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (make test installs them)")


def need_root_devices() -> None:
    """Skip unless we can use loop devices and FUSE as root."""
    if os.geteuid() != 0:
        pytest.skip("needs root for losetup and mount")
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs /dev/fuse and /dev/loop-control")


def tapnbd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tapnbd", *args]


def run(
    cmd: list[str], *, check: bool = True, timeout: float = 120, **kw: object
) -> subprocess.CompletedProcess[str]:
    proc: subprocess.CompletedProcess[str] | None = None
    if cmd[:3] == tapnbd_cmd() and clifork.ENABLED and set(kw) <= {"cwd", "env"}:
        # A fresh process all the same, forked without the interpreter's start-up.
        proc = clifork.SERVER.run(cmd[3:], kw.get("cwd"), kw.get("env"), timeout)  # type: ignore[arg-type]
    if proc is None:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def nbdsh_script(script: str, *args: str, timeout: float = 60) -> object:
    """Run a libnbd Python script under the system interpreter; it prints one JSON value."""
    need(SYSTEM_PYTHON)
    if run([SYSTEM_PYTHON, "-c", "import nbd"], check=False).returncode != 0:
        pytest.skip("python3-libnbd is not installed")
    # The servers it starts (socket activation) go with it, not left serving.
    try:
        proc = run_in_session([SYSTEM_PYTHON, "-c", script, *args], timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"a libnbd script ran past {timeout}s; stderr: {e.stderr!r}") from None
    if proc.returncode != 0:
        raise AssertionError(f"a libnbd script exited {proc.returncode}\nstderr: {proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_in_session(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in a session of its own, and end whatever it started in that session
    when it returns or runs past ``timeout`` (then subprocess.TimeoutExpired, its
    stderr kept)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


#: tapnbd and qemu-nbd, each over its copy of one qcow2 image (on_copies); both unmap
#: on TRIM (qemu-nbd's default ignores it).
QCOW2_SERVERS: dict[str, Callable[[Path], list[str]]] = {
    "tapnbd": lambda img: tapnbd_cmd("serve", "-f", "qcow2", str(img)),
    "qemu": lambda img: ["qemu-nbd", "-f", "qcow2", "--discard=unmap", str(img)],
}


def on_copies(
    src: Path, servers: dict[str, Callable[[Path], list[str]]], script: str, *args: str
) -> dict[str, tuple[Path, object]]:
    """Run a libnbd ``script`` (nbdsh_script; ``args`` before the server's command)
    against each server, each over its own copy of ``src`` named after it: the same
    requests to tapnbd and its referee. Name -> (the copy, what the script printed)."""
    out = {}
    for who, server in servers.items():
        img = src.with_name(f"{who}{src.suffix}")
        shutil.copyfile(src, img)
        out[who] = (img, nbdsh_script(script, *args, *server(img)))
    return out


def stop_process(proc: subprocess.Popen[str], sig: int, timeout: float) -> int:
    """Signal ``proc`` and wait; SIGKILL it if it outlives ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class Server:
    """A running ``tapnbd serve``."""

    proc: subprocess.Popen[str]
    uris: list[str]
    log: Path

    @property
    def uri(self) -> str:
        return self.uris[0]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        return stop_process(self.proc, sig, timeout)

    def stderr(self) -> str:
        return self.log.read_text()

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 30) -> str:
        """Wait until ``text`` appears ``count`` times in the server's log (an event the
        server announces); fail, with the log, if it has not after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while (log := self.stderr()).count(text) < count:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{text!r} x{count} not logged in {timeout}s:\n{log}")
            time.sleep(0.02)
        return log


def start_server(args: list[str], log: Path, exports: int = 1, timeout: float = 30) -> Server:
    """Start ``tapnbd serve ARGS`` and wait for its URI lines (nbdkit --print-uri style)."""
    if "--port" not in args and "-p" not in args and "--socket" not in args:
        args = [*args, "--port", "0"]
    with open(log, "w") as err:
        proc = subprocess.Popen(
            tapnbd_cmd("serve", *args), stdout=subprocess.PIPE, stderr=err, text=True
        )
    uris = read_ready_lines(proc, exports, log, timeout, "server").split()
    return Server(proc, uris, log)


def read_ready_lines(
    proc: subprocess.Popen[str], lines: int, log: Path, timeout: float, what: str
) -> str:
    """Wait for ``lines`` lines on ``proc``'s stdout (its "ready" announcement)."""
    assert proc.stdout is not None
    # Read the raw fd: a buffered readline() could swallow lines select() then misses.
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while buf.count(b"\n") < lines:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            proc.kill()
            raise AssertionError(f"{what} not ready in {timeout}s: {log.read_text()}")
        chunk = os.read(fd, 4096)
        if not chunk:
            proc.wait()
            raise AssertionError(f"{what} exited {proc.returncode}: {log.read_text()}")
        buf += chunk
    return buf.decode()


def open_fds(pid: int) -> int:
    """How many file descriptors process ``pid`` holds (a server: one per connection)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_fds(pid: int, at_most: int, within: float = 30) -> int:
    """Wait until ``pid`` holds at most ``at_most`` descriptors, e.g. until a server has
    let go of closed connections; how many it holds. ``within`` only guards a hang."""
    deadline = time.monotonic() + within
    while (n := open_fds(pid)) > at_most and time.monotonic() < deadline:
        time.sleep(0.02)
    return n


def fio_verify(uri: str, *options: str, timeout: float = 300) -> dict[str, Any]:
    """fio's nbd engine writing ``options``' pattern, then reading every block back and
    checking its crc32c; returns fio's job report (its "error" must be 0)."""
    need("fio")
    out = run(
        [
            "fio",
            "--name=verify",
            "--ioengine=nbd",
            f"--uri={uri}",
            *options,
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
            "--group_reporting",
            "--output-format=json",
        ],
        timeout=timeout,
    ).stdout
    job: dict[str, Any] = json.loads(out[out.index("{") :])["jobs"][0]
    return job


def qemu_io(target: str | Path, *commands: str, fmt: str = "raw", read_only: bool = False) -> str:
    """Run qemu-io commands on a file or URI; a failed command or ``read -P`` check fails."""
    need("qemu-io")
    args: list[str] = ["qemu-io", "-f", fmt, *(["-r"] if read_only else [])]
    for c in commands:
        args += ["-c", c]
    out = run([*args, str(target)]).stdout
    assert "Pattern verification failed" not in out, out
    assert "failed" not in out and "error" not in out.lower(), out
    return out
