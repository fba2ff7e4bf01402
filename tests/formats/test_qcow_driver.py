"""QcowDriver behaviour: concurrency, crash ordering, block status, zeroing, the Xen
extension (fast path, checksum, old images), the L2 cache and write-back."""

from __future__ import annotations

import asyncio
import errno
import os
from array import array
from pathlib import Path

import pytest

from formats.qcow import driver as qdriver
from formats.qcow.driver import QcowDriver
from formats.qcow.geometry import l1_cksum
from formats.qcow.layout import CKSUM_OFFSET, EXT_OFFSET, XenExtension, XenFlags
from formats.qcow.meta import read_meta, to_be_bytes
from formats.raw import RawDriver
from tapnbd.backend import Backend
from tapnbd.driver import ExtentFlags, FuaMode
from tapnbd.errors import RequestError
from tests.formats.qcow_util import (
    MiB,
    compare,
    make_qcow,
    make_raw,
    need,
    open_qcow,
    qemu_io,
    read_header,
    write_raw,
)

HOLE_ZERO = ExtentFlags.HOLE | ExtentFlags.ZERO


class Recorder(RawDriver):
    """A child that logs its writes and flushes, and can hold writes back."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.log: list[tuple[str, int, int]] = []
        self.gate: asyncio.Event | None = None
        self.gate_at: int = -1

    def pwrite_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        return False

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        await asyncio.sleep(0)  # always suspend, so concurrent requests interleave
        if self.gate is not None and offset == self.gate_at:
            await self.gate.wait()
        self.log.append(("fua" if fua else "w", offset, len(data)))
        await super().pwrite(offset, data, fua)

    async def flush(self) -> None:
        self.log.append(("flush", 0, 0))
        await super().flush()


async def open_on(child: RawDriver, backing: QcowDriver | RawDriver | None = None) -> QcowDriver:
    d = QcowDriver(child, backing, await read_meta(child), path=child.path)
    await d.prepare()
    return d


def cached_clusters(d: QcowDriver) -> int:
    return sum(1 for t in d._l2_tables.values() for e in t if e)


# Concurrency.


async def test_concurrent_writes_allocate_a_cluster_once(tmp_path: Path) -> None:
    img = await make_qcow(tmp_path / "n.qcow", 8 * MiB, optimise=False)
    d = await open_on(Recorder(str(img)))
    size_before = os.path.getsize(img)
    cs = d.g.cluster_size
    # 64 writers on 512-byte pieces of the same two unallocated clusters.
    pieces = [(i * 128, bytes([i]) * 128) for i in range(64)]
    await asyncio.gather(*(d.pwrite(off, data) for off, data in pieces))
    alloc, _ = await d.allocation()
    assert alloc == (64 * 128 + cs - 1) // cs == 2
    grown = os.path.getsize(img) - size_before
    assert grown == d.g.l2_alloc + 2 * cs  # one L2 table and two clusters, no more
    got = bytes(await d.pread(0, 64 * 128))
    assert got == b"".join(data for _, data in pieces)
    await d.close()


async def test_allocated_io_does_not_wait_for_allocation(tmp_path: Path) -> None:
    img = await make_qcow(tmp_path / "n.qcow", 8 * MiB, optimise=False)
    child = Recorder(str(img))
    d = await open_on(child)
    await d.pwrite(0, b"a" * 4096)  # allocated: cluster 0
    # Hold the next allocation's data write.
    child.gate, child.gate_at = asyncio.Event(), d._end
    slow = asyncio.ensure_future(d.pwrite(1 * MiB, b"b" * 4096))
    await asyncio.sleep(0.01)
    assert not slow.done()
    # Reads and in-place writes of allocated clusters go on meanwhile.
    await asyncio.wait_for(d.pwrite(0, b"c" * 4096), 1)
    assert bytes(await asyncio.wait_for(d.pread(0, 4096), 1)) == b"c" * 4096
    # The cluster being allocated still reads as before (zeros).
    assert bytes(await asyncio.wait_for(d.pread(1 * MiB, 4096), 1)) == bytes(4096)
    # A second writer of the same cluster waits for the first instead of allocating.
    second = asyncio.ensure_future(d.pwrite(1 * MiB + 100, b"d" * 100))
    await asyncio.sleep(0.01)
    assert not second.done()
    child.gate.set()
    await asyncio.gather(slow, second)
    assert bytes(await d.pread(1 * MiB, 200)) == b"b" * 100 + b"d" * 100
    alloc, _ = await d.allocation()
    assert alloc == 2
    await d.close()


async def test_many_requests_in_flight_optimised(tmp_path: Path) -> None:
    img = await make_qcow(tmp_path / "o.qcow", 16 * MiB)
    d = await open_qcow(img)
    ref = bytearray(16 * MiB)
    writes = [(i * 65536 + (i % 7) * 512, os.urandom(5000)) for i in range(200)]
    for off, data in writes:
        ref[off : off + len(data)] = data
    # Overlapping writes race; keep only non-overlapping ones in the reference check.
    await asyncio.gather(*(d.pwrite(off, data) for off, data in writes))
    got = await asyncio.gather(*(d.pread(off, len(data)) for off, data in writes))
    for (_off, data), g in zip(writes, got, strict=True):
        assert bytes(g) == data
    await d.close()


# Crash ordering.


async def test_metadata_order_data_then_l2_then_l1(tmp_path: Path) -> None:
    img = await make_qcow(tmp_path / "n.qcow", 8 * MiB, optimise=False)
    child = Recorder(str(img))
    d = await open_on(child)
    l1_off = d.meta.header.l1_table_offset
    await d.pwrite(3 * MiB, b"x" * 4096)
    l2off = d.l1[1]
    host = d._l2_tables[l2off][(3 * MiB >> 12) & 511]
    # Nothing but the data has been written before the flush.
    assert [e[1] for e in child.log] == [host]
    await d.flush()
    ops = child.log
    i_data = ops.index(("w", host, 4096))
    i_table = ops.index(("w", l2off, d.g.l2_bytes))
    i_l1 = ops.index(("w", l1_off + 8, 8))
    syncs = [i for i, op in enumerate(ops) if op[0] == "flush"]
    # data and the new L2 table, then a sync, then the L1 entry, then a sync
    assert max(i_data, i_table) < syncs[0] < i_l1 < syncs[1]
    # Another allocation in the same table: data, sync, then the single L2 entry.
    child.log.clear()
    await d.pwrite(3 * MiB + 8192, b"y" * 4096)
    host2 = d._l2_tables[l2off][((3 * MiB + 8192) >> 12) & 511]
    await d.flush()
    ops = child.log
    entry = l2off + 8 * (((3 * MiB + 8192) >> 12) & 511)
    assert ops.index(("w", host2, 4096)) < ops.index(("flush", 0, 0)) < ops.index(("w", entry, 8))
    assert ops[-1] == ("flush", 0, 0)
    await d.close()


async def test_unflushed_metadata_is_not_on_disk(tmp_path: Path) -> None:
    """Before a flush another reader (-U: beside the writer) sees the old image; after
    it, everything."""
    img = await make_qcow(tmp_path / "n.qcow", 8 * MiB, optimise=False)
    d = await open_qcow(img)
    await d.pwrite(5 * MiB, b"z" * 10000)
    other = await open_qcow(img, read_only=True, share=True)
    assert bytes(await other.pread(5 * MiB, 10000)) == bytes(10000)
    await other.close()
    await d.flush()
    other = await open_qcow(img, read_only=True, share=True)
    assert bytes(await other.pread(5 * MiB, 10000)) == b"z" * 10000
    await other.close()
    await d.close()


async def test_fua_makes_metadata_durable(tmp_path: Path) -> None:
    img = await make_qcow(tmp_path / "n.qcow", 8 * MiB, optimise=False)
    child = Recorder(str(img))
    d = await open_on(child)
    assert d.can_fua() == FuaMode.NATIVE
    await d.pwrite(0, b"f" * 4096, fua=True)  # allocating: a full flush
    assert child.log[-1] == ("flush", 0, 0)
    assert len([op for op in child.log if op[0] == "flush"]) == 2
    child.log.clear()
    await d.pwrite(0, b"g" * 4096, fua=True)  # in place, metadata clean: FUA write only
    assert child.log == [("fua", d._l2_tables[d.l1[0]][0], 4096)]
    await d.close()


# Block status.


async def test_extents_normal_and_optimised(tmp_path: Path) -> None:
    for optimise in (False, True):
        img = await make_qcow(tmp_path / f"{optimise}.qcow", 8 * MiB, optimise=optimise)
        d = await open_qcow(img)
        await d.pwrite(4096, b"d" * 8192)
        ext = await Backend(d).extents(0, 8 * MiB)
        assert ext[0].offset == 0 and ext[0].length == 4096
        data = [e for e in ext if e.flags == ExtentFlags.DATA]
        assert [(e.offset, e.length) for e in data] == [(4096, 8192)]
        if optimise:
            # Preallocated, never written: allocated, provably zero (a hole in the file).
            assert ext[0].flags == ExtentFlags.ZERO
            assert ext[2].flags == ExtentFlags.ZERO and ext[2].offset + ext[2].length == 2 * MiB
            assert ext[3].flags == HOLE_ZERO and ext[3].offset == 2 * MiB
        else:
            assert ext[0].flags == HOLE_ZERO and ext[2].flags == HOLE_ZERO
            assert ext[2].offset + ext[2].length == 8 * MiB
        await d.close()


async def test_extents_with_backing(tmp_path: Path) -> None:
    base = make_raw(tmp_path / "base.raw", 4 * MiB)  # smaller than the image
    write_raw(base, 1 * MiB, b"b" * 65536)
    img = await make_qcow(tmp_path / "c.qcow", 8 * MiB, backing=base)
    d = await open_qcow(img)
    assert d.backing is not None and not d.fast_path
    await d.pwrite(3 * MiB, b"t" * 512)
    ext = await Backend(d).extents(0, 8 * MiB)
    flags = {(e.offset, e.length): e.flags for e in ext}
    assert flags[(0, 1 * MiB)] == HOLE_ZERO  # backing hole
    assert flags[(1 * MiB, 65536)] == ExtentFlags.DATA  # allocated in the backing file
    assert flags[(3 * MiB, 512)] == ExtentFlags.DATA  # allocated here
    assert ext[-1].flags == HOLE_ZERO and ext[-1].offset <= 4 * MiB  # past the backing end
    assert bytes(await d.pread(4 * MiB - 10, 20)) == bytes(20)
    await d.close()


# Zeroing and discard.


async def test_zero_without_backing_clears_entries(tmp_path: Path) -> None:
    img = await make_qcow(tmp_path / "n.qcow", 8 * MiB, optimise=False)
    d = await open_qcow(img)
    await d.pwrite(0, b"q" * MiB)
    await d.zero(4096 + 100, 65536, may_trim=True, fua=False, fast=True)
    alloc, _ = await d.allocation()
    assert alloc == 256 - 15  # the 15 whole clusters are unallocated again
    assert bytes(await d.pread(4096, 65536 + 200)) == b"q" * 100 + bytes(65536) + b"q" * 100
    ext = await Backend(d).extents(8192, 4096)
    assert ext[0].flags == HOLE_ZERO
    # NO_HOLE (may_trim False) keeps the clusters, zeroed in place.
    await d.zero(MiB - 8192, 8192, may_trim=False, fua=True, fast=False)
    assert (await d.allocation())[0] == alloc
    assert bytes(await d.pread(MiB - 8192, 8192)) == bytes(8192)
    await d.trim(0, 8192)  # TRIM frees whole clusters
    assert (await d.allocation())[0] == alloc - 2
    await d.close()
    need("qemu-io")
    qemu_io(img, "read -P 0 0 69732", "read -P 0x71 69732 970652", "read -P 0 1040384 8192")


async def test_zero_with_backing_writes_zeroes(tmp_path: Path) -> None:
    base = make_raw(tmp_path / "base.raw", 8 * MiB)
    write_raw(base, 0, b"B" * (8 * MiB))
    img = await make_qcow(tmp_path / "c.qcow", backing=base, size=None)
    d = await open_qcow(img)
    assert not d.can_fast_zero()
    b = Backend(d)
    with pytest.raises(RequestError) as exc:
        await b.zero(0, 4096, fast=True)
    assert exc.value.errno == errno.ENOTSUP
    await b.zero(1000, 70000)  # unallocated: zeroes must be written over the backing data
    assert bytes(await b.pread(0, 72000)) == b"B" * 1000 + bytes(70000) + b"B" * 1000
    await d.pwrite(MiB, b"w" * 4096)
    await b.zero(MiB, 4096, may_trim=True)  # allocated: zeroed in place, not dropped
    assert bytes(await b.pread(MiB, 4096)) == bytes(4096)
    await b.trim(2 * MiB, 4096)  # advisory; must not fail
    await b.close()
    ref = make_raw(tmp_path / "ref.raw", 8 * MiB)
    write_raw(ref, 0, b"B" * (8 * MiB))
    write_raw(ref, 1000, bytes(70000))
    write_raw(ref, MiB, bytes(4096))
    compare(img, ref)


async def test_driver_zero_over_backing_writes_zeroes_in_chunks(tmp_path: Path) -> None:
    """The driver's own zero (the Backend writes zeros itself here, as can_fast_zero is
    off): an unallocated run over a backing file longer than one chunk of zeros."""
    base = make_raw(tmp_path / "base.raw", 8 * MiB)
    write_raw(base, 0, b"B" * (8 * MiB))
    img = await make_qcow(tmp_path / "c.qcow", backing=base, size=None, optimise=False)
    d = await open_qcow(img)
    await d.zero(1000, 3 * MiB, may_trim=True, fua=False, fast=False)
    got = bytes(await d.pread(0, 4 * MiB))
    assert got == b"B" * 1000 + bytes(3 * MiB) + b"B" * (MiB - 1000)
    await d.close()
    ref = make_raw(tmp_path / "ref.raw", 8 * MiB)
    write_raw(ref, 0, b"B" * (8 * MiB))
    write_raw(ref, 1000, bytes(3 * MiB))
    compare(img, ref)


async def test_zero_optimised_keeps_extents(tmp_path: Path) -> None:
    img = await make_qcow(tmp_path / "o.qcow", 8 * MiB)
    d = await open_qcow(img)
    await d.pwrite(0, b"o" * (2 * MiB))
    await d.zero(4096, MiB, may_trim=True, fua=False, fast=True)
    await d.trim(MiB + 4096, 8192)
    assert d.fast_path
    assert bytes(await d.pread(0, 8192)) == b"o" * 4096 + bytes(4096)
    await d.close()
    d = await open_qcow(img)
    assert d.fast_path  # the layout is intact: checksum rewritten on close
    await d.close()


# The Xen extension.


async def test_checksum_rewritten_on_clean_close(tmp_path: Path) -> None:
    img = await make_qcow(tmp_path / "o.qcow", 8 * MiB)
    d = await open_qcow(img)
    await d.pwrite(5 * MiB, b"c" * 4096)
    await d.close()
    with open(img, "rb") as f:
        head = f.read(4096 + 32)
    ext = XenExtension.parse(head)
    assert ext is not None
    assert ext.cksum == l1_cksum(head[4096 : 4096 + 32])
    # The bytes at 52-55 are the first four digest bytes reversed (x86 tapdisk).
    import hashlib

    digest = hashlib.md5(head[4096 : 4096 + 32]).digest()
    assert head[CKSUM_OFFSET : CKSUM_OFFSET + 4] == digest[3::-1]


async def test_checksum_mismatch_after_crash(tmp_path: Path) -> None:
    img = await make_qcow(tmp_path / "o.qcow", 8 * MiB)
    d = await open_qcow(img)
    await d.pwrite(3 * MiB, b"k" * 4096)
    await d.flush()
    await d.child.close()  # "crash": no clean close, the checksum is stale
    d = await open_qcow(img)
    assert d.meta.cksum_ok is False
    assert d.fast_path  # every extent checked: the layout holds
    assert bytes(await d.pread(3 * MiB, 4096)) == b"k" * 4096
    await d.close()
    # Break the layout behind the checksum's back: the safe path, and L2 is believed.
    d = await open_qcow(img)
    l2off = d.l1[1]
    entry = l2off + 8 * ((3 * MiB >> 12) & 511)
    target = d._end
    await d.close()
    with open(img, "r+b") as f:
        f.seek(target)
        f.write(b"M" * 4096)
        f.seek(entry)
        f.write(target.to_bytes(8, "big"))
        f.seek(4096 + 8)
        f.write((l2off + 0).to_bytes(8, "big"))  # same value: L1 unchanged...
        f.seek(CKSUM_OFFSET)
        f.write(b"\0\0\0\0")  # ...but the checksum no longer matches
    d = await open_qcow(img)
    assert not d.fast_path
    assert bytes(await d.pread(3 * MiB, 4096)) == b"M" * 4096
    # The safe path allocates single clusters, and the checksum stays as it was.
    await d.pwrite(7 * MiB, b"n" * 512)
    await d.close()
    assert read_header(img).l1_table_offset == 4096
    with open(img, "rb") as f:
        f.seek(CKSUM_OFFSET)
        assert f.read(4) == b"\0\0\0\0"
    need("qemu-io")
    qemu_io(img, "read -P 0x4d 3M 4k", "read -P 0x6e 7M 512")


async def _make_old_image(tmp_path: Path) -> tuple[Path, bytes]:
    """An image as tapdisk wrote it before March 2008: L1 little-endian, flag clear."""
    img = await make_qcow(tmp_path / "old.qcow", 8 * MiB)
    d = await open_qcow(img)
    data = os.urandom(3 * MiB)
    await d.pwrite(MiB, data)
    await d.close()
    with open(img, "r+b") as f:
        f.seek(4096)
        l1 = array("Q", to_be_bytes(array("Q", f.read(32))))  # the host-order values
        le = l1.tobytes()
        f.seek(4096)
        f.write(le)
        ext = XenExtension(l1_cksum(le), 512, XenFlags.SPARSE_FILE)
        f.seek(EXT_OFFSET)
        f.write(ext.build())
    return img, data


async def test_old_tapdisk_image_is_converted(tmp_path: Path) -> None:
    img, data = await _make_old_image(tmp_path)
    before = img.read_bytes()
    d = await open_qcow(img, read_only=True)  # read-only: converted in memory only
    assert d.meta.l1_native and d.fast_path
    assert bytes(await d.pread(MiB, len(data))) == data
    await d.close()
    assert img.read_bytes() == before
    d = await open_qcow(img)  # read-write: converted on disk
    assert d.fast_path
    assert bytes(await d.pread(MiB, len(data))) == data
    await d.close()
    with open(img, "rb") as f:
        head = f.read(4096 + 32)
    ext = XenExtension.parse(head)
    assert ext is not None and ext.l1_big_endian and ext.sparse
    assert ext.cksum == l1_cksum(head[4096:])
    ref = make_raw(tmp_path / "ref.raw", 8 * MiB)
    write_raw(ref, MiB, data)
    compare(img, ref)


async def test_conversion_cut_short_is_recognised(tmp_path: Path) -> None:
    """Table already big-endian but the flag still clear: not converted twice."""
    img, data = await _make_old_image(tmp_path)
    with open(img, "r+b") as f:
        f.seek(4096)
        le = f.read(32)
        f.seek(4096)
        f.write(to_be_bytes(array("Q", le)))
    d = await open_qcow(img)
    assert not d.meta.l1_native
    assert bytes(await d.pread(MiB, len(data))) == data
    await d.close()


async def test_reserve_grows_with_fallocate(tmp_path: Path) -> None:
    img = await make_qcow(tmp_path / "r.qcow", 8 * MiB, reserve=True)
    st = os.stat(img)
    assert st.st_size == 8192
    assert st.st_blocks * 512 >= 8 * MiB  # reserved beyond the end of the file
    d = await open_qcow(img)
    assert not d._sparse
    await d.pwrite(0, b"r" * 4096)
    await d.close()
    assert os.path.getsize(img) == 8192 + d.g.extent_bytes


# The L2 cache and write-back.


async def test_small_cache_with_pinned_dirty_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = await make_qcow(tmp_path / "n.qcow", 128 * MiB, optimise=False)
    d = await open_qcow(img)
    d._l2._max = 4
    for i in range(64):  # 64 L1 slots, each a new (pinned) table
        await d.pwrite(i * 2 * MiB + 512, bytes([i + 1]) * 512)
    assert len(d._l2) == 64
    await d.flush()
    for i in range(64):
        assert bytes(await d.pread(i * 2 * MiB + 512, 512)) == bytes([i + 1]) * 512
    assert len(d._l2) <= 8
    for i in range(0, 64, 3):  # rewrite in place and allocate more, under eviction
        await d.pwrite(i * 2 * MiB + 8192, bytes([i + 2]) * 4096)
    await d.close()
    d = await open_qcow(img, read_only=True)
    for i in range(64):
        assert bytes(await d.pread(i * 2 * MiB + 512, 512)) == bytes([i + 1]) * 512
        if i % 3 == 0:
            assert bytes(await d.pread(i * 2 * MiB + 8192, 4096)) == bytes([i + 2]) * 4096
    await d.close()


async def test_background_write_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qdriver, "WRITEBACK_TABLES", 4)
    img = await make_qcow(tmp_path / "n.qcow", 64 * MiB, optimise=False)
    d = await open_qcow(img)
    for i in range(10):
        await d.pwrite(i * 2 * MiB, b"w" * 512)
    task = d._writeback
    assert task is not None
    await asyncio.wait_for(asyncio.shield(task), 30)  # the write-back itself, not a sleep
    assert d._writeback is None and d._journal.tables < 10
    await d.close()


async def test_allocation_failure_leaves_a_usable_image(tmp_path: Path) -> None:
    img = await make_qcow(tmp_path / "n.qcow", 8 * MiB, optimise=False)
    d = await open_qcow(img)
    await d.pwrite(0, b"1" * 4096)

    def no_space(length: int, *, allocate: bool = False) -> None:
        raise OSError(errno.ENOSPC, "full")

    d._grow = no_space
    with pytest.raises(OSError) as exc:
        await d.pwrite(4 * MiB, b"2" * 4096)
    assert exc.value.errno == errno.ENOSPC
    await d.pwrite(0, b"3" * 4096)  # in place still works
    await d.close()
    need("qemu-io")
    qemu_io(img, "read -P 0x33 0 4k", "read -P 0 4M 4k")


class NowaitChild(RawDriver):
    """A file whose synchronous paths always answer (``ready``) or always decline, so
    that what the qcow driver does with each answer is deterministic."""

    def __init__(self, path: str, ready: bool) -> None:
        super().__init__(path)
        self.ready = ready

    def pread_nowait(self, offset: int, length: int) -> bytearray | None:
        return bytearray(os.pread(self.fd, length, offset)) if self.ready else None

    def pwrite_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        if self.ready:
            os.pwrite(self.fd, data, offset)
        return self.ready


@pytest.mark.parametrize("ready", [True, False])
async def test_nowait_paths(tmp_path: Path, ready: bool) -> None:
    img = await make_qcow(tmp_path / "o.qcow", 8 * MiB)
    d = await open_on(NowaitChild(str(img), ready))
    assert d.fast_path
    assert d.pread_nowait(0, 4096) is None  # unallocated: not known without the tables
    # Allocating the extent is bookkeeping; then the write goes through if the file can.
    assert d.pwrite_nowait(4096, b"n" * 4096) is ready
    assert d.l1[0] != 0
    if not ready:
        await d.pwrite(4096, b"n" * 4096)  # the caller's fallback
    got = d.pread_nowait(4096, 4096)
    assert (bytes(got) if got is not None else None) == (b"n" * 4096 if ready else None)
    assert bytes(await d.pread(4096, 4096)) == b"n" * 4096
    await d.close()


async def test_partial_write_copies_backing_data(tmp_path: Path) -> None:
    base = make_raw(tmp_path / "base.raw", 4 * MiB)
    pattern = os.urandom(4 * MiB)
    write_raw(base, 0, pattern)
    img = await make_qcow(tmp_path / "c.qcow", None, backing=base, cluster_size=4096)
    d = await open_qcow(img)
    await d.pwrite(4096 + 1000, b"P" * 100)
    assert bytes(await d.pread(4096, 4096)) == pattern[4096:5096] + b"P" * 100 + pattern[5196:8192]
    await d.close()
