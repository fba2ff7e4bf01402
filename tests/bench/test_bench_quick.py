"""The benchmark harness in quick mode, so that it cannot rot (figures here mean nothing)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import need


@pytest.mark.slow
def test_fio_quick_runs_tapnbd_and_a_peer(tmp_path: Path) -> None:
    need("fio", "nbdkit")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "fio",
            "--quick",
            "--runtime",
            "0.5",
            "--only",
            "tapnbd-raw",
            "--only",
            "nbdkit-raw",
            "--jobs",
            "randread",
            "--jobs",
            "seqwrite",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader((out / "fio.csv").open()))
    cells = {(r["target"], r["job"]) for r in rows if float(r["value"] or 0) > 0}
    assert cells == {(t, j) for t in ("tapnbd-raw", "nbdkit-raw") for j in ("randread", "seqwrite")}
    md = (out / "fio.md").read_text()
    assert "tapnbd raw" in md and "nbdkit file" in md and "x ref" in md


@pytest.mark.slow
def test_fio_quick_runs_the_qcow2_rows(tmp_path: Path) -> None:
    """Issue 13's rows: qcow2 full, fresh and overlay, tapnbd beside qemu-nbd."""
    need("fio", "qemu-nbd", "qemu-img")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "fio",
            "--quick",
            "--runtime",
            "0.3",
            "--size",
            "32",
            "--only",
            "*-qcow2-*",
            "--jobs",
            "randread",
            "--jobs",
            "randwrite",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader((out / "fio.csv").open()))
    cells = {(r["target"], r["job"]) for r in rows if float(r["value"] or 0) > 0}
    want = {
        (f"{server}-qcow2-{state}", job)
        for server in ("tapnbd", "qemu-nbd")
        for state in ("full", "fresh", "overlay")
        for job in ("randread", "randwrite")
        if state != "fresh" or job == "randwrite"
    }
    assert cells == want
    md = (out / "fio.md").read_text()
    assert "qemu-nbd -f qcow2, overlay on raw" in md
    assert "qcow2 (fresh) >= 1.0x qemu-nbd -f qcow2" in md
