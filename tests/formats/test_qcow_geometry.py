"""The spec's address arithmetic (§1.2, §2.4) as an oracle for the driver's lookups.

These few lines were helpers in geometry.py that nothing called (issue 13); here they
check what the driver computes with its own shifts and masks, at random offsets of an
image written at random (seeded; the seed is printed).
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from formats.engine.runs import DATA, UNALLOC, Miss
from formats.qcow import driver as qdriver
from formats.qcow.driver import QcowDriver
from formats.qcow.geometry import Geometry
from formats.raw import RawDriver
from tests.formats.qcow_util import MiB, make_qcow, need, open_qcow, qemu_img, random_writes


def l1_index(offset: int, g: Geometry) -> int:
    """get_cluster_offset: ``offset >> (l2_bits + cluster_bits)``."""
    return offset >> g.shift


def l2_index(offset: int, g: Geometry) -> int:
    """get_cluster_offset: ``(offset >> cluster_bits) & (l2_size - 1)``."""
    return (offset >> g.cluster_bits) & (g.l2_size - 1)


def fast_data_offset(l2_offset: int, offset: int, g: Geometry) -> int:
    """tapdisk with min_cluster_alloc == l2_size: ``l2_offset + l2_size * 8 +
    l2_index * cluster_size``, plus the offset in the cluster."""
    return (
        l2_offset
        + g.l2_bytes
        + l2_index(offset, g) * g.cluster_size
        + (offset & (g.cluster_size - 1))
    )


def _entry(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(">Q", f.read(8))[0])


async def _host(path: Path, d: QcowDriver, pos: int) -> int:
    """Where ``pos`` lives in the file, by the spec, from the bytes on disk (0: nowhere)."""
    g = d.g
    l2off = _entry(path, d.meta.header.l1_table_offset + 8 * l1_index(pos, g))
    if not l2off:
        return 0
    if d.fast_path:
        return fast_data_offset(l2off, pos, g)
    e = _entry(path, l2off + 8 * l2_index(pos, g))
    return e + (pos & (g.cluster_size - 1)) if e else 0


@pytest.mark.parametrize("optimise", [True, False])
async def test_driver_lookup_matches_the_spec(tmp_path: Path, optimise: bool) -> None:
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    size = 16 * MiB
    img = await make_qcow(tmp_path / "g.qcow", size, optimise=optimise)
    d = await open_qcow(img)
    for off, data in random_writes(rng, size, 20):
        await d.pwrite(off, data)
    await d.close()
    d = await open_qcow(img, read_only=True)
    assert d.fast_path == optimise
    try:
        for _ in range(300):
            pos = rng.randrange(size)
            while True:
                try:
                    kind, host, _n = d._lookup(pos, pos + 1)
                    break
                except Miss as miss:  # load the table, look again
                    await d._load(miss.offset)
            want = await _host(img, d, pos)
            assert (kind, host) == ((DATA, want) if want else (UNALLOC, 0)), (seed, pos)
    finally:
        await d.close()


@pytest.mark.parametrize("layout", ["flat-bases", "sparse-l1", "normal"])
async def test_fast_path_reads_match_qemu(
    tmp_path: Path, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The synchronous answers (``pread_nowait``; with the raw preadv inlined on the fast
    path) and ``pread`` against qemu's reading of the same image. ``sparse-l1`` is an L1
    table too large for the flat list of data bases (FLAT_L1_MAX): the general lookup;
    ``normal`` has no fast path: answers from the L2 tables in memory."""
    need("qemu-img")
    flat, optimise = layout == "flat-bases", layout != "normal"
    if layout == "sparse-l1":
        monkeypatch.setattr(qdriver, "FLAT_L1_MAX", 0)
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    size = 16 * MiB
    img = await make_qcow(tmp_path / "f.qcow", size, optimise=optimise)
    d = await open_qcow(img)
    try:
        assert d.fast_path == optimise and (d._bases is not None) == flat
        assert d.splices == flat  # a splice needs the flat list's sum, as pwrite_nowait
        for off, data in random_writes(rng, size, 20):
            # Allocating writes through the synchronous path where they fit one slot.
            if not d.pwrite_nowait(off, data):
                await d.pwrite(off, data)
        await d.flush()
        if flat:  # the flat list agrees with L1 after the allocations (spec §2.4)
            assert d._bases == [
                d.l1[i] + d.g.l2_bytes if d.l1[i] else 0 for i in range(d.g.l1_size)
            ]
    finally:
        await d.close()
    raw = tmp_path / "f.raw"
    qemu_img("convert", "-f", "qcow", "-O", "raw", str(img), str(raw))
    want = raw.read_bytes()
    d = await open_qcow(img, read_only=True)
    try:
        assert d.fast_path == optimise and type(d.child) is RawDriver
        assert not d.splices  # read-only
        answered = 0
        for _ in range(300):
            n = rng.choice((512, 4096, 65536))
            pos = rng.randrange(size - n)
            got = d.pread_nowait(pos, n)
            if got is not None:
                answered += 1
                assert bytes(got) == want[pos : pos + n], (seed, pos, n)
            assert bytes(await d.pread(pos, n)) == want[pos : pos + n], (seed, pos, n)
        assert answered > 0  # the file is in the page cache: most reads are answered
    finally:
        await d.close()
