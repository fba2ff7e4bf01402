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

from formats.qcow.driver import DATA, UNALLOC, QcowDriver, _Miss
from formats.qcow.geometry import Geometry
from tests.formats.qcow_util import MiB, make_qcow, open_qcow, random_writes


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
                except _Miss as miss:  # load the table, look again
                    await d._load_l2(miss.l2off)
            want = await _host(img, d, pos)
            assert (kind, host) == ((DATA, want) if want else (UNALLOC, 0)), (seed, pos)
    finally:
        await d.close()
