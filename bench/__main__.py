"""Benchmarks: tapnbd beside qemu-nbd, nbdkit and nbd-server, and the blktap Bonnie table.

\b
    python -m bench fio               # every row, 5 s per cell
    python -m bench fio --only 'tapnbd-raw' --only '*-raw' --jobs randread
    python -m bench bonnie            # blktap's Bonnie table (root, loop, FUSE)
    python -m bench all               # fio, Bonnie and start-up, one results directory
    python -m bench fio --quick       # a smoke run: small image, 1 s cells (not a measurement)
    python -m bench ring              # the blkif ring against NBD, same driver and image
    python -m bench startup           # CLI start-up against `import typer`, interleaved

Results go to --out, by default bench/results/DATE-HOST/ (ignored by git: add a run
you quote with git add -f), as Markdown, CSV and, with matplotlib, PNG charts.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from bench import bonnie, fio, rbd, ring, startup
from bench.images import MiB
from bench.proc import BenchError, cleanup_on_signals
from bench.report import machine, machine_markdown, run_dir
from bench.servers import ServerOptions
from tapnbd.cli.app import PLAIN

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=__doc__,
    rich_markup_mode=PLAIN,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
err = Console(stderr=True)

OutOpt = Annotated[
    Path | None,
    typer.Option(help="Results directory (default: bench/results/DATE-HOST, ignored by git)."),
]
QuickOpt = Annotated[
    bool, typer.Option(help="Smoke run: tiny image and short cells; the figures mean nothing.")
]
WorkOpt = Annotated[
    Path | None,
    typer.Option(help="Scratch directory for images (default: a temporary one under /var/tmp)."),
]

RESULTS = Path(__file__).resolve().parent / "results"


@contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    # /var/tmp, not /tmp: the images must live on a real file system, not tmpfs, for the
    # Bonnie rows and for SEEK_DATA and fallocate to behave as they would in production.
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    path = Path(tempfile.mkdtemp(prefix="tapnbd-bench-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _bench_run(given: Path | None) -> Iterator[Path]:
    """One run's scratch directory, cleaned up on a signal too; a BenchError ends the
    command with its message and exit code 2."""
    with cleanup_on_signals(), _workdir(given) as work:
        try:
            yield work
        except BenchError as e:
            err.print(f"[red]bench: {e}")
            raise typer.Exit(2) from None


def _out(out: Path | None) -> Path:
    if importlib.util.find_spec("matplotlib") is None:
        err.print(
            "bench: matplotlib is not installed, so no PNG charts (Markdown and CSV only); "
            "`make bench` installs it (pip install -e '.[bench]')",
            highlight=False,
            markup=False,  # "[bench]" is text, not a style
        )
    return out if out is not None else run_dir(RESULTS)


def _fio(
    out: Path,
    work: Path,
    quick: bool,
    only: list[str] | None,
    jobs: list[str] | None,
    runtime: float | None,
    size_mib: int | None,
    repeat: int,
    qemu_shared: int,
) -> fio.FioRun:
    cfg = fio.FioConfig.quick_config() if quick else fio.FioConfig()
    cfg.targets = fio.select(fio.TARGETS, only)
    cfg.jobs = fio.select_jobs(jobs)
    if not cfg.targets or not cfg.jobs:
        raise typer.BadParameter("--only/--jobs select nothing")
    if runtime is not None:
        cfg.runtime = runtime
    if size_mib is not None:
        cfg.size = size_mib * MiB
    cfg.repeat = repeat
    cfg.options = ServerOptions(qemu_shared=qemu_shared)
    r = fio.run_fio(cfg, work, err)
    for t in [*fio.tables(r), fio.targets_table(r)]:
        console.print(t.rich())
    for path in fio.write_outputs(r, out, machine_markdown(machine())):
        console.print(f"wrote {path}")
    return r


def _bonnie(
    out: Path,
    work: Path,
    quick: bool,
    only: list[str] | None,
    file_mib: int | None,
    repeat: int = 1,
    warm_up: bool | None = None,
) -> bonnie.BonnieRun:
    cfg = bonnie.BonnieConfig.quick_config() if quick else bonnie.BonnieConfig()
    cfg.repeat = repeat
    if warm_up is not None:
        cfg.warm_up = warm_up
    cfg.rows = bonnie.select(bonnie.ROWS, only)
    if not cfg.rows:
        raise typer.BadParameter("--only selects no row")
    if file_mib is not None:
        cfg.file_mib = file_mib
        cfg.row_file_mib = {}
        cfg.ram_mib = max(file_mib // 4, 1)
        cfg.image_size = max(cfg.image_size, 3 * file_mib * MiB)
    r = bonnie.run_bonnie(cfg, work, err)
    for t in (bonnie.summary_table(r), bonnie.full_table(r), bonnie.targets_table(r)):
        console.print(t.rich())
    for path in bonnie.write_outputs(r, out, machine_markdown(machine())):
        console.print(f"wrote {path}")
    return r


def _failed(cells_with_errors: int) -> None:
    if cells_with_errors:
        err.print(f"[red]{cells_with_errors} cell(s) failed; see the Markdown for why")
        raise typer.Exit(1)


@app.command("fio")
def fio_cmd(
    quick: QuickOpt = False,
    only: Annotated[
        list[str] | None, typer.Option(help="Rows to run (glob on the key, e.g. '*-raw').")
    ] = None,
    jobs: Annotated[
        list[str] | None,
        typer.Option(help="Jobs: seqread seqwrite randread randwrite (the default), randread-qd1."),
    ] = None,
    runtime: Annotated[float | None, typer.Option(help="Seconds per cell.")] = None,
    size: Annotated[int | None, typer.Option(help="Image size in MiB.")] = None,
    repeat: Annotated[int, typer.Option(help="Runs per cell; the median is reported.")] = 1,
    qemu_shared: Annotated[int, typer.Option(help="qemu-nbd --shared (1 is its default).")] = 1,
    out: OutOpt = None,
    workdir: WorkOpt = None,
) -> None:
    """tapnbd against qemu-nbd, nbdkit and nbd-server: fio over NBD, one table, one run.

    ``--only rbd`` runs the Ceph RBD rows instead (tapnbd, qemu-nbd, fio's rbd engine).
    """
    if only == ["rbd"]:
        _rbd_rows(_out(out), workdir, quick, jobs, runtime, size, repeat)
        return
    with _bench_run(workdir) as work:
        r = _fio(_out(out), work, quick, only, jobs, runtime, size, repeat, qemu_shared)
    _failed(sum(1 for c in r.cells if c.error))


def _rbd_rows(
    out: Path,
    workdir: Path | None,
    quick: bool,
    jobs: list[str] | None,
    runtime: float | None,
    size: int | None,
    repeat: int,
) -> None:
    cfg = rbd.RbdConfig(size=256 * MiB, runtime=1.0) if quick else rbd.RbdConfig()
    cfg.jobs = fio.select_jobs(jobs)
    if runtime is not None:
        cfg.runtime = runtime
    if size is not None:
        cfg.size = size * MiB
    cfg.repeat = repeat
    command = " ".join(["python -m bench", *sys.argv[1:]])
    with _bench_run(workdir) as work:
        r = rbd.run_rbd(cfg, work, err)
    console.print(rbd.table(r).rich())
    for path in rbd.write_outputs(r, out, command, machine_markdown(machine())):
        console.print(f"wrote {path}")
    _failed(sum(1 for c in r.cells if c.error))


@app.command("bonnie")
def bonnie_cmd(
    quick: QuickOpt = False,
    only: Annotated[list[str] | None, typer.Option(help="Rows to run (glob on the key).")] = None,
    file_mib: Annotated[
        int | None, typer.Option(help="bonnie++ file size in MiB (blktap's table used 2048).")
    ] = None,
    repeat: Annotated[
        int,
        typer.Option(min=1, help="Rounds of every row, in alternating order; report medians."),
    ] = 1,
    warm_up: Annotated[
        bool | None,
        typer.Option(
            "--warm-up/--no-warm-up",
            help="An unmeasured row before the first round (default: on, off with --quick).",
        ),
    ] = None,
    out: OutOpt = None,
    workdir: WorkOpt = None,
) -> None:
    """blktap's Bonnie table: ext4 on each device, tapnbd rows beside loop and the peers."""
    with _bench_run(workdir) as work:
        r = _bonnie(_out(out), work, quick, only, file_mib, repeat, warm_up)
    _failed(sum(1 for x in r.results if x.error))


@app.command("ring")
def ring_cmd(
    quick: QuickOpt = False,
    fmt: Annotated[str, typer.Option("--format", help="Image format: raw or qcow.")] = "raw",
    jobs: Annotated[
        list[str] | None,
        typer.Option(help="Jobs: seqread seqwrite randread randwrite (the default), randread-qd1."),
    ] = None,
    runtime: Annotated[float | None, typer.Option(help="Seconds per cell.")] = None,
    size: Annotated[int | None, typer.Option(help="Image size in MiB.")] = None,
    repeat: Annotated[
        int, typer.Option(min=1, help="Run every job N times, interleaved; report medians.")
    ] = 1,
    out: OutOpt = None,
    workdir: WorkOpt = None,
) -> None:
    """The Xen blkif ring against NBD: the fio jobs through both, one image, one run."""
    if fmt not in ("raw", "qcow"):
        raise typer.BadParameter("--format must be raw or qcow")
    cfg = ring.RingConfig.quick_config() if quick else ring.RingConfig()
    cfg.fmt = "qcow" if fmt == "qcow" else "raw"
    cfg.jobs = fio.select_jobs(jobs)
    if not cfg.jobs:
        raise typer.BadParameter("--jobs selects nothing")
    if runtime is not None:
        cfg.runtime = runtime
    if size is not None:
        cfg.size = size * MiB
    cfg.repeat = repeat
    command = " ".join(["python -m bench", *sys.argv[1:]])
    dest = _out(out)
    with _bench_run(workdir) as work:
        r = ring.run_ring(cfg, work, err)
    for t in (ring.table(r), ring.cpu_table(r)):
        console.print(t.rich())
    for path in ring.write_outputs(r, dest, command, machine_markdown(machine())):
        console.print(f"wrote {path}")
    _failed(sum(1 for c in r.cells if c.error))


def _startup(out: Path, work: Path, quick: bool, rounds: int | None) -> startup.StartupRun:
    cfg = startup.StartupConfig.quick_config() if quick else startup.StartupConfig()
    if rounds is not None:
        cfg.rounds = rounds
    r = startup.run_startup(cfg, work)
    console.print(startup.table(r).rich())
    command = " ".join(["python -m bench", *sys.argv[1:]])
    for path in startup.write_outputs(r, out, command, machine_markdown(machine())):
        console.print(f"wrote {path}")
    return r


@app.command("startup")
def startup_cmd(
    quick: QuickOpt = False,
    rounds: Annotated[int | None, typer.Option(min=1, help="Measured rounds.")] = None,
    out: OutOpt = None,
    workdir: WorkOpt = None,
) -> None:
    """CLI start-up: tapnbd --version and info of each format against `import typer`."""
    dest = _out(out)
    with _bench_run(workdir) as work:
        _startup(dest, work, quick, rounds)


@app.command("all")
def all_cmd(quick: QuickOpt = False, out: OutOpt = None, workdir: WorkOpt = None) -> None:
    """fio, Bonnie and CLI start-up, into one results directory."""
    dest = _out(out)
    with _bench_run(workdir) as work:
        f = _fio(dest, work, quick, None, None, None, None, 1, 1)
        b = _bonnie(dest, work, quick, None, None)
        _startup(dest, work, quick, None)
    _failed(sum(1 for c in f.cells if c.error) + sum(1 for x in b.results if x.error))


if __name__ == "__main__":
    app()
