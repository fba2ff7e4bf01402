"""``serve --fork`` and qemu-nbd's other spellings (-x, -D, -b, -e, -t, --pid-file)."""

from __future__ import annotations

import json
import os
import select
import signal
from pathlib import Path

from tests.helpers import need, run, tapnbd_cmd


def wait_exit(pid: int, timeout: float = 30) -> None:
    """Wait for a process that is not our child to end (its pidfd becomes readable)."""
    fd = os.pidfd_open(pid)
    try:
        assert select.select([fd], [], [], timeout)[0], f"{pid} still runs"
    finally:
        os.close(fd)


def test_fork_returns_once_serving_and_leaves_no_pipe_open(tmp_path: Path) -> None:
    """The parent exits 0 once clients can connect; the caller's pipes are let go, so
    reading the output to its end returns; SIGTERM to the pidfile's pid stops it."""
    need("nbdinfo")
    img = tmp_path / "a.raw"
    img.write_bytes(bytes(1 << 20))
    sock, pidfile = tmp_path / "s.sock", tmp_path / "pid"
    out = run(
        tapnbd_cmd("serve", "--fork", "-t", "-x", "disk", "-D", "the disk", "-e", "4",
                   "--pid-file", str(pidfile), "-k", str(sock), "-f", "raw", str(img)),
        timeout=60,
    )  # fmt: skip
    uri = f"nbd+unix:///disk?socket={sock}"
    assert out.stdout.split() == [uri]
    pid = int(pidfile.read_text())
    info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    assert info["exports"][0]["export-name"] == "disk"
    assert info["exports"][0]["description"] == "the disk"
    os.kill(pid, signal.SIGTERM)
    wait_exit(pid)
    assert not pidfile.exists()


def test_fork_reports_a_failure_to_start(tmp_path: Path) -> None:
    out = run(
        tapnbd_cmd("serve", "--fork", "-p", "0", "-f", "raw", str(tmp_path / "missing.raw")),
        check=False,
    )
    assert out.returncode == 1
    assert "missing.raw: no such file" in out.stderr
