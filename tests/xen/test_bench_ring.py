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
