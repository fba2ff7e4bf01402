"""The blktap Bonnie table (issue 6): bonnie++ on ext4 on each device under test.

Rows, in the seed's spirit:

- **Tap raw**: tapnbd's raw driver, attached (``tapnbd attach --via fuse``).
- **Loop**: the kernel loop device straight on the raw file, the kernel baseline.
- **Qcow normal** / **Qcow optimised**: tapnbd on a qcow image without / with blktap's
  allocation optimisation.
- **qemu-nbd raw** / **qemu-nbd qcow**: the same images served by qemu-nbd.
- **nbdkit file**: the raw image served by nbdkit.

Each row gets a fresh sparse image, a device (see bench/attach.py: every NBD row goes
through nbdfuse + losetup), ``mkfs.ext4``, a mount, and then::

    nocache bonnie++ -d MNT -s SIZE -r RAM -n 0 -u root -q

Page cache, so that the figures measure I/O and not memory:

- the file is 4x the RAM bonnie is told about (2 GiB and 512 MiB in the full run);
- ``nocache`` (an LD_PRELOAD shim) drops the bonnie file's pages from ext4's page cache
  every time bonnie closes it, after bonnie's own fsync: each phase (block write, rewrite,
  block read, seeks) starts cold and reads through the device. bonnie++ 2.00a's ``-D``
  opens only the write phase with O_DIRECT (rewrite, read and seeks stay buffered and would
  be served from memory), and it breaks the per-char tests, so it is not the default;
- the loop device of each NBD row runs with direct I/O, so there is no second page cache
  on the FUSE file; the one page cache left under ext4 is the server's (the Loop row's) on
  the image file, the same "disk" for every row;
- between rows: sync and ``echo 3 > /proc/sys/vm/drop_caches`` where permitted.

The Loop row writes a file ``loop_file_factor`` times bigger (8 GiB in the full run).
Its block read comes from the host's page cache on the image file, as every row's does,
but with no NBD, FUSE or server on the way the kernel reads 2 GiB in under half a
second, and bonnie++ prints ``+++++`` for a phase that short (issue 15, item 6). A
bigger file keeps the cache regime the same for every row and only makes the timing
window long enough; direct I/O on the Loop row's image file would instead time the disk
against the other rows' page cache. The price: the Loop row's write phases leave 8 GiB of
dirty pages, more of which reach the disk, so its write columns are not like for like.

One run is one figure per row, and on a shared machine the same row swings by 1.5x or
more between runs. ``--repeat N`` runs N rounds, each in the opposite order to the one
before (the first row always ran right after the daemon started, the last after Loop's
8 GiB of writeback), and reports medians and each round's ratio.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench import images
from bench.attach import (
    TAPNBD_ATTACH,
    AttachVia,
    Device,
    block_path_unavailable,
    ext4_mounted,
    loop_device,
    nbd_device,
    tapnbd_daemon,
    unavailable_for,
)
from bench.images import GiB, MiB
from bench.proc import BenchError, drop_caches, have, run
from bench.report import Table, bar_chart, fmt_ratio, ratio, write_csv
from bench.servers import ServerOptions, unavailable_reason
from bench.ui import UI

CacheMode = Literal["nocache", "direct", "none"]


@dataclass(frozen=True)
class BonnieRow:
    key: str
    label: str
    device: Literal["loop", "nbd"]
    server: str | None
    layout: str


ROWS: tuple[BonnieRow, ...] = (
    BonnieRow("tap-raw", "Tap raw", "nbd", "tapnbd", images.RAW),
    BonnieRow("loop", "Loop", "loop", None, images.RAW),
    BonnieRow("qcow-normal", "Qcow normal", "nbd", "tapnbd", images.QCOW_NORMAL),
    BonnieRow("qcow-opt", "Qcow optimised", "nbd", "tapnbd", images.QCOW_OPT),
    BonnieRow("qemu-nbd-raw", "qemu-nbd raw", "nbd", "qemu-nbd", images.RAW),
    BonnieRow("qemu-nbd-qcow", "qemu-nbd qcow", "nbd", "qemu-nbd", images.QCOW_NORMAL),
    BonnieRow("nbdkit-file", "nbdkit file", "nbd", "nbdkit", images.RAW),
)

#: The columns of the seed's full table, as (CSV field index, our name, label).
#: bonnie++'s CSV (format 1.98): 9/10 putc, 11/12 block write, 13/14 rewrite,
#: 15/16 getc, 17/18 block read, 19/20 seeks, each value then %CPU.
COLUMNS: tuple[tuple[int, str, str], ...] = (
    (9, "putc", "Per Char out"),
    (11, "write", "Block out"),
    (13, "rewrite", "Rewrite"),
    (15, "getc", "Per Char in"),
    (17, "read", "Block in"),
    (19, "seeks", "Seeks"),
)


@dataclass
class BonnieConfig:
    file_mib: int = 2048  # bonnie -s, the seed's 2G
    ram_mib: int = 512  # bonnie -r: the file is 4x the RAM bonnie is told about
    image_size: int = 6 * GiB
    per_char_mib: int | None = None  # bonnie -fN; None: bonnie's default (20 MiB)
    cache: CacheMode = "nocache"
    rows: Sequence[BonnieRow] = ROWS
    attach: AttachVia = TAPNBD_ATTACH
    options: ServerOptions = field(default_factory=ServerOptions)
    quick: bool = False
    timeout: float = 3600.0
    #: A smaller file for rows too slow to finish a quick run otherwise (row key -> MiB).
    row_file_mib: dict[str, int] = field(default_factory=dict)
    #: The Loop row's file is this many times bigger, so bonnie++ can time its block
    #: read (see the module doc); -r stays the same.
    loop_file_factor: int = 4
    #: Rounds of every row. A round runs the rows in order, the next in reverse, so each
    #: row runs as often early as late in the run (the first row after the daemon
    #: starts, and the row after Loop's 8 GiB of writeback, are not alike).
    repeat: int = 1
    #: Run the first row once, unmeasured, before the first round. The alternating
    #: order balances the first place of each round between the rows, but not the
    #: run's first row, which met a cost the later ones did not: Tap raw, first in every
    #: run, ran block write at 0.42-0.84 of nbdkit's in round 1 of five runs of
    #: sessions 21 and 22 (median 0.66), against 0.84-1.02 in the later rounds it also
    #: opened.
    warm_up: bool = True

    def sizes(self, row: str) -> tuple[int, int]:
        """bonnie's -s and -r for ``row``, in MiB."""
        small = self.row_file_mib.get(row)
        if small is not None:
            return small, max(small // 4, 1)
        if row == "loop":
            return self.file_mib * self.loop_file_factor, self.ram_mib
        return self.file_mib, self.ram_mib

    def image_size_for(self, row: str) -> int:
        """The row's sparse image: room for its file three times over, as the default."""
        return max(self.image_size, 3 * self.sizes(row)[0] * MiB)

    @classmethod
    def quick_config(cls) -> BonnieConfig:
        # bonnie++ prints "+++++" instead of a figure for a phase that takes under half a
        # second, so the quick file must still take that long through the NBD rows (block
        # writes run at about 250 MB/s here, so 256 MiB takes about a second; the 1 MiB
        # per-character phase always times); the Loop row's reads stay too fast to time.
        # qemu-nbd's qcow driver allocates at about 3 MB/s through ext4 (a 384 MiB file
        # takes two minutes), so its quick row writes a smaller file. The Loop row keeps
        # the same file: a smoke run need not time its read.
        return cls(
            file_mib=256,
            ram_mib=64,
            image_size=768 * MiB,
            per_char_mib=1,
            quick=True,
            warm_up=False,
            row_file_mib={"qemu-nbd-qcow": 24},
            loop_file_factor=1,
        )


@dataclass
class BonnieResult:
    row: str
    values: dict[str, float | None] = field(default_factory=dict)  # K/s (seeks: /s)
    cpu: dict[str, float | None] = field(default_factory=dict)  # %CPU
    latency: dict[str, str] = field(default_factory=dict)
    device: str = ""
    how: str = ""
    server: str = ""
    direct_io: bool | None = None
    caches: str = ""
    image: str = ""
    seconds: float = 0.0
    load1: float | None = None  # the 1-minute load average when the row started
    csv_line: str = ""
    error: str = ""
    rep: int = 0  # the round it ran in (0-based)


def _number(text: str) -> float | None:
    text = text.strip()
    if not text or text.startswith("+"):
        return None  # "+++++": too fast for bonnie to time (or a test not run)
    try:
        return float(text)
    except ValueError:
        return None


def parse_bonnie_csv(
    text: str,
) -> tuple[dict[str, float | None], dict[str, float | None], dict[str, str], str]:
    """Values, %CPU and latencies from bonnie++'s CSV line (the last line that looks like one)."""
    lines = [
        ln for ln in text.splitlines() if ln.count(",") >= 20 and ln.split(",")[0][:1].isdigit()
    ]
    if not lines:
        raise BenchError(f"bonnie++ printed no CSV line: {text[-300:]!r}")
    line = lines[-1]
    f = line.split(",")
    values, cpu, latency = {}, {}, {}
    for i, name, _ in COLUMNS:
        values[name] = _number(f[i])
        cpu[name] = _number(f[i + 1])
    # latencies follow the file-creation fields: 6 of them, in the same order as COLUMNS.
    lat = f[38:44] if len(f) >= 44 else []
    for (_, name, _), value in zip(COLUMNS, lat, strict=False):
        latency[name] = value
    return values, cpu, latency, line


def bonnie_command(cfg: BonnieConfig, mnt: Path, name: str) -> list[str]:
    cmd = ["nocache"] if cfg.cache == "nocache" else []
    file_mib, ram_mib = cfg.sizes(name)
    cmd += ["bonnie++", "-d", str(mnt), "-s", str(file_mib), "-r", str(ram_mib)]
    cmd += ["-n", "0", "-u", "root", "-q", "-m", name]
    if cfg.per_char_mib is not None:
        cmd.append(f"-f{cfg.per_char_mib}")
    if cfg.cache == "direct":
        cmd.append("-D")
    return cmd


def select(rows: Sequence[BonnieRow], patterns: Sequence[str] | None) -> list[BonnieRow]:
    if not patterns:
        return list(rows)
    return [r for r in rows if any(fnmatch.fnmatch(r.key, p) for p in patterns)]


@dataclass
class BonnieRun:
    config: BonnieConfig
    results: list[BonnieResult]
    skipped: dict[str, str]
    notes: list[str]
    elapsed: float = 0.0

    def runs(self, key: str) -> list[BonnieResult]:
        """The row's results that did not fail, one per round, in the order they ran."""
        return [r for r in self.results if r.row == key and not r.error]

    def value(self, key: str, column: str, rep: int | None = None) -> float | None:
        """The row's figure in round ``rep``, or its median over the rounds.

        A round whose phase printed ``+++++`` (too fast to time) has no figure, so the
        median is over the rounds that timed it.
        """
        figures = [
            v
            for r in self.runs(key)
            if (rep is None or r.rep == rep) and (v := r.values.get(column)) is not None
        ]
        return statistics.median(figures) if figures else None

    def ratios(self, a: str, b: str, column: str) -> list[float | None]:
        """a / b in each round (the figures of one round ran minutes apart, not hours)."""
        return [
            ratio(self.value(a, column, rep), self.value(b, column, rep))
            for rep in range(self.config.repeat)
        ]


def row_unavailable(row: BonnieRow, cfg: BonnieConfig, workdir: Path) -> str | None:
    why = block_path_unavailable()
    if why:
        return why
    if row.server:
        why = unavailable_reason(row.server, images.fmt_of(row.layout))
        why = why or unavailable_for(row.server, cfg.attach)
        if why:
            return why
    why = images.layout_unavailable(row.layout, workdir)
    if why:
        return why
    if row.server == "tapnbd" and row.layout != images.RAW:
        support = images.qcow_support(workdir)
        if not support.serve:
            return support.why
    if cfg.cache == "nocache" and not have("nocache"):
        return "nocache is not installed (apt-get install nocache, or --cache direct)"
    return None


@contextlib.contextmanager
def _device(
    row: BonnieRow, image: Path, cfg: BonnieConfig, workdir: Path, state_dir: Path | None
) -> Iterator[Device]:
    if row.device == "loop":
        with loop_device(image, direct_io=False) as dev:
            yield dev
        return
    assert row.server is not None
    with nbd_device(
        row.server,
        image,
        images.fmt_of(row.layout),
        workdir,
        via=cfg.attach,
        state_dir=state_dir,
        options=cfg.options,
    ) as dev:
        yield dev


def _run_row(
    row: BonnieRow, cfg: BonnieConfig, workdir: Path, state_dir: Path | None, ui: UI
) -> BonnieResult:
    result = BonnieResult(row.key, load1=os.getloadavg()[0])
    started = time.monotonic()
    ext = "raw" if row.layout == images.RAW else "qcow"
    image = workdir / f"bonnie-{row.key}.{ext}"
    log = workdir / "logs" / f"bonnie-{row.key}.log"
    ui.phase(row.label, "create image")
    result.image = images.create_image(image, cfg.image_size_for(row.key), row.layout, workdir)
    try:
        ui.phase(row.label, "drop caches")
        result.caches = drop_caches()
        ui.phase(row.label, "attach")
        with _device(row, image, cfg, workdir, state_dir) as dev:
            result.device, result.how, result.server = dev.path, dev.how, dev.server
            result.direct_io = dev.direct_io
            ui.phase(row.label, f"mkfs.ext4 on {dev.path}")
            mnt = workdir / f"mnt-{row.key}"
            with ext4_mounted(dev.path, mnt, log):
                ui.phase(
                    row.label,
                    f"bonnie++ -s {cfg.sizes(row.key)[0]}M (write, rewrite, read, seeks)",
                )
                out = run(
                    bonnie_command(cfg, mnt, row.key),
                    what=f"bonnie++ on {row.label}",
                    timeout=cfg.timeout,
                    log=log,
                )
                ui.phase(row.label, "umount, detach")
        values, cpu, latency, line = parse_bonnie_csv(out)
        result.values, result.cpu, result.latency, result.csv_line = values, cpu, latency, line
    finally:
        image.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (workdir / f"mnt-{row.key}").rmdir()
    result.seconds = time.monotonic() - started
    return result


def run_bonnie(cfg: BonnieConfig, workdir: Path, ui_console: Any = None) -> BonnieRun:
    started = time.monotonic()
    skipped: dict[str, str] = {}
    for row in cfg.rows:
        why = row_unavailable(row, cfg, workdir)
        if why:
            skipped[row.key] = why
    rows = [r for r in cfg.rows if r.key not in skipped]
    results: list[BonnieResult] = []
    notes = [
        f"bonnie++ file {cfg.file_mib} MiB, told RAM {cfg.ram_mib} MiB (-r), "
        f"on ext4 (mkfs with inode tables and journal initialised up front) on a fresh "
        f"{cfg.image_size // MiB} MiB sparse image per row",
        _cache_note(cfg),
    ]
    notes += [
        f"`{key}` wrote a {mib} MiB file instead (quick mode: it is too slow for the full size)"
        for key, mib in cfg.row_file_mib.items()
        if any(r.key == key for r in rows)
    ]
    if cfg.loop_file_factor != 1 and any(r.key == "loop" for r in rows):
        loop_mib = cfg.sizes("loop")[0]
        notes.append(
            f"`loop` wrote a {loop_mib} MiB file ({cfg.loop_file_factor}x, on a "
            f"{cfg.image_size_for('loop') // MiB} MiB image), so that its block read is "
            "timed: it comes from the host's page cache on the image file, like every "
            "row's, and at the same size it ends in under half a second, which bonnie++ "
            "prints as `+++++`. A bigger file keeps every row in the same cache regime; "
            "direct I/O on the Loop row's image would time the disk against the other "
            "rows' page cache instead. Its write phases leave more dirty pages, more of "
            "which reach the disk, so WRITE vs Loop is not like for like"
        )
    needs_daemon = cfg.attach == "tapnbd-attach" and any(r.server == "tapnbd" for r in rows)
    if cfg.repeat > 1:
        notes.append(
            f"{cfg.repeat} rounds; a round runs the rows in order and the next in reverse, "
            "so no row is always first or always after another; each figure is the median "
            "over the rounds, and each ratio is also given per round"
        )
    warm_up = cfg.warm_up and bool(rows)
    if warm_up:
        notes.append(
            f"before the first round, a warm-up row of {rows[0].label}, not measured: the "
            "run's first row met a cost that later rows, first in their round too, did not"
        )
    cells = len(rows) * cfg.repeat + warm_up
    with UI("bonnie", cells, ui_console) as ui, contextlib.ExitStack() as stack:
        state_dir: Path | None = None
        if needs_daemon:
            ui.phase("tapnbd", "daemon start")
            state_dir = stack.enter_context(tapnbd_daemon(workdir / "tapnbd-state"))
        if warm_up:
            ui.log(f"{rows[0].label}: warm-up row, not measured")
            try:
                _run_row(rows[0], cfg, workdir, state_dir, ui)
            except BenchError as e:  # the measured rounds meet it again and report it
                ui.log(f"[yellow]{rows[0].label}: warm-up: {e}")
            ui.advance()
        for rep in range(cfg.repeat):
            for row in rows if rep % 2 == 0 else rows[::-1]:
                try:
                    result = _run_row(row, cfg, workdir, state_dir, ui)
                except BenchError as e:
                    result = BonnieResult(row.key, error=str(e))
                    ui.log(f"[red]{row.label}: {e}")
                result.rep = rep
                results.append(result)
                ui.advance()
        if needs_daemon:
            ui.phase("tapnbd", "daemon stop")
    return BonnieRun(cfg, results, skipped, notes, time.monotonic() - started)


def _cache_note(cfg: BonnieConfig) -> str:
    if cfg.cache == "nocache":
        return (
            "page cache: `nocache` drops the bonnie file's pages after each phase (after "
            "bonnie's fsync), so every phase reads and writes through the device; the NBD "
            "rows' loop devices use direct I/O (no page cache on the FUSE file); caches "
            "dropped between rows. The one cache left is the host's on the image file, "
            "which every row has alike (the servers and the Loop row do buffered I/O on it): "
            "bonnie's fsync at the end of each output phase pushes the writes through to the "
            "disk, but the input phases read what the output phases left in that cache, so "
            "READ compares the software paths (ext4, loop, FUSE, NBD, server) more than "
            "the disk"
        )
    if cfg.cache == "direct":
        return (
            "page cache: bonnie++ -D (O_DIRECT for the block write phase only; rewrite, read "
            "and seeks go through ext4's page cache)"
        )
    return "page cache: not bypassed (figures include ext4's page cache)"


# Reporting.


def _k(v: float | None) -> str:
    return "+++++" if v is None else f"{v:.0f}"


def full_table(r: BonnieRun) -> Table:
    repeats = r.config.repeat > 1
    headers = ["row", *(["round"] if repeats else []), "size"]
    for _, _, label in COLUMNS:
        headers += [f"{label} {'/s' if label == 'Seeks' else 'K/s'}", "%CPU"]
    t = Table("Bonnie, full table (seed layout)", headers)
    by_key = {row.key: row for row in r.config.rows}
    for res in r.results:
        label = by_key[res.row].label
        first = [label, *([str(res.rep + 1)] if repeats else [])]
        if res.error:
            t.rows.append([*first, "error"] + [""] * (len(headers) - len(first) - 1))
            continue
        row = [*first, f"{r.config.sizes(res.row)[0]}M"]
        for _, name, _ in COLUMNS:
            v = res.values.get(name)
            row.append(("+++++" if v is None else f"{v:.1f}") if name == "seeks" else _k(v))
            c = res.cpu.get(name)
            row.append("" if c is None else f"{c:.0f}")
        t.rows.append(row)
    return t


def summary_rows(r: BonnieRun) -> list[dict[str, object]]:
    """One line per row: its block figures (medians over the rounds) and the ratios."""
    out: list[dict[str, object]] = []
    for row in r.config.rows:
        if not r.runs(row.key):
            continue
        rd, wr = r.value(row.key, "read"), r.value(row.key, "write")
        out.append(
            {
                "row": row.key,
                "label": row.label,
                "read_kps": rd,
                "write_kps": wr,
                "read_vs_loop": ratio(rd, r.value("loop", "read")),
                "write_vs_loop": ratio(wr, r.value("loop", "write")),
                "read_vs_tap_raw": ratio(rd, r.value("tap-raw", "read")),
                "write_vs_tap_raw": ratio(wr, r.value("tap-raw", "write")),
            }
        )
    return out


def summary_table(r: BonnieRun) -> Table:
    rounds = r.config.repeat
    t = Table(
        "Bonnie, block I/O summarised (K/s"
        + (f", medians of {rounds} rounds)" if rounds > 1 else ")"),
        [
            "row",
            "READ",
            "WRITE",
            "READ vs Loop",
            "WRITE vs Loop",
            "READ vs Tap raw",
            "WRITE vs Tap raw",
        ],
    )
    for s in summary_rows(r):
        t.rows.append(
            [
                str(s["label"]),
                _k(_f(s["read_kps"])),
                _k(_f(s["write_kps"])),
                fmt_ratio(_f(s["read_vs_loop"])),
                fmt_ratio(_f(s["write_vs_loop"])),
                fmt_ratio(_f(s["read_vs_tap_raw"])),
                fmt_ratio(_f(s["write_vs_tap_raw"])),
            ]
        )
    return t


def _f(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _mib(v: object) -> float | None:
    f = _f(v)
    return None if f is None else f / 1024


def targets_table(r: BonnieRun) -> Table:
    repeats = r.config.repeat > 1
    headers = ["target", "measured", "met"] + (["each round"] if repeats else [])
    t = Table("Bonnie targets (issues 6 and 15)", headers, align=["l"] * len(headers))
    checks = [
        ("Tap raw >= 1.0x Loop, block read", "tap-raw", "loop", "read", 1.0),
        ("Tap raw >= 1.0x Loop, block write", "tap-raw", "loop", "write", 1.0),
        # Issue 15: the same nbdfuse + loop path, tapnbd against nbdkit's file plugin.
        ("Tap raw >= 1.0x nbdkit file, block read", "tap-raw", "nbdkit-file", "read", 1.0),
        ("Tap raw >= 1.0x nbdkit file, block write", "tap-raw", "nbdkit-file", "write", 1.0),
        ("Qcow optimised >= 0.95x Tap raw, block read", "qcow-opt", "tap-raw", "read", 0.95),
        ("Qcow optimised >= 0.95x Tap raw, block write", "qcow-opt", "tap-raw", "write", 0.95),
        (
            "Qcow optimised >= 2x qemu-nbd qcow, block write",
            "qcow-opt",
            "qemu-nbd-qcow",
            "write",
            2.0,
        ),
    ]
    for name, a, b, col, goal in checks:
        v = ratio(r.value(a, col), r.value(b, col))
        met = "n/a" if v is None else ("yes" if v >= goal else "no")
        line = [name, fmt_ratio(v) or "n/a", met]
        if repeats:
            line.append(" ".join(fmt_ratio(x) or "n/a" for x in r.ratios(a, b, col)))
        t.rows.append(line)
    return t


def details_table(r: BonnieRun) -> Table:
    t = Table(
        "How each row was run",
        [
            "row",
            "round",
            "image",
            "device",
            "attach",
            "loop dio",
            "caches",
            "load",
            "seconds",
            "server",
        ],
        align=["l", "r", "l", "l", "l", "l", "l", "r", "r", "l"],
    )
    by_key = {row.key: row for row in r.config.rows}
    for res in r.results:
        dio = "" if res.direct_io is None else ("on" if res.direct_io else "off")
        t.rows.append(
            [
                by_key[res.row].label,
                str(res.rep + 1),
                res.image,
                res.device,
                res.how,
                dio,
                res.caches,
                "" if res.load1 is None else f"{res.load1:.1f}",
                f"{res.seconds:.0f}",
                f"`{res.server}`" if res.server else "",
            ]
        )
    return t


def csv_rows(r: BonnieRun) -> list[dict[str, object]]:
    by_key = {row.key: row for row in r.config.rows}
    out: list[dict[str, object]] = []
    for res in r.results:
        d: dict[str, object] = {
            "row": res.row,
            "label": by_key[res.row].label,
            "round": res.rep + 1,
            "size_mib": r.config.sizes(res.row)[0],
        }
        for _, name, _ in COLUMNS:
            d[f"{name}_{'per_s' if name == 'seeks' else 'kps'}"] = res.values.get(name)
            d[f"{name}_cpu"] = res.cpu.get(name)
        for _, name, _ in COLUMNS:
            d[f"{name}_latency"] = res.latency.get(name, "")
        d.update(
            device=res.device,
            attach=res.how,
            loop_direct_io=res.direct_io,
            caches=res.caches,
            load1=res.load1,
            seconds=round(res.seconds, 1),
            error=res.error,
            bonnie_csv=res.csv_line,
        )
        out.append(d)
    return out


def markdown(r: BonnieRun, machine_md: str) -> str:
    cfg = r.config
    cmd = " ".join(bonnie_command(cfg, Path("MNT"), "ROW"))
    parts = [
        "# Bonnie: the blktap table, today"
        + (" (quick mode: not a measurement)" if cfg.quick else ""),
        "",
        machine_md,
        "",
        f"Each row: `{cmd}` on a freshly made ext4; the whole run took {r.elapsed:.0f} s.",
        "",
    ]
    for t in (summary_table(r), targets_table(r), full_table(r), details_table(r)):
        parts += [f"## {t.title}", "", t.markdown(), ""]
    parts += ["## What was done about the page cache", ""]
    parts += [f"- {n}" for n in r.notes]
    parts += [
        "- per-char columns are bonnie's putc/getc loop on a small file: CPU-bound, "
        "like the seed's (which ran at 50-90 % CPU)",
        "- `+++++` is bonnie's way of saying a phase finished too fast to time",
        "- load: the 1-minute load average as the row started; the machine is shared, so "
        "rows that ran under a higher load are slower for reasons of their own",
    ]
    for key, why in r.skipped.items():
        parts.append(f"- not run: `{key}`: {why}")
    for res in r.results:
        if res.error:
            parts.append(f"- error: `{res.row}`: {res.error.splitlines()[0]}")
    parts.append("")
    return "\n".join(parts)


def chart(r: BonnieRun, path: Path) -> str | None:
    rows = summary_rows(r)
    if not rows:
        return "no rows ran"
    labels = [str(s["label"]) for s in rows]
    rd = [_mib(s["read_kps"]) for s in rows]
    wr = [_mib(s["write_kps"]) for s in rows]
    return bar_chart(
        path,
        title=f"bonnie++ block I/O, {r.config.file_mib} MiB file (ratio to Tap raw on each bar)",
        categories=labels,
        series={"READ (block in)": rd, "WRITE (block out)": wr},
        ylabel="MiB/s",
        annotate={
            "READ (block in)": [fmt_ratio(_f(s["read_vs_tap_raw"])) for s in rows],
            "WRITE (block out)": [fmt_ratio(_f(s["write_vs_tap_raw"])) for s in rows],
        },
    )


def write_outputs(r: BonnieRun, out: Path, machine_md: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, full, summ, png = (
        out / "bonnie.md",
        out / "bonnie.csv",
        out / "bonnie-summary.csv",
        out / "bonnie.png",
    )
    md.write_text(markdown(r, machine_md))
    write_csv(full, csv_rows(r))
    write_csv(summ, summary_rows(r))
    written = [md, full, summ]
    if chart(r, png) is None:
        written.append(png)
    return written
