"""The fio peer benchmark (issues 2 and 3): four jobs against every server, in one run.

Each cell is one fio job with the nbd engine, exactly as ../shared/bench/peers.md runs it:

    fio --name=J --ioengine=nbd --uri=URI --rw=RW --bs=BS --iodepth=QD \\
        --size=1g --time_based --runtime=5 --group_reporting --output-format=json

The raw rows serve one 1 GiB image of random data with tapnbd and each peer in turn:
warm in the page cache for read jobs, and for write jobs written back with its pages
dropped, so that 4k writes do not land in the large folios that reads leave (ext4 pays
for the whole folio on every write into it; see ``bench.proc.ready_for``). The qcow rows (issue 3) serve qcow images of the same size, in both
layouts (normal and allocation-optimised), "full" (every cluster written, filled with the
same random data) and "fresh" (just created, so every write allocates; recreated before
each write job, and not read, since reads would only see holes). tapnbd and qemu-nbd serve
the same qcow files.

The qcow2 rows (issue 13) are the same three ways round: "full" (every cluster written),
"fresh" (allocating writes), and "overlay": an empty qcow2 overlay on the raw image,
made anew for every cell, so reads go through to the raw file and every write allocates
(a 4k write copies the rest of its 64 KiB cluster up from the raw file). qemu-nbd serves
qcow2 with ``--cache=writeback --aio=threads``.

The loop runs job by job, and inside a job server by server, so that drift on this shared
two-core machine hits every server in a job alike. Each server is started for its cell and
stopped after it. Ratios are only ever taken between cells of the same run.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench import images
from bench.images import GiB, MiB
from bench.proc import BenchError, Unavailable, cpu_seconds, have, ready_for, run, warm
from bench.report import Table, bar_chart, fmt_ratio, median_interval, ratio, write_csv
from bench.servers import SERVERS, ServerOptions, serve, unavailable_reason
from bench.ui import UI

State = Literal["full", "fresh", "overlay"]


@dataclass(frozen=True)
class FioJob:
    key: str
    label: str
    rw: str
    bs: str
    iodepth: int
    metric: Literal["MiB/s", "IOPS"]

    @property
    def writes(self) -> bool:
        return "write" in self.rw


JOBS: tuple[FioJob, ...] = (
    FioJob("seqread", "seq read 1M QD8", "read", "1M", 8, "MiB/s"),
    FioJob("seqwrite", "seq write 1M QD8", "write", "1M", 8, "MiB/s"),
    FioJob("randread", "rand read 4k QD32", "randread", "4k", 32, "IOPS"),
    FioJob("randwrite", "rand write 4k QD32", "randwrite", "4k", 32, "IOPS"),
)
#: Jobs run only when --jobs names them: one request at a time, what --poll-us is for.
EXTRA_JOBS: tuple[FioJob, ...] = (
    FioJob("randread-qd1", "rand read 4k QD1", "randread", "4k", 1, "IOPS"),
)


@dataclass(frozen=True)
class FioTarget:
    """One row of the table: a server, an image layout and the image's state."""

    key: str
    label: str
    server: str
    layout: str
    state: State = "full"

    @property
    def peer(self) -> bool:
        return SERVERS[self.server].peer

    @property
    def group(self) -> str:
        return "raw" if self.layout == images.RAW else f"{self.layout}-{self.state}"


def _qcow_targets() -> list[FioTarget]:
    out = []
    states: tuple[State, ...] = ("full", "fresh")
    for state in states:
        for layout, short in ((images.QCOW_OPT, "opt"), (images.QCOW_NORMAL, "normal")):
            name = images.IMAGE_LABELS[layout]
            out += [
                FioTarget(
                    f"tapnbd-qcow-{short}-{state}",
                    f"tapnbd {name}, {state}",
                    "tapnbd",
                    layout,
                    state,
                ),
                FioTarget(
                    f"qemu-nbd-qcow-{short}-{state}",
                    f"qemu-nbd -f qcow, {name} file, {state}",
                    "qemu-nbd",
                    layout,
                    state,
                ),
            ]
    return out


