"""``python repetitions.py RUN_DIR...``: issue 15's per-repetition table, with the
median's 95 % interval (``bench.report.median_interval``), rebuilt from a run's
fio.csv and written to RUN_DIR/repetitions.md. Run from the checkout's root with
PYTHONPATH=. (bench is a namespace package there)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from bench import fio


def rebuild(run_dir: Path) -> fio.FioRun:
    rows = list(csv.DictReader((run_dir / "fio.csv").open()))
    targets = {r["target"] for r in rows}
    jobs = {r["job"] for r in rows}
    cfg = fio.FioConfig(
        repeat=1 + max(int(r["run"]) for r in rows),
        targets=[t for t in fio.TARGETS if t.key in targets],
        jobs=[j for j in fio.JOBS if j.key in jobs],
    )
    cells = [
        fio.FioCell(r["target"], r["job"], int(r["run"]), value=float(r["value"]) or None)
        for r in rows
        if r["value"]
    ]
    return fio.FioRun(cfg, cells, {}, [])


for arg in sys.argv[1:]:
    out = Path(arg) / "repetitions.md"
    table = fio.repetitions_table(rebuild(Path(arg)))
    note = "From fio.csv here, by `bench.fio.repetitions_table` (rebuilt in session 17"
    note += " by `2026-12-01-s17-seqwrite/repetitions.py`, with the interval column)."
    out.write_text(f"# {table.title}\n\n{note}\n\n{table.markdown()}\n")
    print(out.read_text())
