"""kill -9 during a write load, then check the image: the crash-safety test (issues 3, 8).

One round: create a qcow image (optimised or normal layout), serve it (``tapnbd serve``,
or an export of ``tapnbd daemon``), run ``nbdload.py`` against it (libnbd: writes,
periodic FLUSH, some FUA), SIGKILL the server at a random moment, then

- ``tapnbd check``: no corruption (leaked clusters are allowed: a crash leaks what was
  allocated after the last flush; a stale checksum too, the next open handles it);
- ``qemu-img convert -f qcow -O raw``: qemu reads it, and every sector holds what the
  model allows (model.py): each write acknowledged before the last completed FLUSH (or
  with FUA) is there, later sectors are old or new data, never garbage;
- ``tapnbd serve`` opens it again and ``nbdcopy`` reads the same bytes qemu did.

``make crash`` runs this module 50 times per layout plus the daemon variant::

    python -m tests.reliability.crash --rounds 50 [--daemon 10] [--layout optimised]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import SYSTEM_PYTHON, run, start_server, tapnbd_cmd
from tests.reliability.model import Journal, Verdict, verify

LOAD = Path(__file__).with_name("nbdload.py")
LAYOUTS = {"optimised": ["--optimise"], "normal": ["--no-optimise"]}
#: Virtual size; the load writes below REGION, so a round's data stays small.
SIZE = "1G"
REGION = 256 << 20
#: check exit codes a crash may leave: 0 clean, 3 leaked clusters, 4 stale checksum.
CHECK_OK = (0, 3, 4)


@dataclass
class Round:
    """One crash and what was found afterwards."""

    layout: str
    seed: int
    kill_after: float
    writes: int = 0
    acked: int = 0
    lost: int = 0  # in flight when the server died
    flushes: int = 0
    durable: int = 0  # writes the model says must have survived
    sectors: int = 0
    must: int = 0  # sectors with exactly one allowed content
    newer: int = 0  # sectors showing a write after the durable one
    check: int = -1
    failures: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def row(self) -> str:
        return (
            f"{self.layout:9} seed={self.seed:<10} kill@{self.kill_after:4.2f}s "
            f"writes={self.writes:5} acked={self.acked:5} lost={self.lost:3} "
            f"flushes={self.flushes:3} durable={self.durable:5} sectors={self.sectors:6} "
            f"must={self.must:6} newer={self.newer:4} check={self.check} "
            f"{'OK' if self.ok else 'FAIL'} ({self.seconds:.1f}s)"
        )


def start_load(uri: str, seed: int, out: Path, region: int = REGION) -> subprocess.Popen[bytes]:
    with open(out, "wb") as f:
        return subprocess.Popen(
            [
                SYSTEM_PYTHON,
                str(LOAD),
                uri,
                "--seed",
                str(seed),
                "--duration",
                "60",
                "--region",
                str(region),
                "--qd",
                "16",
                "--flush-every",
                "48",
            ],
            stdout=f,
            stderr=subprocess.PIPE,
        )


def wait_load(load: subprocess.Popen[bytes], out: Path) -> Journal:
    try:
        _, err = load.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        load.kill()
        raise AssertionError("the writer did not stop after the server died") from None
    if load.returncode != 0:
        raise AssertionError(f"nbdload exited {load.returncode}: {err.decode()[-2000:]}")
    return Journal.from_json(json.loads(out.read_text()))


def wait_writing(load: subprocess.Popen[bytes], uri: str, timeout: float = 20) -> None:
    """Wait until the writer is connected (its connection shows in /proc/net)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if load.poll() is not None:
            return
        if _connected(load.pid):
            return
        time.sleep(0.02)


def _connected(pid: int) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                return True
        except OSError:
            pass
    return False