def _vhd_targets() -> list[FioTarget]:
    """tapnbd and qemu-nbd (-f vpc) on the same dynamic VHD, full and fresh (issue 17)."""
    out = []
    states: tuple[State, ...] = ("full", "fresh")
    for state in states:
        out += [
            FioTarget(f"tapnbd-vhd-{state}", f"tapnbd dynamic vhd, {state}", "tapnbd",
                      images.VHD, state),
            FioTarget(f"qemu-nbd-vhd-{state}", f"qemu-nbd -f vpc, dynamic vhd, {state}",
                      "qemu-nbd", images.VHD, state),
        ]  # fmt: skip
    return out


def _qcow2_targets() -> list[FioTarget]:
    """tapnbd and qemu-nbd on the same qcow2 file: full, fresh, and an overlay (issue 13)."""
    states: tuple[tuple[State, str, str], ...] = (
        ("full", images.QCOW2, "full"),
        ("fresh", images.QCOW2, "fresh"),
        ("overlay", images.QCOW2_OVERLAY, "overlay on raw"),
    )
    out = []
    for state, layout, what in states:
        out += [
            FioTarget(f"tapnbd-qcow2-{state}", f"tapnbd qcow2, {what}", "tapnbd", layout, state),
            FioTarget(f"qemu-nbd-qcow2-{state}", f"qemu-nbd -f qcow2, {what}", "qemu-nbd",
                      layout, state),
        ]  # fmt: skip
    return out


TARGETS: tuple[FioTarget, ...] = (
    FioTarget("tapnbd-raw", "tapnbd raw", "tapnbd", images.RAW),
    FioTarget("qemu-nbd-raw", "qemu-nbd -f raw", "qemu-nbd", images.RAW),
    FioTarget("nbdkit-raw", "nbdkit file", "nbdkit", images.RAW),
    FioTarget("nbd-server-raw", "nbd-server", "nbd-server", images.RAW),
    FioTarget("tapnbd-raw-nostats", "tapnbd raw, statistics off", "tapnbd-nostats", images.RAW),
    FioTarget("tapnbd-raw-poll", "tapnbd raw, polling", "tapnbd-poll", images.RAW),
    *_qcow_targets(),
    *_vhd_targets(),
    *_qcow2_targets(),
)


@dataclass
class FioConfig:
    size: int = 1 * GiB
    runtime: float = 5.0
    repeat: int = 1
    targets: Sequence[FioTarget] = TARGETS
    jobs: Sequence[FioJob] = JOBS
    options: ServerOptions = field(default_factory=ServerOptions)
    quick: bool = False

    @classmethod
    def quick_config(cls) -> FioConfig:
        return cls(size=256 * MiB, runtime=1.0, quick=True)


@dataclass
class FioCell:
    target: str
    job: str
    run: int
    value: float | None = None  # MiB/s or IOPS, per the job's metric
    bw_mib: float | None = None
    iops: float | None = None
    lat_mean_us: float | None = None
    lat_p99_us: float | None = None
    client_cpu_pct: float | None = None
    server_cpu_pct: float | None = None
    error: str = ""


def fio_command(uri: str, job: FioJob, size: int, runtime: float) -> list[str]:
    return [
        "fio",
        f"--name={job.key}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        f"--size={size}",
        "--time_based",
        f"--runtime={runtime:g}",
        "--group_reporting",
        "--output-format=json",
    ]


def parse_fio_json(text: str, job: FioJob) -> dict[str, float | None]:
    """The figures we keep from fio's JSON (anything printed before the JSON is skipped)."""
    start = text.find("{")
    if start < 0:
        raise BenchError(f"fio printed no JSON: {text[:200]!r}")
    data: dict[str, Any] = json.loads(text[start:])
    jobs = data.get("jobs") or []
    if not jobs:
        raise BenchError("fio's JSON has no jobs")
    j = jobs[0]
    if j.get("error"):
        raise BenchError(f"fio job error {j['error']}")
    side = j["write" if job.writes else "read"]
    bw = float(side["bw_bytes"]) / MiB
    iops = float(side["iops"])
    clat = side.get("clat_ns") or side.get("lat_ns") or {}
    mean = clat.get("mean")
    pct = clat.get("percentile") or {}
    p99 = pct.get("99.000000")
    return {
        "value": bw if job.metric == "MiB/s" else iops,
        "bw_mib": bw,
        "iops": iops,
        "lat_mean_us": None if mean is None else float(mean) / 1000,
        "lat_p99_us": None if p99 is None else float(p99) / 1000,
        "client_cpu_pct": float(j.get("usr_cpu", 0.0)) + float(j.get("sys_cpu", 0.0)),
    }


