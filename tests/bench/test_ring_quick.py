"""The ring benchmark in quick mode: both paths run, and every cell starts from an image
written back, warm for reads and with its pages dropped for writes."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest

from bench import proc, ring
from bench.fio import JOBS
from tests.helpers import need

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
PAGE = mmap.PAGESIZE


def _cached(path: Path) -> int:
    """How many of the file's pages are in the page cache, by mincore(2).

    Not by a RWF_NOWAIT read: on this kernel one starts readahead when it misses, and
    on a fast disk the page can be back before the read looks again, so the probe would
    cache what it measures (it did, in CI).
    """
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = (ctypes.c_ubyte * ((size + PAGE - 1) // PAGE))()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(b & 1 for b in vec)
        finally:
            _libc.munmap(addr, size)
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
    assert _cached(image) == (1 << 20) // PAGE
    proc.ready_for(image, writes=True)
    assert _cached(image) == 0
    proc.ready_for(image, writes=False)
    assert _cached(image) == (1 << 20) // PAGE


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