def check_image(image: Path, journal: Journal, work: Path, r: Round) -> None:
    """Everything after the crash: check, qemu's reading, ours, the model."""
    failures: list[str] = []
    proc = run(tapnbd_cmd("check", str(image)), check=False)
    r.check = proc.returncode
    if proc.returncode not in CHECK_OK:
        failures.append(f"tapnbd check exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    qemu_raw = work / "qemu.raw"
    proc = run(
        ["qemu-img", "convert", "-f", "qcow", "-O", "raw", str(image), str(qemu_raw)], check=False
    )
    if proc.returncode != 0:
        failures.append(f"qemu-img convert failed: {proc.stderr}")
    else:
        v: Verdict = verify(qemu_raw, journal, crashed=True)
        r.sectors, r.must, r.newer = v.sectors, v.must, v.newer
        failures += [f"qemu's reading: {f}" for f in v.failures]
        if v.failure_count > len(v.failures):
            failures.append(f"... {v.failure_count} wrong sectors in all")
        # Our own reading of the same image, through a fresh server and a real client.
        ours = work / "ours.raw"
        server = start_server([str(image)], work / "reopen.log")
        try:
            proc = run(["nbdcopy", server.uri, str(ours)], check=False)
        finally:
            code = server.stop()
        if proc.returncode != 0:
            failures.append(f"nbdcopy from the reopened image failed: {proc.stderr}")
        elif not filecmp.cmp(qemu_raw, ours, shallow=False):
            failures.append("tapnbd reads the crashed image differently from qemu")
        if code != 0:
            failures.append(f"the reopened server exited {code}: {server.stderr()[-1000:]}")
        # After a clean close, nothing is corrupt and the checksum is current again.
        proc = run(tapnbd_cmd("check", str(image)), check=False)
        if proc.returncode not in (0, 3):
            failures.append(f"check after a clean reopen exited {proc.returncode}: {proc.stdout}")
    r.failures = (*r.failures, *failures)


def fill_journal_figures(r: Round, j: Journal) -> None:
    r.writes, r.acked, r.lost = len(j.writes), len(j.acks), j.count("lost")
    r.flushes, r.durable = len(j.flush_cuts), len(j.durable())
    if j.hang:
        r.failures = (*r.failures, "the writer saw a hang before the kill")
    if not j.dead:
        r.failures = (*r.failures, "the writer's connection did not die with the server")
    unexpected = {e: n for e, n in j.errors.items() if e not in ("ENOTCONN", "ESHUTDOWN")}
    if unexpected and r.layout != "daemon":
        r.failures = (*r.failures, f"writes failed before the kill: {unexpected}")


def crash_round(
    work: Path,
    layout: str,
    seed: int,
    *,
    size: str = SIZE,
    region: int = REGION,
    latest: float = 1.5,
) -> Round:
    """One round against ``tapnbd serve`` (layout: optimised or normal)."""
    rng = random.Random(seed)
    r = Round(layout, seed, kill_after=rng.uniform(0.1, latest))
    t0 = time.monotonic()
    image = work / f"{layout}.qcow"
    run(tapnbd_cmd("create", str(image), "--size", size, *LAYOUTS[layout]))
    server = start_server([str(image)], work / "server.log")
    out = work / "journal.json"
    load = start_load(server.uri, seed, out, region)
    try:
        wait_writing(load, server.uri)
        time.sleep(r.kill_after)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        journal = wait_load(load, out)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
        server.stop()
    fill_journal_figures(r, journal)
    check_image(image, journal, work, r)
    r.seconds = time.monotonic() - t0
    return r


def daemon_round(work: Path, seed: int) -> Round:
    """kill -9 of ``tapnbd daemon`` while a client writes through an export it serves."""
    from tests.control.tap import Tapnbd

    rng = random.Random(seed)
    layout = rng.choice(sorted(LAYOUTS))
    r = Round("daemon", seed, kill_after=rng.uniform(0.2, 1.5))
    t0 = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="tnbd-", dir="/tmp"))  # short: unix socket paths
    tap = Tapnbd(base)
    try:
        image = work / "daemon.qcow"
        run(tapnbd_cmd("create", str(image), "--size", SIZE, *LAYOUTS[layout]))
        tap.ok("daemon", "start")
        uris = tap.ok("export", "add", str(image), "--name", "crash").split()
        uri = next(u for u in uris if u.startswith("nbd+unix://"))  # NBD is unix-only by default
        pid = tap.status()["pid"]
        out = work / "journal.json"
        load = start_load(uri, seed, out)
        try:
            wait_writing(load, uri)
            time.sleep(r.kill_after)
            os.kill(pid, signal.SIGKILL)
            journal = wait_load(load, out)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        while _alive(pid):
            time.sleep(0.01)
        # Nothing may still hold the image open (the daemon is gone) before we check it.
        fill_journal_figures(r, journal)
        check_image(image, journal, work, r)
    finally:
        tap.cleanup()
    r.seconds = time.monotonic() - t0
    return r


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=50, help="rounds per layout")
    p.add_argument("--layout", action="append", choices=sorted(LAYOUTS))
    p.add_argument("--daemon", type=int, default=10, help="rounds killing tapnbd daemon")
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args()
    master = random.Random(a.seed)
    plan = [
        (lay, master.randrange(1 << 30))
        for lay in a.layout or sorted(LAYOUTS)
        for _ in range(a.rounds)
    ]
    plan += [("daemon", master.randrange(1 << 30)) for _ in range(a.daemon)]
    results: list[Round] = []
    t0 = time.monotonic()
    for layout, seed in plan:
        work = Path(tempfile.mkdtemp(prefix="crash-", dir=os.environ.get("TMPDIR", "/tmp")))
        try:
            r = daemon_round(work, seed) if layout == "daemon" else crash_round(work, layout, seed)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        results.append(r)
        print(r.row(), flush=True)
        for f in r.failures:
            print("    " + f, flush=True)
    print()
    for layout in [*(a.layout or sorted(LAYOUTS)), "daemon"]:
        rs = [r for r in results if r.layout == layout]
        if not rs:
            continue
        print(
            f"{layout}: {len(rs)} kills, {sum(r.ok for r in rs)} images intact; "
            f"{sum(r.writes for r in rs)} writes, {sum(r.acked for r in rs)} acknowledged, "
            f"{sum(r.durable for r in rs)} durable by FLUSH/FUA, all checked: "
            f"{sum(r.must for r in rs)} sectors with one allowed content, "
            f"{sum(r.newer for r in rs)} sectors newer than required; "
            f"leaks (check=3) in {sum(r.check == 3 for r in rs)}, "
            f"stale checksum (check=4) in {sum(r.check == 4 for r in rs)}"
        )
    bad = [r for r in results if not r.ok]
    print(
        f"\n{len(results)} kills in {time.monotonic() - t0:.0f}s: "
        f"{len(bad)} failed, data lost: {'none' if not bad else 'SEE ABOVE'}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
