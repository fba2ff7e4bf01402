"""Ring against NBD (issue 5): the same jobs through the blkif ring and through NBD.

Both paths serve one image with the same driver, in one run, job by job:

- NBD: ``tapnbd serve IMAGE`` and ``fio --ioengine=nbd`` (the fio table's command line);
- ring: ``tapnbd ring serve IMAGE --path DIR`` and ``tapnbd ring bench --path DIR``, a
  BlkFront in its own process keeping the same queue depth for the same time.

The jobs are the fio table's four (1M sequential at QD8, 4k random at QD32, read and
write). Each server is started for its cell and stopped after it, NBD then ring within a
job, so that drift on the shared machine hits both alike. ``--repeat N`` runs all the
jobs N times over, interleaved, and the tables give the median of each figure and the
ratio of each repeat (on a machine others load, one repeat is not a measurement). The vbd directory (xenstore,
grant table, event channel names) goes on tmpfs, where a Xen guest's memory would be.

The ring has no TCP and no NBD framing in the way, but its client is Python (BlkFront),
while fio's nbd engine is C (libnbd); the ratio is of the two whole paths as built. The
ring uses BLKIF_OP_INDIRECT (a 1 MiB I/O is one request of 256 segments) as a Linux
blkfront does when the backend offers feature-max-indirect-segments.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench import images
from bench.fio import JOBS, FioJob, fio_command, parse_fio_json
from bench.images import GiB, MiB
from bench.proc import (
    BenchError,
    Unavailable,
    cpu_seconds,
    have,
    ready_for,
    run,
    spawn,
    stop,
    tapnbd_command,
    wait_until,
    warm,
)
from bench.report import Table, fmt_num, fmt_ratio, ratio, write_csv
from bench.servers import serve
from bench.ui import UI

Route = Literal["nbd", "ring"]
PATHS: tuple[Route, ...] = ("nbd", "ring")
LABELS = {"nbd": "NBD (fio nbd engine)", "ring": "ring (BlkFront)"}
READY_TIMEOUT = 30.0


@dataclass
class RingConfig:
    size: int = 1 * GiB
    runtime: float = 5.0
    fmt: Literal["raw", "qcow"] = "raw"
    jobs: Sequence[FioJob] = JOBS
    quick: bool = False
    #: Times every job is run through both paths (interleaved); figures are medians.
    repeat: int = 1

    @classmethod
    def quick_config(cls) -> RingConfig:
        return cls(size=64 * MiB, runtime=0.5, quick=True)


@dataclass
class RingCell:
    job: str
    path: str
    #: Which repeat of the job this cell is (0-based).
    rep: int = 0
    value: float | None = None  # MiB/s or IOPS, per the job's metric
    bw_mib: float | None = None
    iops: float | None = None
    client_cpu_pct: float | None = None
    server_cpu_pct: float | None = None
    #: Ring only: requests published, kicks to the backend, upcalls from it.
    requests: int | None = None
    kicks: int | None = None
    events: int | None = None
    error: str = ""


@dataclass
class RingRun:
    config: RingConfig
    cells: list[RingCell]
    notes: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def ok_cells(self, job: str, path: str) -> list[RingCell]:
        """The cells of ``job`` through ``path`` that ran, one per repeat."""
        return [c for c in self.cells if c.job == job and c.path == path and not c.error]

    def median(self, job: str, path: str, field: str) -> float | None:
        """The median over the repeats of one figure of the cell."""
        got = [v for c in self.ok_cells(job, path) if (v := getattr(c, field)) is not None]
        return float(statistics.median(got)) if got else None

    def value(self, job: str, path: str, rep: int | None = None) -> float | None:
        """The cell's figure in repeat ``rep``, or the median over all repeats."""
        if rep is None:
            return self.median(job, path, "value")
        for c in self.ok_cells(job, path):
            if c.rep == rep:
                return c.value
        return None

    def ratios(self, job: str) -> list[float | None]:
        """ring / NBD of each repeat, in the order they ran."""
        return [
            ratio(self.value(job, "ring", i), self.value(job, "nbd", i))
            for i in range(self.config.repeat)
        ]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@contextmanager