def select_jobs(patterns: Sequence[str] | None) -> list[FioJob]:
    """The jobs --jobs names (EXTRA_JOBS only when named), or the usual four."""
    return select(JOBS + EXTRA_JOBS, patterns) if patterns else list(JOBS)


def select(items: Sequence[Any], patterns: Sequence[str] | None) -> list[Any]:
    """Items whose ``key`` matches any of the glob patterns (all items without patterns)."""
    if not patterns:
        return list(items)
    return [i for i in items if any(fnmatch.fnmatch(i.key, p) for p in patterns)]


@dataclass
class FioRun:
    config: FioConfig
    cells: list[FioCell]
    skipped: dict[str, str]  # target key -> why it did not run
    notes: list[str]
    elapsed: float = 0.0

    def value(self, target: str, job: str) -> float | None:
        values = [c.value for c in self.cells if c.target == target and c.job == job and c.value]
        return statistics.median(values) if values else None

    def cell(self, target: str, job: str, name: str) -> float | None:
        values = [
            getattr(c, name)
            for c in self.cells
            if c.target == target and c.job == job and getattr(c, name) is not None
        ]
        return statistics.median(values) if values else None

    def error(self, target: str, job: str) -> str:
        errs = [c.error for c in self.cells if c.target == target and c.job == job and c.error]
        return errs[0] if errs else ""

    @property
    def ran(self) -> list[FioTarget]:
        return [t for t in self.config.targets if t.key not in self.skipped]

    def best_peer(self, group: str, job: str) -> tuple[FioTarget | None, float | None]:
        best: tuple[FioTarget | None, float | None] = (None, None)
        for t in self.ran:
            if t.group == group and t.peer:
                v = self.value(t.key, job)
                if v is not None and (best[1] is None or v > best[1]):
                    best = (t, v)
        return best

    def reference(self, target: FioTarget, job: str) -> float | None:
        """What a row is compared with: the best peer among raw rows, qemu-nbd on the same
        qcow file in the same state for qcow rows."""
        return self.best_peer(target.group, job)[1]

    def vs_tapnbd_raw(self, target: FioTarget, job: str) -> float | None:
        return ratio(self.value(target.key, job), self.value("tapnbd-raw", job))

    def per_repetition(self, a: str, b: str, job: str) -> list[float]:
        """Target ``a`` over target ``b`` in each repetition where both have a figure:
        cells of one repetition ran minutes apart at most, so drift over the run cancels."""
        bs = {c.run: c.value for c in self.cells if c.target == b and c.job == job and c.value}
        return [
            c.value / bs[c.run]
            for c in sorted(self.cells, key=lambda c: c.run)
            if c.target == a and c.job == job and c.value and c.run in bs
        ]


# Running.


