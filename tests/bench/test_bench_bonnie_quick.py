"""The Bonnie harness in quick mode, end to end: attach, mkfs, bonnie++, tables (issue 6).

Three of the seven rows (tap-raw, loop, qcow-opt), about 35 s: the tapnbd rows through the
daemon's ``attach --via fuse``, and the kernel baseline. The peer rows share the nbdfuse
path that tests/bench/test_bench_quick.py and the full run exercise.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import need, need_root_devices

ROWS = {"tap-raw": "Tap raw", "loop": "Loop", "qcow-opt": "Qcow optimised"}


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@pytest.mark.root
@pytest.mark.slow
def test_bonnie_quick_gives_figures_for_each_row(tmp_path: Path) -> None:
    need_root_devices()
    need("bonnie++", "nbdfuse", "nocache", "mkfs.ext4", "losetup")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench", "bonnie", "--quick"]
    for key in ROWS:
        cmd += ["--only", key]
    # A short work directory: the daemon's state directory is in it, and a tapdisk's
    # socket path in that must fit AF_UNIX's 107 bytes however deep pytest's tmp is.
    work = tempfile.mkdtemp(prefix="bq-", dir="/tmp")
    try:
        cmd += ["--out", str(out), "--workdir", work]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = {r["row"]: r for r in csv.DictReader((out / "bonnie.csv").open())}
    assert set(rows) == set(ROWS)
    for key, row in rows.items():
        assert row["error"] == "", (key, row["error"])
        assert row["bonnie_csv"].startswith("1.98,"), key
        assert row["caches"], key
    # At the quick size a phase may finish too fast for bonnie to time it ("+++++"), on
    # any row when the machine is quiet (the CSV then has no figure): so each phase is a
    # positive figure or empty, and every tapnbd row times at least one of them.
    phases = ("putc_kps", "write_kps", "rewrite_kps")
    for key in ("tap-raw", "qcow-opt"):
        figures = {p: rows[key][p] for p in phases}
        for text in figures.values():
            v = _number(text)
            assert text == "" or (v is not None and v > 0), (key, figures)
        timed = [p for p, text in figures.items() if _number(text) is not None]
        assert timed, (key, rows[key])
        assert rows[key]["loop_direct_io"] == "True", key
        assert rows[key]["attach"] == "tapnbd attach --via fuse", key

    summary = {r["row"]: r for r in csv.DictReader((out / "bonnie-summary.csv").open())}
    # The ratio is there exactly when both rows timed their block write, and is their quotient.
    qcow_w, raw_w = (
        _number(summary["qcow-opt"]["write_kps"]),
        _number(summary["tap-raw"]["write_kps"]),
    )
    ratio = _number(summary["qcow-opt"]["write_vs_tap_raw"])
    if qcow_w is None or raw_w is None:
        assert ratio is None, summary["qcow-opt"]
    else:
        assert ratio == pytest.approx(qcow_w / raw_w, rel=0.01), summary["qcow-opt"]
    md = (out / "bonnie.md").read_text()
    for label in ROWS.values():
        assert f"| {label} " in md, label
    assert "drop_caches" in md and "nocache" in md
    assert "Qcow optimised >= 0.95x Tap raw, block write" in md
