"""``python -m bench ring --quick`` end to end, so the ring benchmark cannot rot.

The figures of a quick run mean nothing; what is checked is that every cell ran through
both paths and the table, CSV and ratios came out.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, need

JOBS = ("seqread", "seqwrite", "randread", "randwrite")


@pytest.mark.slow
def test_bench_ring_quick(tmp_path: Path) -> None:
    need("fio")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench", "ring", "--quick", "--runtime", "0.3"]
    cmd += ["--out", str(out), "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = list(csv.DictReader((out / "ring.csv").open()))
    assert {(r["job"], r["path"]) for r in rows} == {(j, p) for j in JOBS for p in ("nbd", "ring")}
    for r in rows:
        assert r["error"] == "", r
        assert float(r["value"]) > 0, r
        if r["path"] == "ring":
            # The ring bench reports its notification counts; a busy ring suppresses most.
            requests, kicks = int(r["requests"]), int(r["kicks"])
            assert requests > 0 and kicks < requests, r
            assert float(r["ratio_to_nbd"]) > 0, r
    md = (out / "ring.md").read_text()
    assert "quick mode" in md and "ring / NBD" in md
    for label in ("seq read 1M QD8", "rand write 4k QD32"):
        assert f"| {label} " in md, label


def test_repeats_are_reported_as_medians_and_per_repeat_ratios() -> None:
    """``--repeat``: each figure is the median over the repeats, each repeat's ratio is
    of the cells of that repeat, and a failed cell counts in neither."""
    from bench.fio import JOBS as FIO_JOBS
    from bench.ring import RingCell, RingConfig, RingRun, cpu_per_io_table, csv_rows, table

    job = next(j for j in FIO_JOBS if j.key == "randread")
    cfg = RingConfig(jobs=[job], repeat=3)
    figures = {  # rep: (nbd IOPS, ring IOPS)
        0: (1000.0, 500.0),
        1: (2000.0, 3000.0),
        2: (4000.0, 2000.0),
    }
    cells = []
    for rep, (nbd, ring) in figures.items():
        cells.append(RingCell(job.key, "nbd", rep, value=nbd, iops=nbd, server_cpu_pct=10.0))
        cells.append(
            RingCell(
                job.key,
                "ring",
                rep,
                value=ring,
                iops=ring,
                server_cpu_pct=10.0,
                requests=100,
                kicks=rep,
                events=2 * rep,
            )
        )
    cells.append(RingCell(job.key, "ring", 3, value=1e9, error="died"))
    r = RingRun(cfg, cells)
    assert r.value(job.key, "nbd") == 2000.0 and r.value(job.key, "ring") == 2000.0
    assert r.ratios(job.key) == [0.5, 1.5, 0.5]
    (row,) = table(r).rows
    assert row[4] == "0.50" and row[5] == "0.50 1.50 0.50", row
    assert row[6:] == ["0.010", "0.020"], row  # 3 kicks, 6 events over 300 requests
    (cpu,) = cpu_per_io_table(r).rows
    assert cpu[2] == "50" and cpu[4] == "50", cpu  # 10 % of a core at 2000 IOPS, medians
    by_rep = {(d["path"], d["rep"]): d["ratio_to_nbd"] for d in csv_rows(r)}
    assert by_rep[("ring", 1)] == 1.5 and by_rep[("ring", 3)] is None
