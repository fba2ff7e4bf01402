"""GrantMapper.map_segments and the ref bounds, in-process and byte-exact.

map_segments turns a request's (ref, first_sect, last_sect) list into the buffers the
backend reads or writes: exactly the sectors named, with runs that are adjacent in
memory merged into one buffer (one iovec for preadv). A buffer one sector too long
or too short is data written to, or read from, the wrong place.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tapnbd.xen.grant import GrantError, GrantMapper, GrantStatus, GrantTable


@pytest.fixture
def pair() -> Iterator[tuple[GrantTable, GrantMapper]]:
    table = GrantTable.create(domid=2, nr_frames=6)
    mapper = GrantMapper(os.dup(table.fd), domid=0, owner=2)
    yield table, mapper
    mapper.close()
    table.close()


def _fill(table: GrantTable) -> list[int]:
    """Grant frames 0..5 as refs 8..13; each sector holds (frame * 8 + sector)."""
    refs = []
    for frame in range(6):
        page = table.frame(frame)
        for sector in range(8):
            page[sector * 512 : (sector + 1) * 512] = bytes([frame * 8 + sector]) * 512
        refs.append(table.grant(table.alloc_frame(), 0, readonly=False))
    return refs


def _sectors(views: list[memoryview]) -> list[list[int]]:
    """Each buffer as the list of sector labels it covers."""
    out = []
    for v in views:
        assert len(v) % 512 == 0
        out.append([v[i] for i in range(0, len(v), 512)])
    return out


def test_segments_map_to_exactly_their_sectors(pair: tuple[GrantTable, GrantMapper]) -> None:
    table, mapper = pair
    refs = _fill(table)
    assert refs == [8, 9, 10, 11, 12, 13]
    m0 = mapper.maps
    # Whole consecutive pages merge into one buffer.
    views = mapper.map_segments([(8, 0, 7), (9, 0, 7), (10, 0, 7)], readonly=True)
    assert _sectors(views) == [list(range(0, 24))]
    assert mapper.maps - m0 == 3
    # A partial first and last page: still adjacent (page 8 ends at sector 7).
    views = mapper.map_segments([(8, 5, 7), (9, 0, 2)], readonly=True)
    assert _sectors(views) == [[5, 6, 7, 8, 9, 10]]
    # A gap inside a page, or a page out of order, starts a new buffer.
    views = mapper.map_segments([(8, 0, 3), (9, 0, 7)], readonly=True)
    assert _sectors(views) == [[0, 1, 2, 3], list(range(8, 16))]
    views = mapper.map_segments([(10, 2, 2), (8, 0, 0), (9, 0, 1)], readonly=True)
    assert _sectors(views) == [[18], [0], [8, 9]]  # sector 0 of page 8 ends mid-page
    # One sector, the last of the last page.
    assert _sectors(mapper.map_segments([(13, 7, 7)], readonly=True)) == [[47]]
    assert mapper.map_segments([], readonly=True) == []
    assert mapper.maps - m0 == 3 + 2 + 2 + 3 + 1


def test_ref_bounds(pair: tuple[GrantTable, GrantMapper]) -> None:
    table, mapper = pair
    assert mapper.nr_grefs == 14
    # Refs 0 and nr_grefs - 1 are inside the table: granted, they map.
    table.grant_ref(0, 0, 0, readonly=False)
    table.grant_ref(13, 1, 0, readonly=False)
    table.frame(0)[:3] = b"ref"
    assert bytes(mapper.map(0, readonly=False)[:3]) == b"ref"
    assert len(mapper.map(13, readonly=False)) == 4096
    for ref in (14, 15, -1):
        with pytest.raises(GrantError, match="outside the table") as info:
            mapper.map(ref, readonly=True)
        assert info.value.status is GrantStatus.BAD_GNTREF
