"""The crash model judges the crash tests, so it is tested on disks made by hand.

Four sectors' worth of writes over an 8-sector disk: gen 1 and 2 are durable (acked
before a completed FLUSH), gen 3 is acked after it, gen 4 was lost in flight. Every
case builds the disk the model should accept or reject and asks it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.model import Journal, Write, possible, verify
from tests.reliability.nbdload import SECTOR, stamp

SECTORS = 8


def _journal() -> Journal:
    writes = [
        Write(1, 0 * SECTOR, 2 * SECTOR, False, "ok", None),  # sectors 0-1
        Write(2, 1 * SECTOR, 2 * SECTOR, False, "ok", None),  # sectors 1-2
        Write(3, 2 * SECTOR, 2 * SECTOR, False, "ok", None),  # sectors 2-3, after the flush
        Write(4, 3 * SECTOR, 1 * SECTOR, False, "lost", None),  # sector 3, never acked
        Write(5, 5 * SECTOR, 1 * SECTOR, True, "ok", None),  # sector 5, FUA
    ]
    return Journal(SECTORS * SECTOR, writes, [1, 2, 3, 5], [2], {}, [], "ECONNRESET", False)


def _disk(tmp_path: Path, gens: dict[int, int], garbage: int | None = None) -> Path:
    """A disk whose sector s holds gen gens[s] (0 or missing: zeros)."""
    data = bytearray(SECTORS * SECTOR)
    for s, gen in gens.items():
        if gen:
            data[s * SECTOR : (s + 1) * SECTOR] = stamp(s, gen)
    if garbage is not None:
        data[garbage * SECTOR + 100] ^= 0xFF
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    return path


def test_what_each_sector_may_show() -> None:
    j = _journal()
    assert possible(j, crashed=True) == {0: (1,), 1: (2,), 2: (2, 3), 3: (0, 3, 4), 5: (5,)}
    # Live (no crash): the last write that succeeded, or a later failed one.
    assert possible(j, crashed=False) == {0: (1,), 1: (2,), 2: (3,), 3: (3, 4), 5: (5,)}


@pytest.mark.parametrize(
    "gens",
    [
        {0: 1, 1: 2, 2: 2, 3: 0, 5: 5},  # only what was durable
        {0: 1, 1: 2, 2: 3, 3: 4, 5: 5},  # everything landed
        {0: 1, 1: 2, 2: 3, 3: 3, 5: 5},
    ],
)
def test_a_crashed_disk_may_show_any_write_after_the_durable_one(
    tmp_path: Path, gens: dict[int, int]
) -> None:
    v = verify(_disk(tmp_path, gens), _journal(), crashed=True)
    assert v.failures == [] and v.sectors == 5
    assert v.must == 3  # sectors 0, 1 and 5 have one possible content
    assert v.newer == sum(gens[s] != base for s, base in {2: 2, 3: 0}.items())


@pytest.mark.parametrize(
    ("gens", "garbage", "says"),
    [
        ({0: 1, 1: 1, 2: 2, 5: 5}, None, "sector 1: gen 1, expected one of (2,)"),  # older gen
        ({0: 1, 1: 2, 2: 2}, None, "sector 5: gen 0, expected one of (5,)"),  # FUA write lost
        ({0: 1, 1: 2, 2: 2, 5: 5}, 2, "sector 2: garbage"),  # torn or corrupt
        ({0: 1, 1: 2, 2: 2, 5: 5, 7: 1}, None, "sector 7 is not zero"),  # untouched
        ({0: 1, 1: 2, 2: 2, 5: 5}, 6, "is not zero, and no write touched it"),
    ],
)
def test_a_wrong_disk_is_caught(
    tmp_path: Path, gens: dict[int, int], garbage: int | None, says: str
) -> None:
    v = verify(_disk(tmp_path, gens, garbage), _journal(), crashed=True)
    assert v.failure_count == 1 and says in v.failures[0], v.failures


def test_a_sector_holding_another_sectors_data_is_caught(tmp_path: Path) -> None:
    path = _disk(tmp_path, {0: 1, 1: 2, 2: 2, 5: 5})
    data = bytearray(path.read_bytes())
    data[2 * SECTOR : 3 * SECTOR] = stamp(1, 2)
    path.write_bytes(data)
    v = verify(path, _journal(), crashed=True)
    assert v.failures == ["sector 2: holds sector 1's data (gen 2)"]