@contextlib.contextmanager
def _image_for(
    target: FioTarget, job: FioJob, cfg: FioConfig, workdir: Path, shared: dict[str, Path]
) -> Iterator[Path]:
    """The image a cell serves: the shared raw or full qcow image (warm for reads, its
    pages dropped for writes: see ``ready_for``), or a fresh qcow one, or a fresh overlay
    on the shared raw image (which it only reads)."""
    if target.state == "overlay":
        path = workdir / f"overlay-{target.key}.qcow2"
        images.create_qcow2(path, cfg.size, backing=shared[images.RAW])
        warm(shared[images.RAW])
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)
        return
    if target.state == "full":
        path = shared[target.layout]
        ready_for(path, job.writes)
        yield path
        return
    path = workdir / f"fresh-{target.key}.{images.fmt_of(target.layout)}"
    images.create_image(path, cfg.size, target.layout, workdir)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _run_cell(
    target: FioTarget,
    job: FioJob,
    cfg: FioConfig,
    image: Path,
    workdir: Path,
    rep: int,
) -> FioCell:
    cell = FioCell(target.key, job.key, rep)
    fmt = images.fmt_of(target.layout)
    # Write back what earlier cells left dirty, so that no cell pays for another's
    # writeback (a seq write cell dirties up to the whole image).
    os.sync()
    with serve(target.server, image, fmt, logdir=workdir / "logs", options=cfg.options) as s:
        cpu0, t0 = cpu_seconds(s.pid), time.monotonic()
        out = run(
            fio_command(s.uri, job, cfg.size, cfg.runtime),
            what=f"fio {job.key} against {target.label}",
            timeout=cfg.runtime + 180,
        )
        cpu1, t1 = cpu_seconds(s.pid), time.monotonic()
    figures = parse_fio_json(out, job)
    for k, v in figures.items():
        setattr(cell, k, v)
    cell.server_cpu_pct = 100 * (cpu1 - cpu0) / max(t1 - t0, 1e-6)
    return cell


def plan(cfg: FioConfig) -> list[tuple[FioJob, FioTarget]]:
    return [
        (job, t)
        for job in cfg.jobs
        for t in cfg.targets
        if t.state != "fresh" or job.writes  # a fresh image holds only holes to read
    ]


