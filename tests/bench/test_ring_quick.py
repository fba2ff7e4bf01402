"""The ring benchmark in quick mode: both paths run, and every cell starts synced."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import ring
from bench.fio import JOBS
from tests.helpers import need


def test_settle_syncs_the_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"x" * 4096)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ring.settle(image)
    assert synced == [image.stat().st_ino]


@pytest.mark.slow
def test_ring_quick_settles_before_every_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need("fio")
    settled: list[Path] = []
    real_settle = ring.settle

    def settle(image: Path) -> None:
        settled.append(image)
        real_settle(image)

    monkeypatch.setattr(ring, "settle", settle)
    cfg = ring.RingConfig.quick_config()
    cfg.runtime = 0.3
    cfg.jobs = [j for j in JOBS if j.key == "randwrite"]
    run = ring.run_ring(cfg, tmp_path)
    assert [c.error for c in run.cells] == ["", ""]
    assert {c.path for c in run.cells} == {"nbd", "ring"}
    assert all((c.value or 0) > 0 for c in run.cells)
    assert len(settled) == len(run.cells) == 2
    assert "fsynced" in ring.markdown(run, "test", "")
