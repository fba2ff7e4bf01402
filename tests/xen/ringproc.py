"""Start ``tapnbd ring serve`` as a real process for the tests in this directory."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tapnbd.xen.xenstore import XenbusState, XenStore, backend_dir
from tests.helpers import read_ready_lines, stop_process, tapnbd_cmd

BACKEND = backend_dir(1, 51712)

RingFactory = Callable[..., "RingServer"]


@dataclass
class RingServer:
    """A running ``tapnbd ring serve``; ``path`` is the vbd directory."""

    proc: subprocess.Popen[str]
    path: Path
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        return stop_process(self.proc, sig, timeout)

    def stderr(self) -> str:
        return self.log.read_text()

    def wait_log(self, text: str, count: int = 1, timeout: float = 10) -> None:
        """Until the backend has logged ``count`` lines containing ``text``."""
        deadline = time.monotonic() + timeout
        while self.stderr().count(text) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"backend did not log {text!r} x{count}: {self.stderr()}")
            time.sleep(0.01)

    def peak_rss(self) -> int:
        """The backend's peak resident memory in bytes (VmHWM)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def state(self) -> XenbusState:
        return XenStore(self.path).state(BACKEND)

    def wait_state(self, *states: XenbusState, timeout: float = 10) -> XenbusState:
        deadline = time.monotonic() + timeout
        while (st := self.state()) not in states:
            if time.monotonic() > deadline:
                raise AssertionError(f"backend is {st.name}, not {states}: {self.stderr()}")
            time.sleep(0.01)
        return st


def start_ring(image: str, path: Path, log: Path, *args: str, timeout: float = 30) -> RingServer:
    """Start the backend and wait for the line it prints once in InitWait."""
    with open(log, "w") as err:
        proc = subprocess.Popen(
            tapnbd_cmd("ring", "serve", image, "--path", str(path), "--verbose", *args),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    line = read_ready_lines(proc, 1, log, timeout, "ring server")
    assert Path(line.strip()) == path.resolve()
    return RingServer(proc, path, log)