def williams_row(n: int, rep: int) -> list[int]:
    """Row ``rep`` of a Williams design for ``n`` treatments: over ``n`` rows (``2n``
    when ``n`` is odd) each one runs once in each place, and follows each other one
    equally often."""
    base = [0]
    lo, hi = 1, n - 1
    while len(base) < n:  # 0, 1, n-1, 2, n-2, ...
        base.append(lo)
        lo += 1
        if len(base) < n:
            base.append(hi)
            hi -= 1
    row = [(x + rep) % n for x in base]
    if n % 2 and (rep // n) % 2:
        row.reverse()
    return row


def rotated(todo: list[tuple[FioJob, FioTarget]], rep: int) -> list[tuple[FioJob, FioTarget]]:
    """The cells of repetition ``rep``: each job's targets in the order of row ``rep``
    of a Williams design.

    Cells run in a fixed order give each target a fixed place after the cells before
    it, and on a VM the place may show: in session 14's run of five repetitions,
    "tapnbd raw, statistics off", the same server as the first row and third in every
    round, ran seq write at 0.72-1.02x of the first (median 0.85). A rotation gives each
    target each place in turn but keeps who follows whom; a Williams design also gives
    each target each predecessor equally often, over a whole number of squares
    (``--repeat`` a multiple of the number of targets, or twice it when that is odd).
    The one carry-over known to matter is handled apart (``with_warm_ups``).
    """
    by_job: dict[str, list[tuple[FioJob, FioTarget]]] = {}
    for cell in todo:
        by_job.setdefault(cell[0].key, []).append(cell)
    out: list[tuple[FioJob, FioTarget]] = []
    for cells in by_job.values():
        out += [cells[i] for i in williams_row(len(cells), rep)]
    return out


def with_warm_ups(
    cells: list[tuple[FioJob, FioTarget]],
) -> list[tuple[FioJob, FioTarget, bool]]:
    """A repetition's cells, each with whether it is measured; before the first write
    cell of a job on each shared full image, an unmeasured one of the same cell.

    The first seq write cell on the shared raw image after the read jobs ran at about
    0.6x the others, whichever server it was (four goal runs of sessions 16 to 19: medians
    of 1165 to 1641 MiB/s against 1806 to 2531 for the later cells of the same server;
    the cause is not known). The qcow row writes another file, so the raw row behind it
    in the order met that state too, and tapnbd raw was the first raw writer in about
    half of its repetitions, the other raw rows in a quarter to a third: a bias in the
    goal rows' seq write ratios. With a warm-up cell every measured cell follows a write
    cell on its image.
    """
    out: list[tuple[FioJob, FioTarget, bool]] = []
    written: set[tuple[str, str]] = set()
    for job, target in cells:
        if job.writes and target.state == "full" and (job.key, target.layout) not in written:
            written.add((job.key, target.layout))
            out.append((job, target, False))
        out.append((job, target, True))
    return out


def run_fio(cfg: FioConfig, workdir: Path, ui_console: Any = None) -> FioRun:
    """Run every cell of the plan; a failing cell is recorded, not fatal."""
    if not have("fio"):
        raise Unavailable("fio is not installed")
    started = time.monotonic()
    skipped: dict[str, str] = {}
    notes: list[str] = []
    for t in cfg.targets:
        why = unavailable_reason(t.server, images.fmt_of(t.layout))
        why = why or images.layout_unavailable(t.layout, workdir)
        if t.server == "tapnbd" and t.layout in (images.QCOW_OPT, images.QCOW_NORMAL) and not why:
            support = images.qcow_support(workdir)
            why = None if support.serve else support.why
        if why:
            skipped[t.key] = why
    runnable = [t for t in cfg.targets if t.key not in skipped]
    cells: list[FioCell] = []
    todo = [(j, t) for j, t in plan(cfg) if t.key not in skipped]
    layouts_full = sorted({t.layout for t in runnable if t.state == "full"})
    with UI("fio", len(todo) * cfg.repeat + len(layouts_full), ui_console) as ui:
        shared: dict[str, Path] = {}
        raw = workdir / "fio-random.raw"
        ui.phase("images", f"{cfg.size // MiB} MiB of random data")
        images.make_random(raw, cfg.size)
        shared[images.RAW] = raw
        notes.append(
            f"raw image: {cfg.size // MiB} MiB of random data; read cells start with it warm in "
            "the page cache, write cells with its pages written back and dropped (4k writes "
            "into the large folios that reads leave cost ext4 a walk of the whole folio)"
        )
        if images.RAW in layouts_full:
            ui.advance()
        for layout in layouts_full:
            if layout == images.RAW:
                continue
            path = workdir / f"fio-full-{layout}.{images.fmt_of(layout)}"
            ui.phase("images", f"fill {images.IMAGE_LABELS[layout]}")
            try:
                made = images.create_image(path, cfg.size, layout, workdir)
                if layout == images.VHD:
                    how = images.fill_vhd(path, raw, workdir)
                elif layout == images.QCOW2:
                    how = images.fill_qcow2(path, raw)
                else:
                    how = images.fill_qcow(path, raw, workdir)
            except BenchError as e:
                for t in runnable:
                    if t.layout == layout and t.state == "full":
                        skipped[t.key] = f"could not make the full image: {e}"
                ui.advance()
                continue
            shared[layout] = path
            notes.append(f"full {images.IMAGE_LABELS[layout]} image: {made}, filled by {how}")
            ui.advance()
        fresh_layouts = sorted({t.layout for t in runnable if t.state == "fresh"})
        for layout in fresh_layouts:
            how = (
                "qemu-img create"
                if layout == images.QCOW2
                else "tapnbd create"
                if layout == images.VHD or images.qcow_support(workdir).create
                else "qemu-img create"
            )
            notes.append(
                f"fresh {images.IMAGE_LABELS[layout]} image: made by {how} before each write job"
            )
        if any(t.state == "overlay" for t in runnable):
            notes.append(
                "qcow2 overlay: an empty qcow2 (qemu-img create -b RAW -F raw) on the raw "
                "image, made before every cell"
            )
        for rep in range(cfg.repeat):
            order = rotated(todo, rep)
            runs = [c for c in order if c[1].key not in skipped]
            for _ in range(len(order) - len(runs)):
                ui.advance()  # skipped cells count as done
            # Warm-ups are placed among the cells that run: a skipped first writer of an
            # image must not leave the next one without its warm-up.
            for job, target, measured in with_warm_ups(runs):
                ui.phase(
                    target.label,
                    f"{job.label}"
                    + (f" (run {rep + 1})" if cfg.repeat > 1 else "")
                    + ("" if measured else ", warm-up, not measured"),
                )
                try:
                    with _image_for(target, job, cfg, workdir, shared) as image:
                        cell = _run_cell(target, job, cfg, image, workdir, rep)
                except BenchError as e:
                    cell = FioCell(target.key, job.key, rep, error=str(e))
                    ui.log(f"[red]{target.label}, {job.label}: {e}")
                if measured:
                    cells.append(cell)
                    ui.advance()
    return FioRun(cfg, cells, skipped, notes, time.monotonic() - started)


# Reporting.


def _fmt_value(job: FioJob, v: float | None) -> str:
    if v is None:
        return ""
    if job.metric == "IOPS":
        return f"{v / 1000:.1f} k" if v >= 1000 else f"{v:.0f}"
    return f"{v:.0f}"


def tables(r: FioRun) -> list[Table]:
    """The main table (every row, with each value's ratio to its reference), and the qcow
    rows against tapnbd raw."""
    jobs = list(r.config.jobs)
    headers = ["server, image"]
    for j in jobs:
        headers += [f"{j.label} ({j.metric})", "x ref"]
    main = Table("fio: every row, with its ratio to the reference (x ref)", headers)
    for t in r.ran:
        row = [t.label + ("" if t.peer else " **")]
        for j in jobs:
            if t.state == "fresh" and not j.writes:
                row += ["(holes)", ""]
                continue
            v = r.value(t.key, j.key)
            if v is None:
                row += ["error" if r.error(t.key, j.key) else "", ""]
                continue
            row += [_fmt_value(j, v), fmt_ratio(ratio(v, r.reference(t, j.key)))]
        main.rows.append(row)
    out = [main]
    qcow = [t for t in r.ran if t.layout != images.RAW]
    if qcow and any(t.key == "tapnbd-raw" for t in r.ran):
        q = Table(
            "fio: qcow rows as a fraction of tapnbd raw in the same run",
            ["server, image"] + [j.label for j in jobs],
        )
        for t in qcow:
            row = [t.label]
            for j in jobs:
                if t.state == "fresh" and not j.writes:
                    row.append("")
                else:
                    row.append(fmt_ratio(r.vs_tapnbd_raw(t, j.key)))
            q.rows.append(row)
        out.append(q)
    return out


def targets_table(r: FioRun) -> Table:
    """The issue targets this run can speak to, with the ratios it measured."""
    t = Table("fio targets (issues 2 and 3)", ["target", "measured", "met"], align=["l", "l", "l"])
    jobs = list(r.config.jobs)
    ran = {x.key for x in r.ran}
    if "tapnbd-raw" in ran:
        for j in jobs:
            ref_t, ref_v = r.best_peer("raw", j.key)
            v = ratio(r.value("tapnbd-raw", j.key), ref_v)
            name = ref_t.label if ref_t else "?"
            t.rows.append(
                [
                    f"tapnbd raw >= 1.0x best peer, {j.label}",
                    f"{fmt_ratio(v)} (vs {name})",
                    _met(v, 1.0),
                ]
            )
    if "tapnbd-raw-nostats" in ran and "tapnbd-raw" in ran:
        for j in jobs:
            v = ratio(r.value("tapnbd-raw", j.key), r.value("tapnbd-raw-nostats", j.key))
            t.rows.append([f"statistics on/off >= 0.98, {j.label}", fmt_ratio(v), _met(v, 0.98)])
    if "tapnbd-qcow-opt-full" in ran and "tapnbd-raw" in ran:
        for j in jobs:
            v = r.vs_tapnbd_raw(next(x for x in r.ran if x.key == "tapnbd-qcow-opt-full"), j.key)
            t.rows.append(
                [
                    f"qcow optimised (full) >= 0.95x tapnbd raw, {j.label}",
                    fmt_ratio(v),
                    _met(v, 0.95),
                ]
            )
    for layout, short in ((images.QCOW_OPT, "opt"), (images.QCOW_NORMAL, "normal")):
        mine, theirs = f"tapnbd-qcow-{short}-fresh", f"qemu-nbd-qcow-{short}-fresh"
        if mine in ran and theirs in ran:
            for j in jobs:
                if not j.writes:
                    continue
                v = ratio(r.value(mine, j.key), r.value(theirs, j.key))
                t.rows.append(
                    [
                        f"allocating writes >= 10x qemu-nbd, {images.IMAGE_LABELS[layout]}, {j.label}",
                        fmt_ratio(v),
                        _met(v, 10.0),
                    ]
                )
    # Issues 13 and 17: >= 1.0x qemu-nbd on the same file, >= 0.9x tapnbd raw when full.
    _format_goals(r, t, "qcow2", "qcow2", ("full", "fresh", "overlay"))
    _format_goals(r, t, "vhd", "vpc", ("full", "fresh"))
    return t


def repetitions_table(r: FioRun) -> Table:
    """Issue 15's three ratios, repetition by repetition, with their median: on a noisy
    machine the median of paired ratios is steadier than the ratio of two medians. The
    interval (``median_interval``, from 6 repetitions on) says whether the run tells the
    median apart from a goal at all."""
    t = Table(
        "issue 15's ratios in each repetition",
        ["ratio", "job", "each repetition", "median", "95 % interval"],
        align=["l", "l", "l", "r", "r"],
    )
    if r.config.repeat < 2:
        return t
    ran = {x.key for x in r.ran}
    for j in r.config.jobs:
        peer, _ = r.best_peer("raw", j.key)
        pairs = [
            ("statistics on / off", "tapnbd-raw", "tapnbd-raw-nostats"),
            ("qcow optimised (full) / tapnbd raw", "tapnbd-qcow-opt-full", "tapnbd-raw"),
        ]
        if peer is not None:
            pairs.insert(0, (f"tapnbd raw / {peer.label}", "tapnbd-raw", peer.key))
        for label, a, b in pairs:
            each = r.per_repetition(a, b, j.key) if a in ran and b in ran else []
            if each:
                ci = median_interval(each)
                t.rows.append(
                    [label, j.label, " ".join(f"{x:.2f}" for x in each),
                     f"{statistics.median(each):.2f}",
                     f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else ""]
                )  # fmt: skip
    return t


def _format_goals(r: FioRun, t: Table, fmt: str, qemu_fmt: str, states: tuple[str, ...]) -> None:
    """tapnbd ``fmt`` >= 1.0x qemu-nbd -f ``qemu_fmt`` on the same file on every row it
    ran (a fresh image only on the write rows), and >= 0.9x tapnbd raw when full."""
    ran = {x.key: x for x in r.ran}
    for state in states:
        mine, theirs = f"tapnbd-{fmt}-{state}", f"qemu-nbd-{fmt}-{state}"
        if mine not in ran or theirs not in ran:
            continue
        for j in r.config.jobs:
            if state == "fresh" and not j.writes:
                continue
            v = ratio(r.value(mine, j.key), r.value(theirs, j.key))
            t.rows.append(
                [
                    f"{fmt} ({state}) >= 1.0x qemu-nbd -f {qemu_fmt}, {j.label}",
                    fmt_ratio(v),
                    _met(v, 1.0),
                ]
            )
    if f"tapnbd-{fmt}-full" in ran and "tapnbd-raw" in ran:
        for j in r.config.jobs:
            v = r.vs_tapnbd_raw(ran[f"tapnbd-{fmt}-full"], j.key)
            t.rows.append(
                [f"{fmt} (full) >= 0.9x tapnbd raw, {j.label}", fmt_ratio(v), _met(v, 0.9)]
            )


def _met(v: float | None, goal: float) -> str:
    if v is None:
        return "n/a"
    return "yes" if v >= goal else "no"


def csv_rows(r: FioRun) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    by_key = {t.key: t for t in r.config.targets}
    jobs = {j.key: j for j in r.config.jobs}
    for c in r.cells:
        t, j = by_key[c.target], jobs[c.job]
        d = asdict(c)
        ref = r.reference(t, j.key)
        rows.append(
            {
                "target": t.key,
                "label": t.label,
                "server": t.server,
                "image": t.layout,
                "state": t.state,
                "job": j.key,
                "metric": j.metric,
                **{
                    k: d[k] for k in ("run", "value", "bw_mib", "iops", "lat_mean_us", "lat_p99_us")
                },
                "client_cpu_pct": c.client_cpu_pct,
                "server_cpu_pct": c.server_cpu_pct,
                "ratio_to_reference": ratio(c.value, ref),
                "ratio_to_tapnbd_raw": ratio(c.value, r.value("tapnbd-raw", j.key)),
                "error": c.error,
            }
        )
    return rows


def markdown(r: FioRun, machine_md: str) -> str:
    cfg = r.config
    parts = [
        "# fio: tapnbd against its peers"
        + (" (quick mode: not a measurement)" if cfg.quick else ""),
        "",
        machine_md,
        "",
        f"Each cell: one fio job of {cfg.runtime:g} s (nbd engine, one connection), "
        f"`--size={cfg.size // MiB}M`, median of {cfg.repeat} run(s); "
        f"the whole run took {r.elapsed:.0f} s. Sequential jobs in MiB/s, random jobs in IOPS.",
        "",
        "**x ref** is the row's ratio to its reference in the same run: for raw rows the best "
        "peer (qemu-nbd, nbdkit, nbd-server) in that column; for qcow, qcow2 and vhd rows "
        "qemu-nbd serving the same file in the same state. Rows marked ** are tapnbd.",
        "",
    ]
    for t in tables(r):
        parts += [f"## {t.title}", "", t.markdown(), ""]
    for tt in (targets_table(r), repetitions_table(r)):
        if tt.rows:
            parts += [f"## {tt.title}", "", tt.markdown(), ""]
    parts += ["## Images and notes", ""]
    parts += [f"- {n}" for n in r.notes]
    parts += [
        "- every server is started for its cell and stopped after it; jobs run one at a time, "
        "each job against every server in turn, the servers' order in each repetition a "
        "row of a Williams design (each server in each place, and after each other server, "
        "equally often over a whole number of squares); before the first write cell of a "
        "job on each shared full image, one unmeasured cell of the same server and job "
        "(fio.with_warm_ups); `sync` before each cell, so that no cell pays for the writeback of an "
        "earlier one",
        "- peers run with their defaults: plain `qemu-nbd -f FMT -t` (one client, so no "
        "multi-conn; qcow2 with `--cache=writeback --aio=threads`), `nbdkit file`, "
        "`nbd-server` from a config with `allowlist = true`",
        "- server CPU is the server process's user+system time over the cell's wall time, "
        "in the CSV (client and server share the two cores)",
    ]
    for key, why in r.skipped.items():
        parts.append(f"- not run: `{key}`: {why}")
    errors = [c for c in r.cells if c.error]
    for c in errors:
        parts.append(f"- error: `{c.target}` {c.job}: {c.error.splitlines()[0]}")
    parts.append("")
    return "\n".join(parts)


def chart(r: FioRun, path: Path) -> str | None:
    """Bars of each raw row's ratio to the best peer, per job."""
    jobs = list(r.config.jobs)
    raw = [t for t in r.ran if t.layout == images.RAW]
    if not raw:
        return "no raw rows ran"
    series: dict[str, list[float | None]] = {}
    for t in raw:
        series[t.label] = [ratio(r.value(t.key, j.key), r.best_peer("raw", j.key)[1]) for j in jobs]
    return bar_chart(
        path,
        title="fio, raw image: ratio to the best peer in the same run (higher is better)",
        categories=[j.label for j in jobs],
        series=series,
        ylabel="x best peer",
        reference=1.0,
    )


def write_outputs(r: FioRun, out: Path, machine_md: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, csvp, png = out / "fio.md", out / "fio.csv", out / "fio.png"
    md.write_text(markdown(r, machine_md))
    write_csv(csvp, csv_rows(r))
    written = [md, csvp]
    if chart(r, png) is None:
        written.append(png)
    return written
