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
JOB_SIZE = 24 << 20
#: A slow writer, so that three daemon restarts fit inside its write phase (12 s): a
#: kill at each quarter of it, 3 s apart, each followed by a CLI call that re-adopts.
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
        mark = total * round_ // 4
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


# The kernel-VM variant: the guest's own kernel nbd client on the data path's socket.

MiB = 1 << 20
VM_IMAGE = 128 * MiB
#: The file system takes the first 120 MiB; the host rings the guest at 124 MiB.
FS_BLOCKS = 120 * MiB // 4096
BELL = 124 * MiB

VM_SCRIPT = f"""
t boot
nbd-client $S $P /dev/nbd0 -N vmcrash.img -t 30 >/dev/null || fail attach
mkfs.ext4 -q -F -b 4096 /dev/nbd0 {FS_BLOCKS} || fail mkfs
mount -t ext4 -o noatime /dev/nbd0 /mnt && mkdir /mnt/d || fail mount
# Writes go on, each file synced, until the host has killed its daemon three times;
# 64 files written over and over, so the file system never fills up.
writer() {{
  i=0
  while [ ! -f /tmp/stop ]; do
    dd if=/dev/urandom of=/mnt/d/w$((i % 64)) bs=64k count=4 conv=fsync 2>/dev/null \\
      || {{ echo "@@FAIL write $i"; return 1; }}
    i=$((i+1))
    echo $i > /tmp/count
  done
  echo "@@WROTE $i"
}}
echo 0 > /tmp/count
writer & W=$!
for r in 1 2 3; do
  # Progress first (three more files), then the kill, while the writer keeps going.
  want=$(($(cat /tmp/count) + 3))
  until [ $(cat /tmp/count) -ge $want ]; do sleep 0.1; done
  echo "@@MARK kill$r"
  # 4 KiB direct reads: the kernel's nbd device may have 4 KiB logical blocks.
  n=0
  until dd if=/dev/nbd0 bs=4096 skip={BELL // 4096} count=1 iflag=direct 2>/dev/null \\
      | grep -q RING$r; do
    n=$((n+1)); [ $n -gt 1500 ] && fail "no bell $r"; sleep 0.2
  done
done
touch /tmp/stop
wait $W || fail writer
sync
sums /mnt/d data
umount /mnt && fsck.ext4 -fn /dev/nbd0 >/dev/null || fail fsck
nbd-client -d /dev/nbd0 >/dev/null 2>&1
t end
"""


@pytest.mark.vm
@pytest.mark.timeout(900)  # a software-emulated VM on a loaded machine
def test_vm_disk_survives_three_daemon_kills(tap: Tapnbd, tmp_path: Path) -> None:
    from tests.kernel.vm import ext4_files, need_vm, run_guest

    need_vm()
    image = tap.base / "vmcrash.img"
    with open(image, "wb") as f:
        f.truncate(VM_IMAGE)
    sock = tap.ok("attach", "--via", "socket", str(image)).strip()
    (tapdisk,) = tapdisk_pids(tap.state)
    sd = StateDir(str(tap.state))
    kills: list[int] = []

    def on_mark(name: str) -> None:
        if not name.startswith("kill"):
            return
        r = int(name[4:])
        if r == 1:  # the guest's disk: detaching it under the VM is refused
            assert "1 client connected" in tap.fails("detach", sock)
        pid = tap.status()["pid"]
        os.killpg(os.getpgid(pid), signal.SIGKILL)
        while sd.daemon_alive():
            time.sleep(0.01)
        listed = tap.run("list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert f"re-adopted {sock}" in listed.stderr, listed.stderr
        assert [a["device"] for a in json.loads(listed.stdout)["attachments"]] == [sock]
        assert tapdisk_pids(tap.state) == [tapdisk]
        kills.append(pid)
        with open(image, "r+b") as f:  # past the file system: the guest's doorbell
            f.seek(BELL)
            f.write(f"RING{r}".encode())

    result = run_guest(Path(sock), VM_SCRIPT, tmp_path, on_mark, timeout=600)
    assert result.rc == 0, result.console()
    assert len(kills) == 3 and not result.tagged("FAIL"), result.console()
    (wrote,) = result.tagged("WROTE")
    assert int(wrote[0]) >= 9
    data = result.sums("data")
    assert len(data) == min(64, int(wrote[0]))
    assert ext4_files(image, "/d", tmp_path) == data  # e2fsck -fn, then the files' bytes
    tap.ok("detach", sock)
    assert tapdisk_pids(tap.state) == []