def _vbd_dir(workdir: Path) -> Iterator[Path]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else str(workdir)
    path = Path(tempfile.mkdtemp(prefix="tapnbd-vbd-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def ring_server(image: Path, fmt: str, logdir: Path, vbd: Path) -> Iterator[int]:
    """``tapnbd ring serve`` on ``image`` in ``vbd``; yields its pid once in InitWait."""
    logdir.mkdir(parents=True, exist_ok=True)
    n = len(list(logdir.glob("ring-*.log"))) + 1
    log, out = logdir / f"ring-{n}.log", logdir / f"ring-{n}.out"
    cmd = [*tapnbd_command(), "ring", "serve", str(image), "--format", fmt, "--path", str(vbd)]
    proc = spawn(cmd, log=log, stdout=out)
    try:
        wait_until(
            lambda: out.exists() and out.read_text().endswith("\n"),
            what="tapnbd ring serve",
            timeout=READY_TIMEOUT,
            alive=lambda: proc.poll() is None,
            log=log,
        )
        yield proc.pid
    finally:
        stop(proc)


def ring_bench_command(vbd: Path, job: FioJob, size: int, runtime: float) -> list[str]:
    return [
        *tapnbd_command(),
        "ring",
        "bench",
        "--path",
        str(vbd),
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        f"--size={size}",
        f"--runtime={runtime:g}",
        "--json",
    ]


def parse_ring_json(text: str, job: FioJob) -> dict[str, Any]:
    """The figures of one ``tapnbd ring bench --json`` line, in the fio cells' terms."""
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    if not lines:
        raise BenchError(f"tapnbd ring bench printed no JSON: {text[:200]!r}")
    d = json.loads(lines[-1])
    bw, iops = float(d["mib_s"]), float(d["iops"])
    return {
        "value": bw if job.metric == "MiB/s" else iops,
        "bw_mib": bw,
        "iops": iops,
        "requests": int(d["requests"]),
        "kicks": int(d["notifications"]),
        "events": int(d["events"]),
    }


def _timed(cmd: list[str], what: str, pid: int, timeout: float) -> tuple[str, float, float]:
    """Run a client to completion; its output, its CPU % and the server's CPU %."""
    c0, s0, t0 = _children_cpu(), cpu_seconds(pid), time.monotonic()
    text = run(cmd, what=what, timeout=timeout)
    c1, s1, t1 = _children_cpu(), cpu_seconds(pid), time.monotonic()
    wall = max(t1 - t0, 1e-6)
    return text, 100 * (c1 - c0) / wall, 100 * (s1 - s0) / wall


def _run_cell(
    job: FioJob, path: Route, cfg: RingConfig, image: Path, workdir: Path, rep: int = 0
) -> RingCell:
    cell = RingCell(job.key, path, rep)
    # Raw: the cell writes the served file; qcow: the same file under the format.
    ready_for(image, job.writes)
    logs = workdir / "logs"
    timeout = cfg.runtime + 120
    figures: dict[str, Any]
    if path == "nbd":
        with serve("tapnbd", image, cfg.fmt, logdir=logs) as s:
            cmd = fio_command(s.uri, job, cfg.size, cfg.runtime)
            text, client, server = _timed(cmd, f"fio {job.key} over NBD", s.pid, timeout)
        figures = dict(parse_fio_json(text, job))
        figures["client_cpu_pct"] = client  # fio's own figure omits nothing we want here
    else:
        with _vbd_dir(workdir) as vbd, ring_server(image, cfg.fmt, logs, vbd) as pid:
            cmd = ring_bench_command(vbd, job, cfg.size, cfg.runtime)
            text, client, server = _timed(cmd, f"ring bench {job.key}", pid, timeout)
        figures = parse_ring_json(text, job)
        figures["client_cpu_pct"] = client
    for k, v in figures.items():
        setattr(cell, k, v)
    cell.server_cpu_pct = server
    return cell


def _make_image(cfg: RingConfig, workdir: Path) -> tuple[Path, str]:
    raw = workdir / "ring-random.raw"
    images.make_random(raw, cfg.size)
    if cfg.fmt == "raw":
        warm(raw)
        return raw, f"raw image: {cfg.size // MiB} MiB of random data, warm in the page cache"
    path = workdir / "ring-full.qcow"
    made = images.create_qcow(path, cfg.size, images.QCOW_OPT, workdir)
    how = images.fill_qcow(path, raw, workdir)
    raw.unlink()
    warm(path)
    return path, f"qcow image: {made}, every cluster written ({how}), warm in the page cache"


def run_ring(cfg: RingConfig, workdir: Path, ui_console: Any = None) -> RingRun:
    """Every job through both paths; a failing cell is recorded, not fatal."""
    if not have("fio"):
        raise Unavailable("fio is not installed")
    started = time.monotonic()
    cells: list[RingCell] = []
    steps = 1 + cfg.repeat * len(cfg.jobs) * len(PATHS)
    with UI("ring vs NBD", steps, ui_console) as ui:
        ui.phase("image", f"{cfg.size // MiB} MiB {cfg.fmt}")
        image, note = _make_image(cfg, workdir)
        ui.advance()
        for rep in range(cfg.repeat):
            for job in cfg.jobs:
                for path in PATHS:
                    what = job.label + (f" ({rep + 1}/{cfg.repeat})" if cfg.repeat > 1 else "")
                    ui.phase(LABELS[path], what)
                    try:
                        cells.append(_run_cell(job, path, cfg, image, workdir, rep))
                    except BenchError as e:
                        cells.append(RingCell(job.key, path, rep, error=str(e)))
                        ui.log(f"[red]{LABELS[path]}, {what}: {e}")
                    ui.advance()
    return RingRun(cfg, cells, [note], time.monotonic() - started)


# Reporting.


def _fmt(job: FioJob, v: float | None) -> str:
    if v is None:
        return ""
    if job.metric == "IOPS":
        return f"{v / 1000:.1f} k" if v >= 1000 else f"{v:.0f}"
    return f"{v:.0f}"


def table(r: RingRun) -> Table:
    repeats = r.config.repeat > 1
    title = "Ring against NBD, same driver and image"
    columns = ["job", "unit", "NBD", "ring", "ring / NBD", "kicks / req", "events / req"]
    if repeats:
        title += f" (medians of {r.config.repeat} repeats)"
        columns[4] = "ring / NBD, median"
        columns.insert(5, "each repeat")
    t = Table(title, columns)
    for job in r.config.jobs:
        nbd, ring = r.value(job.key, "nbd"), r.value(job.key, "ring")
        cells = r.ok_cells(job.key, "ring")
        requests = sum(c.requests or 0 for c in cells)
        per_req: list[str] = ["", ""]
        if requests:
            kicks = sum(c.kicks or 0 for c in cells)
            events = sum(c.events or 0 for c in cells)
            per_req = [f"{kicks / requests:.3f}", f"{events / requests:.3f}"]
        each = [x for x in r.ratios(job.key) if x is not None]
        row = [job.label, job.metric, _fmt(job, nbd), _fmt(job, ring)]
        row.append(fmt_ratio(statistics.median(each) if each else None))
        if repeats:
            row.append(" ".join(fmt_ratio(x) for x in each))
        t.rows.append([*row, *per_req])
    return t


def cpu_table(r: RingRun) -> Table:
    t = Table(
        "CPU, % of one core over the cell",
        ["job", "NBD client", "NBD server", "ring client", "ring server"],
    )
    for job in r.config.jobs:
        row = [job.label]
        for path in PATHS:
            row += [
                fmt_num(r.median(job.key, path, "client_cpu_pct")),
                fmt_num(r.median(job.key, path, "server_cpu_pct")),
            ]
        t.rows.append(row)
    return t


def _us_per_io(cpu_pct: float | None, iops: float | None) -> float | None:
    if cpu_pct is None or not iops:
        return None
    return cpu_pct / 100 / iops * 1e6


def cpu_per_io_table(r: RingRun) -> Table:
    t = Table(
        "CPU per I/O, microseconds (the cell's CPU % over its IOPS)",
        ["job", "NBD client", "NBD server", "ring client", "ring server"],
    )
    for job in r.config.jobs:
        row = [job.label]
        for path in PATHS:
            cells = r.ok_cells(job.key, path)
            for side in ("client_cpu_pct", "server_cpu_pct"):
                per_io = [
                    v for c in cells if (v := _us_per_io(getattr(c, side), c.iops)) is not None
                ]
                row.append(fmt_num(statistics.median(per_io) if per_io else None))
        t.rows.append(row)
    return t


def csv_rows(r: RingRun) -> list[dict[str, object]]:
    rows = []
    for c in r.cells:
        d: dict[str, object] = asdict(c)
        other = r.value(c.job, "nbd", c.rep)
        d["ratio_to_nbd"] = ratio(c.value, other) if not c.error else None
        rows.append(d)
    return rows


def markdown(r: RingRun, command: str, machine_md: str) -> str:
    cfg = r.config
    parts = [
        "# Ring against NBD" + (" (quick mode: not a measurement)" if cfg.quick else ""),
        "",
        machine_md,
        "",
        f"Command: `{command}`. Each cell: one job of {cfg.runtime:g} s over the first "
        f"{cfg.size // MiB} MiB of a {cfg.fmt} image, every job {cfg.repeat} time(s) "
        "through both paths, interleaved (figures are medians over the repeats); "
        f"the whole run took {r.elapsed:.0f} s. "
        "Sequential jobs in MiB/s, random jobs in IOPS. **ring / NBD** above 1 means "
        "the ring is faster.",
        "",
    ]
    for t in (table(r), cpu_table(r), cpu_per_io_table(r)):
        parts += [f"## {t.title}", "", t.markdown(), ""]
    parts += ["## Notes", ""]
    parts += [f"- {n}" for n in r.notes]
    parts += [
        "- NBD: `tapnbd serve` + `fio --ioengine=nbd` (libnbd, C), one connection over "
        "TCP on 127.0.0.1",
        "- ring: `tapnbd ring serve` + `tapnbd ring bench` (BlkFront, Python) in its own "
        "process; the vbd directory is on /dev/shm",
        "- kicks / req: event-channel notifications the frontend sent per ring request; "
        "events / req: upcalls it took (notify hold-off keeps both well below 1 on a busy ring)",
        "- client CPU is the client process's user+system time over the cell's wall time; "
        "client and servers share the machine's cores",
        "- before each cell the image is fsynced (outside the timing), so that no cell "
        "meets the writeback of pages an earlier one dirtied; read cells then warm it, and "
        "write cells drop its pages (4k writes into the large folios reads leave cost ext4 "
        "a walk of the whole folio, and would measure that)",
    ]
    for c in r.cells:
        if c.error:
            parts.append(f"- error: {c.path} {c.job}: {c.error.splitlines()[0]}")
    parts.append("")
    return "\n".join(parts)


def write_outputs(r: RingRun, out: Path, command: str, machine_md: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, csvp = out / "ring.md", out / "ring.csv"
    md.write_text(markdown(r, command, machine_md))
    write_csv(csvp, csv_rows(r))
    return [md, csvp]
