"""CLI start-up: ``tapnbd --version`` and ``tapnbd info IMG`` against ``import typer``.

Issue 15's goal is a ratio in one run: each command within 2x of ``python -c "import
typer"`` in the same venv. Start-up is a few hundred milliseconds, and on a shared VM
the load drifts within a minute, so the commands are interleaved: every round runs each
command once, in an order rotated by one each round (no command always follows the
same one), and the ratio reported is the median over rounds of the command's time over
the baseline's in that round. Medians and minimums of the times are given beside it.

The package's bytecode is compiled first, as an installed package's would be (this
sandbox sets PYTHONDONTWRITEBYTECODE, which would leave an editable checkout
uncompiled and charge every run for compiling it).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.proc import BenchError, have, tapnbd_command
from bench.report import Table, fmt_num, fmt_ratio, write_csv

ROOT = Path(__file__).resolve().parent.parent
#: Image formats as qemu-img names them (tapnbd's vhd is qemu's vpc).
FORMATS = ("raw", "qcow", "qcow2", "vpc")
BASELINE = "import typer"


@dataclass
class StartupConfig:
    rounds: int = 30
    warmup: int = 3
    image_size: str = "1G"

    @classmethod
    def quick_config(cls) -> StartupConfig:
        return cls(rounds=2, warmup=1, image_size="16M")


@dataclass
class StartupRun:
    config: StartupConfig
    names: list[str]
    #: name -> seconds, one per measured round, in round order.
    times: dict[str, list[float]] = field(default_factory=dict)

    def ratios(self, name: str) -> list[float]:
        """Per round: the command's time over the baseline's in the same round."""
        return [t / b for t, b in zip(self.times[name], self.times[BASELINE], strict=True)]


def commands(images: dict[str, Path]) -> dict[str, list[str]]:
    tapnbd = tapnbd_command()
    cmds = {
        BASELINE: [sys.executable, "-c", "import typer"],
        "tapnbd --version": [*tapnbd, "--version"],
    }
    for fmt, path in images.items():
        cmds[f"tapnbd info {fmt}"] = [*tapnbd, "info", str(path)]
    # make_images needed qemu-img, so it is there.
    cmds["qemu-img info qcow2"] = ["qemu-img", "info", str(images["qcow2"])]
    return cmds


def make_images(workdir: Path, size: str) -> dict[str, Path]:
    if not have("qemu-img"):
        raise BenchError("qemu-img is needed to make the images")
    images = {}
    for fmt in FORMATS:
        path = workdir / f"startup.{fmt}"
        path.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)
        images[fmt] = path
    return images


def compile_bytecode() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "tapnbd"), str(ROOT / "formats")],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def _time(cmd: Sequence[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed: {proc.stderr.decode(errors='replace')[-300:]}")
    return elapsed


def run_startup(cfg: StartupConfig, workdir: Path) -> StartupRun:
    compile_bytecode()
    cmds = commands(make_images(workdir, cfg.image_size))
    names = list(cmds)
    run = StartupRun(cfg, names, {n: [] for n in names})
    for r in range(cfg.warmup + cfg.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t = _time(cmds[name])
            if r >= cfg.warmup:
                run.times[name].append(t)
    return run


def table(run: StartupRun) -> Table:
    t = Table(
        f"CLI start-up, {run.config.rounds} interleaved rounds (goal: at most 2x import typer)",
        ["command", "median ms", "min ms", "x import typer (median of rounds)", "min/min"],
    )
    base_min = min(run.times[BASELINE])
    for name in run.names:
        times = run.times[name]
        t.rows.append(
            [
                name,
                fmt_num(statistics.median(times) * 1000, 1),
                fmt_num(min(times) * 1000, 1),
                fmt_ratio(statistics.median(run.ratios(name))),
                fmt_ratio(min(times) / base_min),
            ]
        )
    return t


def write_outputs(run: StartupRun, out: Path, command: str, machine_md: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = out / "startup.md"
    md.write_text(
        f"# CLI start-up\n\n    {command}\n\n{table(run).markdown()}\n\n"
        f"Each round runs every command once, rotated; the ratio is the median over rounds "
        f"of the command's time over `import typer`'s in that round.\n\n{machine_md}\n"
    )
    rows: list[dict[str, object]] = [
        {"round": i, "command": name, "seconds": f"{t:.5f}"}
        for name in run.names
        for i, t in enumerate(run.times[name])
    ]
    csv = out / "startup.csv"
    write_csv(csv, rows)
    return [md, csv]
