"""The fio rows on Ceph RBD (``python -m bench fio --only rbd``): one image, three paths.

- tapnbd serving ``rbd:rbd/bench`` (librbd aio through ctypes, completions into the loop);
- qemu-nbd serving the same image through qemu's own rbd driver (``--cache=writeback``,
  ``--aio=threads``, as the qcow2 peer runs);
- fio's rbd engine talking to librbd directly: the limit for any server in front of it.

The cluster is a throwaway single node on loopback (``tests/rbd/cluster.py``, one
monitor and one bluestore OSD on a sparse file in the work directory). Every cell uses
the four fio jobs of ``bench.fio``; ratios are only taken within this run.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console

from bench import fio
from bench.images import MiB
from bench.proc import (
    BenchError,
    Unavailable,
    cpu_seconds,
    free_port,
    have,
    is_root,
    nbd_greets,
    run,
    spawn,
    stop,
    tapnbd_command,
    wait_until,
)
from bench.report import Table, fmt_ratio, ratio, write_csv
from bench.ui import UI

IMAGE = "bench"
TARGETS = ("tapnbd-rbd", "qemu-nbd-rbd", "fio-rbd-direct")
LABELS = {
    "tapnbd-rbd": "tapnbd rbd:",
    "qemu-nbd-rbd": "qemu-nbd rbd: (writeback, threads)",
    "fio-rbd-direct": "fio --ioengine=rbd (librbd, no server)",
}


@dataclass
class RbdConfig:
    size: int = 1024 * MiB
    runtime: float = 5.0
    repeat: int = 1
    jobs: Sequence[fio.FioJob] = fio.JOBS


@dataclass
class RbdRun:
    config: RbdConfig
    cells: list[fio.FioCell] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def value(self, target: str, job: str) -> float | None:
        vals = [c.value for c in self.cells if c.target == target and c.job == job and c.value]
        return statistics.median(vals) if vals else None


@contextlib.contextmanager
def _server(target: str, name: str, logdir: Path, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """(uri, pid) of a server on ``name`` (an rbd: image), stopped after the block."""
    port = free_port()
    log = logdir / f"{target}.log"
    if target == "tapnbd-rbd":
        cmd = [*tapnbd_command(), "serve", name, "--bind", "127.0.0.1", "--port", str(port)]
        uri = f"nbd://127.0.0.1:{port}/{IMAGE}"
    else:
        cmd = ["qemu-nbd", "-f", "raw", "-t", "-x", IMAGE, "-b", "127.0.0.1", "-p", str(port)]
        cmd += ["--cache=writeback", "--aio=threads", name]
        uri = f"nbd://127.0.0.1:{port}/{IMAGE}"
    proc = spawn(cmd, log=log, env=env)
    try:
        wait_until(
            lambda: nbd_greets(("127.0.0.1", port)),
            what=target,
            timeout=60,
            alive=lambda: proc.poll() is None,
            log=log,
        )
        yield uri, proc.pid
    finally:
        stop(proc)


def _direct_command(job: fio.FioJob, size: int, runtime: float) -> list[str]:
    cmd = fio.fio_command("unused", job, size, runtime)
    cmd[cmd.index("--ioengine=nbd")] = "--ioengine=rbd"
    cmd.remove("--uri=unused")
    return [*cmd, "--clientname=admin", "--pool=rbd", f"--rbdname={IMAGE}"]


def run_rbd(cfg: RbdConfig, workdir: Path, ui_console: Console | None = None) -> RbdRun:
    from tests.rbd import cluster as ceph

    missing = ceph.missing_binaries()
    if missing:
        raise Unavailable(f"not installed: {', '.join(missing)} (make deps installs Ceph)")
    if not is_root():
        raise Unavailable("the throwaway Ceph cluster needs root")
    if not have("fio"):
        raise Unavailable("fio is not installed")
    r = RbdRun(cfg)
    todo = [(j, t) for j in cfg.jobs for t in TARGETS]
    with UI("rbd", 1 + len(todo) * cfg.repeat, ui_console) as ui:
        ui.phase("ceph", "one monitor, one bluestore OSD on loopback")
        t0 = time.monotonic()
        cluster = ceph.start(workdir / "ceph")
        try:
            env = cluster.env()
            r.notes.append(f"cluster up in {time.monotonic() - t0:.1f} s (1 mon, 1 bluestore OSD)")
            random = workdir / "rbd-random.raw"
            with open(random, "wb") as f, open("/dev/urandom", "rb") as src:
                left = cfg.size
                while left:
                    chunk = src.read(min(left, 8 * MiB))
                    f.write(chunk)
                    left -= len(chunk)
            run(
                ["rbd", "import", "--no-progress", str(random), f"rbd/{IMAGE}"],
                what="rbd import",
                env=env,
            )
            random.unlink()
            r.notes.append(f"image: {cfg.size // MiB} MiB of random data, imported with rbd import")
            ui.advance()
            name = f"rbd:rbd/{IMAGE}"
            for rep in range(cfg.repeat):
                for job, target in todo:
                    ui.phase(LABELS[target], job.label)
                    cell = fio.FioCell(target, job.key, rep)
                    try:
                        if target == "fio-rbd-direct":
                            out = run(
                                _direct_command(job, cfg.size, cfg.runtime),
                                what=f"fio {job.key} rbd",
                                env=env,
                                timeout=cfg.runtime + 180,
                            )
                        else:
                            with _server(target, name, workdir / "logs", env) as (uri, pid):
                                c0, t1 = cpu_seconds(pid), time.monotonic()
                                out = run(
                                    fio.fio_command(uri, job, cfg.size, cfg.runtime),
                                    what=f"fio {job.key} against {target}",
                                    timeout=cfg.runtime + 180,
                                )
                                c1, t2 = cpu_seconds(pid), time.monotonic()
                                cell.server_cpu_pct = 100 * (c1 - c0) / max(t2 - t1, 1e-6)
                        for k, v in fio.parse_fio_json(out, job).items():
                            setattr(cell, k, v)
                    except BenchError as e:
                        cell.error = str(e)
                        ui.log(f"[red]{target}, {job.label}: {e}")
                    r.cells.append(cell)
                    ui.advance()
        finally:
            cluster.stop()
    return r


def table(r: RbdRun) -> Table:
    headers = ["path"] + [f"{j.label}" for j in r.config.jobs]
    t = Table("fio on Ceph RBD: MiB/s or IOPS", headers)
    for target in TARGETS:
        row = [LABELS[target]]
        for j in r.config.jobs:
            v = r.value(target, j.key)
            row.append("" if v is None else fio._fmt_value(j, v))
        t.rows.append(row)
    for ref, label in (
        ("qemu-nbd-rbd", "tapnbd / qemu-nbd"),
        ("fio-rbd-direct", "tapnbd / direct librbd"),
    ):
        t.rows.append(
            [f"**{label}**"]
            + [
                fmt_ratio(ratio(r.value("tapnbd-rbd", j.key), r.value(ref, j.key)))
                for j in r.config.jobs
            ]
        )
    return t


def write_outputs(r: RbdRun, out: Path, command: str, machine_md: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = out / "rbd.md"
    notes = "\n".join(f"- {n}" for n in r.notes)
    errors = "\n".join(f"- {c.target} {c.job}: {c.error}" for c in r.cells if c.error)
    md.write_text(
        f"# fio on Ceph RBD\n\n`{command}`\n\n{table(r).markdown()}\n\n{notes}\n"
        + (f"\nFailed cells:\n{errors}\n" if errors else "")
        + f"\n{machine_md}\n"
    )
    csv = out / "rbd.csv"
    write_csv(csv, [asdict(c) for c in r.cells])
    return [md, csv]
