"""Boot the kernel VM (../shared/kernel-vm/run-guest) with a guest script; read what it says.

The guest talks back on its console: lines starting with ``@@`` are for the test
(``@@T LABEL UPTIME`` times a step, ``@@SUM SET PATH SHA256`` records a file's checksum,
``@@MARK NAME`` asks the host to act, ``@@FAIL WHY`` explains a failure). The host can
answer a mark only through the NBD server, so a guest that must wait for the host reads
a doorbell export until the host has written to it (see ``DOORBELL``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import ROOT, run

RUN_GUEST = Path(os.environ.get("KERNEL_VM_RUN_GUEST", ROOT.parent / "shared/kernel-vm/run-guest"))
#: The server as the guest sees it (QEMU user networking forwards it to the host socket).
HOST = "10.0.2.100"
PORT = 10809
#: `-cpu max` gives the guest RDRAND, so its CRNG is ready at boot: without it mke2fs
#: waits seconds for entropy under software emulation.
QEMU_OPTIONS = ["-cpu", "max"]
DOORBELL_TEXT = b"RING"

#: Shell functions every guest script starts with (busybox sh).
PRELUDE = f"""
S={HOST}
P={PORT}
t() {{ echo "@@T $1 $(cut -d' ' -f1 /proc/uptime)"; }}
fail() {{ echo "@@FAIL $*"; exit 1; }}
# A tree of files of awkward sizes: empty, one byte, around a page, past 64K, megabytes.
tree() {{
  mkdir -p $1/a/b/c $1/e || return 1
  : > $1/empty
  dd if=/dev/urandom of=$1/one bs=1 count=1 2>/dev/null
  dd if=/dev/urandom of=$1/a/odd bs=4095 count=1 2>/dev/null
  dd if=/dev/urandom of=$1/a/b/page bs=4096 count=1 2>/dev/null
  dd if=/dev/urandom of=$1/a/b/c/mid bs=65537 count=1 2>/dev/null
  dd if=/dev/urandom of=$1/e/big bs=1M count=${{2:-4}} 2>/dev/null || return 1
  for i in 1 2 3 4 5 6; do echo "small $i of $1" > $1/e/s$i; done
}}
# sums DIR SET: one @@SUM line per file under DIR, paths relative to DIR.
sums() {{
  (cd $1 && find . -type f | sort | xargs sha256sum) | while read h p; do
    echo "@@SUM $2 ${{p#./}} $h"
  done
}}
# wait_doorbell DEV: the host writes {DOORBELL_TEXT.decode()} at the start of the doorbell export.
wait_doorbell() {{
  n=0
  until dd if=$1 bs=512 count=1 iflag=direct 2>/dev/null | grep -q {DOORBELL_TEXT.decode()}; do
    n=$((n+1)); [ $n -gt 600 ] && fail "no doorbell"; sleep 0.2
  done
}}
"""


def need_vm() -> None:
    """Skip unless the kernel VM harness is here (it installs its own packages as root)."""
    if not RUN_GUEST.exists():
        pytest.skip(f"no kernel VM harness at {RUN_GUEST}")
    if shutil.which("qemu-system-x86_64") is None and os.geteuid() != 0:
        pytest.skip("run-guest needs root once to install qemu-system-x86")
    for tool in ("stdbuf", "debugfs", "e2fsck", "mkfs.ext4", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.skip(f"not installed: {tool} (make test installs it)")


@dataclass
class GuestRun:
    rc: int
    lines: list[str]
    seconds: float  # from starting run-guest to its exit
    arrived: dict[str, float] = field(default_factory=dict)  # host time of each @@T, from start

    def tagged(self, tag: str) -> list[list[str]]:
        return [line.split()[1:] for line in self.lines if line.split()[:1] == [f"@@{tag}"]]

    def sums(self, name: str) -> dict[str, str]:
        return {f[1]: f[2] for f in self.tagged("SUM") if f[0] == name}

    def uptime(self, label: str) -> float:
        return next(float(f[1]) for f in self.tagged("T") if f[0] == label)

    def console(self) -> str:
        return "\n".join(self.lines[-80:])


@contextlib.contextmanager
def _first_boot() -> Iterator[None]:
    """run-guest unpacks Debian's kernel into one cache on its first boot (its "kver"
    file is written last): a boot by the other pytest-xdist worker at the same time
    would unpack into it too, so the first boot holds a lock that the others wait on."""
    cache = Path(os.environ.get("KERNEL_VM_CACHE", str(Path.home() / ".cache" / "kernel-vm")))
    if (cache / "kver").exists():
        yield
        return
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / "kernel-vm.tapnbd-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_guest(
    sock: Path,
    script: str,
    workdir: Path,
    on_mark: Callable[[str], None] | None = None,
    timeout: float = 240,
    qemu_options: tuple[str, ...] = (),
) -> GuestRun:
    """Boot the VM with ``PRELUDE + script`` as its guest script; call ``on_mark`` on marks."""
    with _first_boot():
        return _run_guest(sock, script, workdir, on_mark, timeout, qemu_options)


def _run_guest(
    sock: Path,
    script: str,
    workdir: Path,
    on_mark: Callable[[str], None] | None,
    timeout: float,
    qemu_options: tuple[str, ...],
) -> GuestRun:
    path = workdir / "guest.sh"
    path.write_text(PRELUDE + script)
    env = {**os.environ, "KERNEL_VM_TIMEOUT": str(int(timeout))}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        # stdbuf's LD_PRELOAD reaches the harness's `tr | tee` pipeline: the console
        # then arrives line by line, so the host can act on a mark while the guest waits.
        ["stdbuf", "-oL", str(RUN_GUEST), str(sock), str(path), "--", *QEMU_OPTIONS, *qemu_options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=env,
        start_new_session=True,  # so a failed test can stop QEMU too, not just the script
    )
    assert proc.stdout is not None
    lines: list[str] = []
    arrived: dict[str, float] = {}
    try:
        for raw in proc.stdout:
            line = raw.rstrip("\n").replace("\r", "")
            if (at := line.find("@@")) > 0:
                line = line[at:]  # after the firmware's escape codes, on the same line
            lines.append(line)
            words = line.split()
            if words[:1] == ["@@T"] and len(words) > 1:
                arrived[words[1]] = time.monotonic() - t0
            elif words[:1] == ["@@MARK"] and len(words) > 1 and on_mark is not None:
                on_mark(words[1])
        rc = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    (workdir / "console.log").write_text("\n".join(lines))
    return GuestRun(rc, lines, time.monotonic() - t0, arrived)


def ring(doorbell: Path) -> None:
    """Answer a guest waiting in wait_doorbell."""
    with open(doorbell, "r+b") as f:
        f.write(DOORBELL_TEXT)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def to_raw(image: Path, out: Path, fmt: str) -> Path:
    """A raw copy made by qemu-img, the referee (-U: the server may still hold the image)."""
    run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(image), str(out)])
    return out


def ext4_files(raw: Path, directory: str, workdir: Path) -> dict[str, str]:
    """SHA-256 of every file under DIRECTORY in an ext4 image, read by debugfs (no mount)."""
    run(["e2fsck", "-fn", str(raw)])
    out = workdir / f"rdump-{raw.name}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    run(["debugfs", "-R", f"rdump {directory} {out}", str(raw)])
    top = out / Path(directory).name
    return {str(p.relative_to(top)): sha256(p.read_bytes()) for p in top.rglob("*") if p.is_file()}
