"""The ring benchmark in quick mode: both paths run, and every cell starts from an image
written back, warm for reads and with its pages dropped for writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import proc, ring
from bench.fio import JOBS
from tests.helpers import need


def _cached(path: Path) -> bool:
    """Whether the file's first page is in the page cache (a RWF_NOWAIT read says)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("writes", [False, True])
def test_ready_for_syncs_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writes: bool
) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"x" * 4096)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    proc.ready_for(image, writes)
    assert synced == [image.stat().st_ino]


def test_ready_for_drops_pages_for_writes_and_warms_for_reads(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.write_bytes(b"p" * 4096)
    fd = os.open(probe, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if _cached(probe):
        pytest.skip(f"{tmp_path} keeps pages it is asked to drop (tmpfs?)")
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(1 << 20))  # dirty: dropping needs the write-back first
    assert _cached(image)
    proc.ready_for(image, writes=True)
    assert not _cached(image)
    proc.ready_for(image, writes=False)
    assert _cached(image)


@pytest.mark.slow
def test_ring_quick_readies_the_image_before_every_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need("fio")
    readied: list[tuple[Path, bool]] = []
    real = proc.ready_for

    def ready_for(image: Path, writes: bool) -> None:
        readied.append((image, writes))
        real(image, writes)

    monkeypatch.setattr(ring, "ready_for", ready_for)
    cfg = ring.RingConfig.quick_config()
    cfg.runtime = 0.3
    cfg.jobs = [j for j in JOBS if j.key in ("randwrite", "randread")]
    run = ring.run_ring(cfg, tmp_path)
    assert [c.error for c in run.cells] == ["", "", "", ""]
    assert {c.path for c in run.cells} == {"nbd", "ring"}
    assert all((c.value or 0) > 0 for c in run.cells)
    assert sorted(w for _, w in readied) == [False, False, True, True]
    assert len({p for p, _ in readied}) == 1
    assert "fsynced" in ring.markdown(run, "test", "")
