"""The shared format machinery (formats/engine) on its own: journal and table cache."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable

import pytest

from formats.engine.journal import Journal
from formats.engine.runs import DATA, UNALLOC, Miss, runs
from formats.engine.table_cache import TableCache


class Disk:
    """Writes and syncs, as a journal sees them; ``fail`` makes the next write fail."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, int, bytes]] = []
        self.fail = 0
        self.meanwhile: list[Callable[[], None]] = []

    async def write(self, off: int, data: bytes) -> None:
        for change in self.meanwhile:  # a request changing metadata during the flush
            change()
        self.meanwhile = []
        if self.fail:
            self.fail -= 1
            raise OSError(errno.EIO, "injected")
        self.ops.append(("w", off, data))

    async def sync(self) -> None:
        self.ops.append(("sync", 0, b""))


async def test_stages_in_order_each_synced_and_adjacent_records_joined() -> None:
    disk = Disk()
    j = Journal(3, disk.write, disk.sync)
    j.record(2, 16, b"c" * 8)
    j.record(0, 0, b"a" * 8)
    j.record(2, 24, b"d" * 8)  # adjacent to 16: one write
    table = bytearray(b"x" * 8)
    j.record(0, 100, lambda: bytes(table))  # taken when the flush starts
    table[:] = b"y" * 8
    assert await j.flush()
    assert disk.ops == [
        ("w", 0, b"a" * 8),
        ("w", 100, b"y" * 8),
        ("sync", 0, b""),
        ("w", 16, b"c" * 8 + b"d" * 8),
        ("sync", 0, b""),
    ]
    assert not j.pending
    assert not await j.flush()  # nothing left


async def test_data_first_syncs_before_the_first_pointer() -> None:
    """QCOW v1's L2 entries name data written before the flush: with ``data_first`` an
    empty first stage is still synced before them (one sync per stage, two in all)."""
    disk = Disk()
    j = Journal(2, disk.write, disk.sync, data_first=True)
    j.record(1, 8, b"entry", tag=3)
    assert j.tables == 1
    assert await j.flush()
    assert disk.ops == [("sync", 0, b""), ("w", 8, b"entry"), ("sync", 0, b"")]
    assert j.tables == 0
    disk.ops.clear()
    j = Journal(2, disk.write, disk.sync)  # without it: the write, then one sync
    j.record(1, 8, b"entry")
    assert await j.flush()
    assert disk.ops == [("w", 8, b"entry"), ("sync", 0, b"")]


async def test_failed_flush_merges_back_and_newer_records_win() -> None:
    disk = Disk()
    j = Journal(2, disk.write, disk.sync)
    j.record(0, 0, b"old", tag=7)
    j.record(1, 8, b"map", tag=7)
    disk.fail = 1
    disk.meanwhile.append(lambda: j.record(0, 0, b"new", tag=7))
    with pytest.raises(OSError):
        await j.flush()
    assert j.busy(7)  # still pinned: its changes are not on disk
    assert await j.flush()
    assert disk.ops == [("w", 0, b"new"), ("sync", 0, b""), ("w", 8, b"map"), ("sync", 0, b"")]
    assert not j.busy(7)


async def test_table_cache_loads_once_and_never_evicts_pinned() -> None:
    reads: list[int] = []
    gate = asyncio.Event()

    async def reader(off: int) -> list[int]:
        reads.append(off)
        await gate.wait()
        return [off]

    pinned = {0}
    cache: TableCache[list[int]] = TableCache(reader, 16, lambda off: off in pinned)
    a = asyncio.ensure_future(cache.load(0))
    b = asyncio.ensure_future(cache.load(0))
    await asyncio.sleep(0)
    gate.set()
    assert await a == await b == [0]
    assert reads == [0]
    for off in range(1, 40):
        await cache.load(off)
    assert 0 in cache and len(cache) == 16


async def test_runs_loads_on_a_miss_and_continues() -> None:
    loaded: set[int] = set()

    def lookup(pos: int, end: int) -> tuple[int, int, int]:
        table = pos // 100
        if table not in loaded:
            raise Miss(table)
        return (DATA if table % 2 else UNALLOC), pos + 1000, min(end, (table + 1) * 100) - pos

    async def load(table: int) -> None:
        loaded.add(table)

    got = [r async for r in runs(lookup, load, 50, 250)]
    assert got == [(UNALLOC, 1050, 50), (DATA, 1100, 100), (UNALLOC, 1200, 50)]
