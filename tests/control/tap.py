"""Helpers for the control-plane tests: a private state directory and the real CLI.

Every test gets its own short directory under /tmp (unix socket paths are limited to
108 bytes), runs ``python -m tapnbd ...`` as a subprocess exactly as a user would, and
on the way out unmounts what it mounted, stops its daemon, and undoes any device,
nbdfuse or daemon left behind, even when the test failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tapnbd.control.attach import cleanup_stale, cmdline, pid_alive
from tapnbd.control.client import Client
from tapnbd.control.state import StateDir
from tapnbd.control.tapdisk import MODULE
from tests.helpers import run, tapnbd_cmd

ROOT = Path(__file__).resolve().parents[2]


def need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def need_devices() -> None:
    """Skip unless we are root with FUSE and loop devices (attach needs all three)."""
    if os.geteuid() != 0:
        pytest.skip("needs root for losetup and mount")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("needs loop devices (/dev/loop-control)")
    need_tools("nbdfuse", "losetup", "fusermount3", "mkfs.ext4", "fsck.ext4", "mount", "umount")


def tapdisk_pids(state: Path) -> list[int]:
    """The data-path processes (tapnbd.control.tapdisk) serving under ``state``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not pid_alive(int(entry)):
            continue
        cmd = cmdline(int(entry))
        if MODULE in cmd and any(a.startswith(f"{state}/") for a in cmd):
            out.append(int(entry))
    return out


def kill_tapdisks(state: Path) -> None:
    for pid in tapdisk_pids(state):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Tapnbd:
    """The CLI, pointed at one state directory."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.state = base / "st"
        self.env = {
            **os.environ,
            "TAPNBD_STATE_DIR": str(self.state),
            # The daemon the CLI spawns (cwd "/") imports this checkout, not whatever
            # tapnbd the interpreter has installed.
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }
        self.env.pop("TAPNBD_METRICS", None)
        self.env.pop("TAPNBD_TCP", None)
        self.mounts: list[Path] = []
        self.procs: list[subprocess.Popen[Any]] = []

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return run(tapnbd_cmd(*args), check=False, timeout=timeout, env=self.env, cwd=ROOT)

    def ok(self, *args: str, timeout: float = 180) -> str:
        """Run; it must succeed. Its stdout."""
        proc = self.run(*args, timeout=timeout)
        assert proc.returncode == 0, (
            f"tapnbd {' '.join(args)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}\nlog: {self.log_tail()}"
        )
        return proc.stdout

    def fails(self, *args: str) -> str:
        """Run; it must fail. Its stderr."""
        proc = self.run(*args)
        assert proc.returncode != 0, f"tapnbd {' '.join(args)} succeeded: {proc.stdout}"
        return proc.stderr

    def status(self) -> dict[str, Any]:
        return json.loads(self.ok("daemon", "status", "--json"))  # type: ignore[no-any-return]

    def list(self) -> dict[str, Any]:
        return json.loads(self.ok("list", "--json"))  # type: ignore[no-any-return]

    def stats(self, name: str) -> dict[str, Any]:
        (one,) = json.loads(self.ok("stats", name, "--json"))
        return one  # type: ignore[no-any-return]

    def log_tail(self) -> str:
        try:
            return (self.state / "tapnbd.log").read_text()[-3000:]
        except OSError:
            return "(no log)"

    # Images and mounts.

    def image(self, name: str, fmt: str = "raw", size: str = "256M") -> Path:
        path = self.base / name
        if fmt == "raw":
            subprocess.run(["truncate", "-s", size, str(path)], check=True)
        else:
            need_tools("qemu-img")
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", fmt, str(path), size],
                check=True,
                capture_output=True,
            )
        return path

    def mount(self, device: str, *options: str) -> Path:
        point = self.base / f"mnt{len(self.mounts)}"
        point.mkdir(exist_ok=True)
        args = ["mount"] + (["-o", ",".join(options)] if options else []) + [device, str(point)]
        subprocess.run(args, check=True, capture_output=True, text=True)
        self.mounts.append(point)
        return point

    def umount(self, point: Path) -> None:
        subprocess.run(["umount", str(point)], check=True, capture_output=True, text=True)
        self.mounts.remove(point)

    # Clean-up, whatever state the test left.

    def cleanup(self) -> None:
        for point in reversed(self.mounts):
            if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], capture_output=True)
        self.mounts.clear()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        sd = StateDir(str(self.state))
        if sd.daemon_alive():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.run("daemon", "stop", "--all", "--force", timeout=90)
        if sd.daemon_alive():
            pid = sd.read_pid()
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while sd.daemon_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.state.exists():
            Client(str(self.state), report=lambda msg: None).recover()
            kill_tapdisks(self.state)  # data paths outlive the daemon: end ours
            cleanup_stale([], str(self.state / "attach"))
        shutil.rmtree(self.base, ignore_errors=True)
