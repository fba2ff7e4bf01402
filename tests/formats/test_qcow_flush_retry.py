"""A failed FLUSH leaves its metadata dirty (QcowDriver._merge_back): the next FLUSH
writes it again, and a change made in between wins over the failed snapshot."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from formats.filters import FilterDriver
from formats.qcow.driver import QcowDriver
from formats.qcow.meta import read_meta
from formats.raw import RawDriver
from tests.formats.qcow_util import MiB, make_qcow, open_qcow

CS = 4096


class FailingSync(FilterDriver):
    """Records every write; fails the next sync when told to, after ``hold`` is set
    (``entered`` tells the test the sync has started)."""

    def __init__(self, child: RawDriver) -> None:
        super().__init__(child)
        self.writes: list[tuple[int, bytes]] = []
        self.fail_next = False
        self.entered = asyncio.Event()
        self.hold: asyncio.Event | None = None

    def intercepts(self, op: str) -> bool:
        return op == "write"  # no synchronous path: every write is seen here

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self.writes.append((offset, bytes(data)))
        await self.child.pwrite(offset, data, fua)

    async def flush(self) -> None:
        if self.fail_next:
            self.fail_next = False
            self.entered.set()
            if self.hold is not None:
                await self.hold.wait()
            raise OSError(errno.EIO, "injected sync failure")
        await self.child.flush()


async def _open(img: Path) -> tuple[QcowDriver, FailingSync]:
    child = FailingSync(RawDriver(str(img)))
    d = QcowDriver(child, None, await read_meta(child), path=str(img))
    await d.prepare()
    return d, child


async def test_failed_flush_rewrites_its_metadata_next_time(tmp_path: Path) -> None:
    img = await make_qcow(tmp_path / "n.qcow", 8 * MiB, optimise=False)
    d, child = await _open(img)
    await d.pwrite(0, b"a" * CS)
    await d.flush()  # table 0 and cluster 0 durable
    l1_off = d.meta.header.l1_table_offset
    table0 = d.l1[0]

    await d.pwrite(5 * CS, b"b" * CS)  # a new entry in the existing table 0
    await d.pwrite(2 * MiB, b"c" * CS)  # a new table (L1 entry 1)
    child.fail_next = True
    with pytest.raises(OSError):
        await d.flush()  # the first sync fails: no pointer was written

    child.writes.clear()
    await d.flush()
    written = dict(child.writes)
    # The retry wrote the new table, the L2 entry and the L1 entry of the failed epoch.
    assert d.l1[1] in written
    assert int.from_bytes(written[table0 + 8 * 5], "big") == d._l2_tables[table0][5]
    assert int.from_bytes(written[l1_off + 8], "big") == d.l1[1]
    await d.close()

    d2 = await open_qcow(img, read_only=True)
    got = bytes(await d2.pread(0, 3 * MiB))
    await d2.close()
    assert got[5 * CS : 6 * CS] == b"b" * CS and got[2 * MiB : 2 * MiB + CS] == b"c" * CS


async def test_a_change_made_during_the_failed_flush_wins(tmp_path: Path) -> None:
    img = await make_qcow(tmp_path / "n.qcow", 8 * MiB, optimise=False)
    d, child = await _open(img)
    await d.pwrite(0, b"a" * CS)
    await d.flush()
    await d.pwrite(5 * CS, b"b" * CS)
    child.fail_next, child.hold = True, asyncio.Event()
    flushing = asyncio.ensure_future(d.flush())  # its snapshot: entry 5 -> the new cluster
    await asyncio.wait_for(child.entered.wait(), 10)
    await d.trim(5 * CS, CS)  # newer, while the sync is in progress: entry 5 -> 0
    child.hold.set()
    with pytest.raises(OSError):
        await flushing
    await d.flush()
    await d.close()

    d2 = await open_qcow(img, read_only=True)
    got = bytes(await d2.pread(0, 6 * CS))
    allocated, _ = await d2.allocation()
    await d2.close()
    assert got == b"a" * CS + bytes(5 * CS)
    # The trimmed cluster's entry is 0 on disk (its data reads as zeros either way: the
    # trim punched a hole in it).
    assert allocated == 1
