"""Soak: 100 concurrent fio connections with crc32c verification against raw and qcow.

    python -m bench.soak [--connections 100] [--duration 60] [--rss-limit 512]

One ``tapnbd serve`` process serves a raw image and an (optimised) qcow image. Half the
connections go to each: every connection is one fio job (``--ioengine=nbd --thread``)
writing random blocks of 4-64 KiB in its own region and reading them back with
``--verify=crc32c --verify_backlog``, so data is checked all through the run, not only
at the end. The server's RSS is sampled every half second.

Passes when every job ends with no error and no verify mismatch, the server is still
alive and answers, and its RSS never exceeded ``--rss-limit`` MiB. The default, 256 MiB,
is about three times the peak measured with 100 connections (89 MiB): a leak per
request (over 20 GiB move in a minute) or per connection would cross it. Exit 1 on
failure, with the figures on stdout either way (``make soak``).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20


@dataclass
class Sampler:
    """Samples a process's RSS (VmRSS) until stopped."""

    pid: int
    interval: float = 0.5
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                self.samples.append((time.monotonic() - t0, self.rss()))
            except OSError:
                return

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()

    @property
    def peak(self) -> int:
        return max((r for _, r in self.samples), default=0)


def start_server(images: list[Path], log: Path) -> tuple[subprocess.Popen[bytes], list[str]]:
    cmd = [
        sys.executable,
        "-m",
        "tapnbd",
        "serve",
        *map(str, images),
        "--port",
        "0",
        "--max-connections",
        "512",
    ]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    fd, buf, deadline = proc.stdout.fileno(), b"", time.monotonic() + 30
    while buf.count(b"\n") < len(images):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            proc.kill()
            raise SystemExit(f"server not ready: {log.read_text()}")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise SystemExit(f"server exited: {log.read_text()}")
        buf += chunk
    return proc, buf.decode().split()


def fio_command(uri: str, jobs: int, region: int, duration: float, name: str) -> list[str]:
    return [
        "fio",
        f"--name={name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--thread",
        f"--numjobs={jobs}",
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--iodepth=4",
        f"--size={region}",
        f"--offset_increment={region}",  # each job (connection) has its own region
        "--verify=crc32c",
        "--verify_backlog=32",
        "--verify_fatal=1",
        "--verify_state_save=0",  # else each job leaves a *-verify.state file in the cwd
        "--time_based",
        f"--runtime={duration:g}",
        "--output-format=json",
    ]


@dataclass
class FioResult:
    name: str
    jobs: int = 0
    errors: int = 0  # jobs that ended with an error
    mismatches: int = 0  # of which verify failures (EILSEQ)
    written: int = 0
    verified: int = 0
    returncode: int = 0
    messages: list[str] = field(default_factory=list)


def parse(name: str, proc: subprocess.CompletedProcess[str]) -> FioResult:
    r = FioResult(name, returncode=proc.returncode)
    text = proc.stdout
    start = text.find("{")
    try:
        data = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        data = {}
    for job in data.get("jobs", []):
        r.jobs += 1
        r.written += job["write"]["io_bytes"]
        r.verified += job["read"]["io_bytes"]
        if job.get("error"):
            r.errors += 1
            r.mismatches += job["error"] == 84  # EILSEQ: "verify: bad checksum"
    for line in (proc.stderr or "").splitlines():
        if "verify" in line or "error" in line.lower():
            r.messages.append(line.strip())
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--region", type=int, default=8, help="MiB per connection")
    p.add_argument("--rss-limit", type=int, default=256, help="MiB")
    p.add_argument("--workdir", type=Path, default=None)
    a = p.parse_args()
    if shutil.which("fio") is None:
        raise SystemExit("fio is not installed (make deps)")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="tapnbd-soak-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    per = {"raw": a.connections // 2, "qcow": a.connections - a.connections // 2}
    region = a.region * MiB
    raw, qcow = work / "soak.raw", work / "soak.qcow"
    with open(raw, "wb") as f:
        f.truncate(per["raw"] * region)
    subprocess.run(
        [sys.executable, "-m", "tapnbd", "create", str(qcow), "--size", str(per["qcow"] * region)],
        check=True,
    )
    server, uris = start_server([raw, qcow], work / "server.log")
    sampler = Sampler(server.pid)
    baseline = sampler.rss()
    sampler.start()
    t0 = time.monotonic()
    results: dict[str, FioResult] = {}
    try:
        procs = {
            kind: subprocess.Popen(
                fio_command(uri, per[kind], region, a.duration, f"soak-{kind}"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for kind, uri in zip(("raw", "qcow"), uris, strict=True)
        }
        for kind, proc in procs.items():
            out, err = proc.communicate(timeout=a.duration + 300)
            results[kind] = parse(
                kind, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            )
        elapsed = time.monotonic() - t0
        alive = server.poll() is None
        answers = (
            alive
            and subprocess.run(
                ["nbdinfo", "--size", uris[0]], capture_output=True, timeout=30
            ).returncode
            == 0
        )
    finally:
        sampler.stop()
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    peak = sampler.peak
    samples = [r for _, r in sampler.samples]
    # Growth: the last quarter of the run against the first (after warm-up).
    q = max(1, len(samples) // 4)
    early, late = max(samples[q : 2 * q] or [0]), max(samples[-q:] or [0])
    jobs = sum(r.jobs for r in results.values())
    errors = sum(r.errors for r in results.values())
    mismatches = sum(r.mismatches for r in results.values())
    print(
        f"connections: {jobs} fio jobs (raw {per['raw']}, qcow {per['qcow']}), "
        f"{elapsed:.0f} s, {a.region} MiB region each"
    )
    for r in results.values():
        print(
            f"  {r.name}: {r.jobs} jobs, written {r.written / MiB:.0f} MiB, verified "
            f"{r.verified / MiB:.0f} MiB, errors {r.errors}, mismatches {r.mismatches}, "
            f"fio exit {r.returncode}"
        )
        for m in r.messages[:10]:
            print(f"    {m}")
    print(
        f"server RSS: start {baseline / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB "
        f"(limit {a.rss_limit} MiB), second quarter {early / MiB:.0f} MiB, "
        f"last quarter {late / MiB:.0f} MiB; {len(samples)} samples"
    )
    failures = []
    if jobs != a.connections:
        failures.append(f"{jobs} fio jobs reported, {a.connections} started")
    if errors or mismatches or any(r.returncode for r in results.values()):
        failures.append(f"{errors} jobs failed, {mismatches} verify mismatches")
    if peak > a.rss_limit * MiB:
        failures.append(f"RSS peak {peak / MiB:.0f} MiB over the {a.rss_limit} MiB limit")
    if not answers:
        failures.append("the server died or stopped answering")
    if elapsed < a.duration:
        failures.append(f"ran {elapsed:.0f} s, asked for {a.duration:g}")
    (work / "soak.json").write_text(
        json.dumps(
            {
                "connections": jobs,
                "seconds": elapsed,
                "rss_peak": peak,
                "rss_start": baseline,
                "rss_samples": sampler.samples,
                "errors": errors,
                "mismatches": mismatches,
                "failures": failures,
            }
        )
    )
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
