"""The data path outlives the daemon: kill -9 the daemon three times under a mounted,
busy ext4, and nothing notices.

fio writes files with crc32c verification headers onto an ext4 on an attached device
(nbdfuse + loop on this host), with O_DIRECT and frequent fsyncs so that its writes go
down through the device and the data-path process while the daemon dies. Each kill
waits for fio's files to grow past a mark (progress, not time), and after each one the
next CLI call must re-adopt the attachment with the very same processes. At the end fio
must have seen no error and its verify pass, and fsck must find the file system clean.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from tapnbd.control.state import StateDir
from tests.control.tap import Tapnbd, need_tools, tapdisk_pids
from tests.control.test_daemon import nbdfuse_pids

pytestmark = [pytest.mark.root, pytest.mark.slow]

JOBS = 2
JOB_SIZE = 40 << 20
#: A slow writer, so that three daemon restarts fit inside its write phase.
RATE = "2m"


def written(point: Path) -> int:
    total = 0
    for entry in point.iterdir():
        if entry.name.startswith("crash."):
            total += entry.stat().st_size
    return total


def grown(point: Path, mark: int) -> bool:
    return written(point) >= mark


def wait_until(
    what: str, cond: Callable[[], bool], fio: subprocess.Popen[str], timeout: float = 120
) -> None:
    """Poll ``cond`` (a callable) until true; fail if fio exits first or on a hang."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert fio.poll() is None, f"fio ended (status {fio.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_fio_on_ext4_survives_three_daemon_kills(devtap: Tapnbd) -> None:
    tap = devtap
    need_tools("fio")
    image = tap.image("crash.img", size="256M")
    device = tap.ok("attach", "--via", "fuse", str(image)).strip()
    subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, capture_output=True)
    point = tap.mount(device)
    taps, fuses = tapdisk_pids(tap.state), nbdfuse_pids(tap.state)
    assert len(taps) == 1 and len(fuses) == 1

    fio = subprocess.Popen(
        [
            "fio",
            "--name=crash",
            f"--directory={point}",
            "--rw=write",
            "--bs=64k",
            f"--size={JOB_SIZE}",
            f"--numjobs={JOBS}",
            f"--rate={RATE}",
            "--direct=1",
            "--fsync=4",
            "--fallocate=none",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    tap.procs.append(fio)
    total = JOBS * JOB_SIZE
    sd = StateDir(str(tap.state))
    for round_ in range(1, 4):
        print(f"round {round_}: {written(point)} bytes written")
        mark = total * round_ // 5
        wait_until(f"{mark} bytes written", partial(grown, point, mark), fio)
        pid = tap.status()["pid"]
        os.killpg(os.getpgid(pid), signal.SIGKILL)  # the daemon and its whole group
        wait_until("the daemon to die", lambda: not sd.daemon_alive(), fio)
        assert fio.poll() is None, "fio finished before the kill: slow it down"
        listed = tap.run("list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert f"(pid {pid}) is not running: it died" in listed.stderr
        assert f"re-adopted {device}" in listed.stderr, listed.stderr
        assert [a["device"] for a in json.loads(listed.stdout)["attachments"]] == [device]
        # The same data path, untouched: no restart under the mounted file system.
        assert tapdisk_pids(tap.state) == taps and nbdfuse_pids(tap.state) == fuses

    out, err = fio.communicate(timeout=600)
    assert fio.returncode == 0, f"fio failed: {err}\n{out[-3000:]}"
    report = json.loads(out[out.index("{") :])
    assert [job["error"] for job in report["jobs"]] == [0] * JOBS, out[-3000:]
    verified = sum(job["read"]["io_bytes"] for job in report["jobs"])
    assert verified == total  # every block read back and its crc32c checked

    stats = tap.stats("crash.img")
    assert stats["ops"]["write"]["ops"] > 0 and stats["errors_by_errno"] == {}
    tap.umount(point)
    fsck = subprocess.run(["fsck.ext4", "-fn", device], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    tap.ok("detach", device)
    assert tapdisk_pids(tap.state) == [] and nbdfuse_pids(tap.state) == []
