"""VhdDriver: fixed, dynamic and differencing VHDs over a child driver, read and write.

Theory of operation
===================

A fixed disk is its data followed by the footer: reads and writes go straight through.

A dynamic or differencing disk maps guest block ``b`` (``block_size`` bytes) through the
BAT to a sector of the file, where the block's sector bitmap comes first and its data
after. "If a bit is set, the sector is in this image; if clear, it is in the parent
(differencing) or reads as zeros (dynamic)." Every walk over a guest range goes through
``engine.runs.runs`` over ``_lookup``; bitmaps come and go through a ``TableCache``.
blktap2's batmap, when present, marks blocks whose bitmap is all ones, which then need
no bitmap read. Writes only ever set bitmap bits, so a batmap bit stays true.

Allocation appends a block where the footer was and writes the footer after it. In a
dynamic disk a new block's bitmap is all ones, as QEMU writes it: its unwritten sectors
are holes in the file and read as zeros. In a differencing disk only the sectors
written get their bit; a partly written sector is first filled from what it read as
(the parent). Nothing else is copied.

Crash safety (the order blktap2 keeps): data before the bitmap, the bitmap before the
BAT entry, the footer last. Bitmaps and BAT entries change in memory; ``flush`` takes a
snapshot of them, syncs the data they describe, then writes them through an
``engine.journal.Journal`` in three stages (bitmaps, BAT entries, footer), each synced.
A bit set after the snapshot waits for the next flush, with its data.
"""

from __future__ import annotations

import asyncio
import errno
import sys
from array import array
from typing import TYPE_CHECKING

from formats.engine.backing import HOLE_ZERO, backing_status, read_backing
from formats.engine.image import ImageDriver, cache_tables
from formats.engine.journal import Journal
from formats.engine.runs import DATA, UNALLOC, Miss, add_extent, runs
from formats.engine.table_cache import TableCache
from formats.vhd.layout import BAT_UNUSED, SECTOR, DiskType, bitmap_bytes
from tapnbd.driver import BlockSize, Driver, Extent, ExtentFlags

if TYPE_CHECKING:
    from formats.vhd.meta import VhdMeta

MAX_EXTENTS = 1024
#: Where a new block's data starts in the file.
DATA_ALIGN = 4096
#: Journal stages.
S_BITMAP, S_BAT, S_FOOTER = 0, 1, 2


def _eio(message: str) -> OSError:
    return OSError(errno.EIO, message)


class VhdDriver(ImageDriver["VhdMeta"]):
    """A VHD read and written through ``child``; ``parent`` fills a differencing disk."""

    name = "vhd"

    def __init__(
        self,
        child: Driver,
        parent: Driver | None,
        meta: VhdMeta,
        *,
        read_only: bool = False,
        path: str = "",
    ) -> None:
        super().__init__(child, parent, meta, meta.size, read_only=read_only, path=path)
        self._fixed = meta.disk_type == DiskType.FIXED
        self._diff = meta.disk_type == DiskType.DIFFERENCING
        self._footer = meta.footer.build()
        self._journal = Journal(3, self._meta_write, child.flush)
        self._flush_lock = asyncio.Lock()
        #: The footer at the end is owed (blocks were added, or it was missing at open).
        self._grown = meta.footer_from_copy and not read_only
        if self._fixed:
            return
        h = meta.header
        assert h is not None
        self._bs = h.block_size
        self._bb = self._bs.bit_length() - 1
        self._bm = bitmap_bytes(self._bs)
        self._bat = meta.bat
        self._bat_off = h.table_offset
        self._batmap = meta.batmap
        #: Where the next block goes: the footer's place.
        self._end = meta.footer_offset
        self._bitmaps: TableCache[bytearray] = TableCache(
            self._read_bitmap, cache_tables(self._bm), self._pinned
        )
        #: Bitmaps (by file offset) and BAT entries (by block) changed since the last
        #: flush's snapshot.
        self._dirty_bitmaps: set[int] = set()
        self._dirty_bat: set[int] = set()
        #: Per-block locks for writes that allocate or set bitmap bits.
        self._locks: dict[int, asyncio.Lock] = {}
        self._lock_users: dict[int, int] = {}

    async def prepare(self) -> None:
        """On a writable open, put back a footer that a crash left missing at the end.

        (A read-only open owes nothing: ``_grown`` is then False.)"""
        if self._grown:
            await self.flush()

    def can_fast_zero(self) -> bool:
        return False

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        """VHD has no zero blocks, and a bit once set is never cleared (the batmap stays
        true): zeros are written, by the Backend's emulation (ENOTSUP)."""
        raise OSError(errno.ENOTSUP, "VHD has no zero blocks: write zeros")

    def block_size(self) -> BlockSize:
        return BlockSize(minimum=1, preferred=4096)

    # Bitmaps.

    def _pinned(self, off: int) -> bool:
        return off in self._dirty_bitmaps or self._journal.busy(off)

    async def _read_bitmap(self, off: int) -> bytearray:
        return bytearray(await self.child.pread(off, self._bm))

    async def _meta_write(self, off: int, data: bytes) -> None:
        await self.child.pwrite(off, data)

    def _full(self, b: int) -> bool:
        """blktap2's batmap says block ``b``'s bitmap is all ones."""
        bm = self._batmap
        return bm is not None and bool(bm[b >> 3] & (0x80 >> (b & 7)))

    # Lookup.

    def _lookup(self, pos: int, end: int) -> tuple[int, int, int]:
        """(kind, host, length) of the run at ``pos`` inside one block; raises Miss.

        DATA: the bytes are in this file at ``host``. UNALLOC: the parent's (or zeros).
        """
        b = pos >> self._bb
        bstart = b << self._bb
        lim = min(end, bstart + self._bs)
        e = self._bat[b]
        if e == BAT_UNUSED:
            return UNALLOC, 0, lim - pos
        boff = e * SECTOR
        host = boff + self._bm + (pos - bstart)
        if self._full(b):
            return DATA, host, lim - pos
        bm = self._bitmaps.get(boff)
        if bm is None:
            raise Miss(boff)
        s = (pos - bstart) >> 9
        s_last = (lim - 1 - bstart) >> 9
        bit = (bm[s >> 3] >> (7 - (s & 7))) & 1
        j = s + 1
        # Whole bytes of the same bit at a time, then bit by bit.
        fill = 0xFF if bit else 0
        while j <= s_last:
            if not j & 7 and j + 7 <= s_last and bm[j >> 3] == fill:
                j += 8
                continue
            if (bm[j >> 3] >> (7 - (j & 7))) & 1 != bit:
                break
            j += 1
        n = min(lim, bstart + (j << 9)) - pos
        return (DATA if bit else UNALLOC), host, n

    # Reads.

    def pread_nowait(self, offset: int, length: int) -> bytes | bytearray | None:
        if self._fixed:
            return self.child.pread_nowait(offset, length)
        try:
            kind, host, n = self._lookup(offset, offset + length)
        except Miss:
            return None
        if kind != DATA or n != length:
            return None
        return self.child.pread_nowait(host, length)

    async def pread(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        if self._fixed:
            return await self.child.pread(offset, length)
        end = offset + length
        try:
            kind, host, n = self._lookup(offset, end)
            if n == length:  # one run, the common case: no generator, no copy
                if kind == DATA:
                    return await self.child.pread(host, n)
                if self.backing is None:
                    return bytes(n)
        except Miss:
            pass
        buf = bytearray(length)
        pos = offset
        async for kind, host, n in runs(self._lookup, self._bitmaps.load, offset, end):
            o = pos - offset
            if kind == DATA:
                buf[o : o + n] = await self.child.pread(host, n)
            elif self.backing is not None:
                buf[o : o + n] = await read_backing(self.backing, pos, n)
            pos += n
        return buf

    # Writes.

    def pwrite_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        if self.read_only:
            return False
        if self._fixed:
            return self.child.pwrite_nowait(offset, data)
        try:
            kind, host, n = self._lookup(offset, offset + len(data))
        except Miss:
            return False
        return kind == DATA and n == len(data) and self.child.pwrite_nowait(host, data)

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only image")
        if self._fixed:
            await self.child.pwrite(offset, data)
        else:
            view = memoryview(data)
            pos, end = offset, offset + len(data)
            while pos < end:
                lim = min(end, ((pos >> self._bb) + 1) << self._bb)
                await self._write_in_block(pos, view[pos - offset : lim - offset])
                pos = lim
        if fua:
            await self.flush()

    async def _write_in_block(self, pos: int, chunk: memoryview) -> None:
        """Write ``chunk`` at ``pos``, all inside one block."""
        end = pos + len(chunk)
        # In place when every sector touched is already this image's.
        try:
            kind, host, n = self._lookup(pos, end)
            if kind == DATA and n == len(chunk):
                await self.child.pwrite(host, chunk)
                return
        except Miss:
            pass
        b = pos >> self._bb
        lock = self._locks.get(b)
        if lock is None:
            lock = self._locks[b] = asyncio.Lock()
        self._lock_users[b] = self._lock_users.get(b, 0) + 1
        try:
            async with lock:
                await self._write_slow(b, pos, chunk)
        finally:
            # Dropped only when nobody holds or waits for it (a waiter woken by the
            # release has not taken the lock yet, but still counts).
            self._lock_users[b] -= 1
            if not self._lock_users[b]:
                del self._lock_users[b], self._locks[b]

    async def _write_slow(self, b: int, pos: int, chunk: memoryview) -> None:
        bstart = b << self._bb
        if self._bat[b] == BAT_UNUSED:
            self._allocate(b)
        boff = self._bat[b] * SECTOR
        bm = await self._bitmaps.load(boff) if not self._full(b) else None
        end = pos + len(chunk)
        s0 = (pos - bstart) >> 9
        s1 = (end - 1 - bstart) >> 9

        def bit(s: int) -> bool:
            return bm is None or bool((bm[s >> 3] >> (7 - (s & 7))) & 1)

        # A partly written sector that is not ours yet keeps what it read as.
        a = bstart + (s0 << 9) if pos & 511 and not bit(s0) else pos
        z = min(bstart + ((s1 + 1) << 9), self._size) if end & 511 and not bit(s1) else end
        if a == pos and z == end:
            out: bytes | memoryview = chunk
        else:
            buf = bytearray(z - a)
            if a < pos:
                buf[: pos - a] = await self._read_unallocated(a, pos - a)
            buf[pos - a : end - a] = chunk
            if end < z:
                buf[end - a :] = await self._read_unallocated(end, z - end)
            out = memoryview(buf)
        await self.child.pwrite(boff + self._bm + (a - bstart), out)
        if bm is not None and not all(bit(s) for s in range(s0, s1 + 1)):
            # The data is written: now the bits may say so.
            for s in range(s0, s1 + 1):
                bm[s >> 3] |= 0x80 >> (s & 7)
            self._dirty_bitmaps.add(boff)
            # Evicted and read again while the data was written? Ours is the newest:
            # bitmaps change only under the block's lock, which we hold.
            self._bitmaps.put(boff, bm)

    async def _read_unallocated(self, pos: int, n: int) -> bytes | bytearray | memoryview:
        if self.backing is None:
            return bytes(n)
        return await read_backing(self.backing, pos, n)

    def _allocate(self, b: int) -> None:
        """Give block ``b`` space where the footer is; the footer moves after it.

        The block's data starts on a 4 KiB boundary (its bitmap just before), as tapdisk
        places blocks for O_DIRECT: a 4 KiB guest read is then one page of the file, not
        two. Synchronous, so two blocks can never get the same place.
        """
        boff = self._end + (-(self._end + self._bm) & (DATA_ALIGN - 1))
        self._end = boff + self._bm + self._bs
        if self._grow is not None:
            self._grow(self._end + SECTOR)
        # A dynamic disk's new block is all its own (holes read as zeros, as QEMU's);
        # a differencing disk's is its parent's until written.
        fill = b"\0" if self._diff else b"\xff"
        self._bitmaps.put(boff, bytearray(fill * self._bm))
        self._bat[b] = boff // SECTOR
        self._dirty_bitmaps.add(boff)
        self._dirty_bat.add(b)
        self._grown = True

    # Block status.

    async def extents(self, offset: int, length: int) -> list[Extent]:
        if self._fixed:
            if self.child.can_extents():
                return await self.child.extents(offset, length)
            return [Extent(offset, length, ExtentFlags.DATA)]
        try:
            kind, _host, n = self._lookup(offset, offset + length)
            if n == length and (kind == DATA or self.backing is None):
                return [Extent(offset, n, ExtentFlags.DATA if kind == DATA else HOLE_ZERO)]
        except Miss:
            pass
        out: list[Extent] = []
        pos = offset
        async for kind, _host, n in runs(self._lookup, self._bitmaps.load, offset, offset + length):
            if kind == DATA:
                add_extent(out, pos, n, ExtentFlags.DATA)
            elif self.backing is None:
                add_extent(out, pos, n, HOLE_ZERO)
            else:
                await backing_status(self.backing, out, pos, n)
            pos += n
            if len(out) >= MAX_EXTENTS:
                break
        return out

    # Flush and close.

    def _bat_bytes(self, first: int, last: int) -> bytes:
        part = array("I", self._bat[first : last + 1])
        if sys.byteorder == "little":
            part.byteswap()
        return part.tobytes()

    async def flush(self) -> None:
        """Data, then bitmaps, then BAT entries, then the footer: each durable in turn."""
        if self._fixed:
            await self.child.flush()
            return
        async with self._flush_lock:
            # The snapshot: only bits whose data is already written are in it.
            dirty_bm, self._dirty_bitmaps = self._dirty_bitmaps, set()
            dirty_bat, self._dirty_bat = self._dirty_bat, set()
            grown, self._grown = self._grown, False
            j = self._journal
            for boff in dirty_bm:
                bm = self._bitmaps.get(boff)
                if bm is None:  # pragma: no cover - dirty bitmaps are pinned
                    raise _eio(f"bitmap at 0x{boff:x} lost from the cache")
                j.record(S_BITMAP, boff, bytes(bm), tag=boff)
            for b in dirty_bat:
                j.record(S_BAT, self._bat_off + 4 * b, self._bat_bytes(b, b))
            if grown:
                j.record(S_FOOTER, self._end, self._footer)
            try:
                await self.child.flush()
                if not await j.flush():
                    return
            except BaseException:
                # The journal keeps its records; ours go back for the next snapshot.
                self._dirty_bitmaps |= dirty_bm
                self._dirty_bat |= dirty_bat
                self._grown = self._grown or grown
                raise

    # Facts for `tapnbd info`.

    def describe(self) -> dict[str, object]:
        """Keys as ``qemu-img info --output=json`` spells them, vpc's where it has them."""
        f, h = self.meta.footer, self.meta.header
        data: dict[str, object] = {
            "disk-type": DiskType(f.disk_type).name.lower(),
            "uuid": _uuid(f.uuid),
            "creator": f.creator_app.decode("latin-1").rstrip("\0 "),
        }
        info: dict[str, object] = {
            "format": self.name,
            "virtual-size": self._size,
            "dirty-flag": False,
            "format-specific": {"type": "vhd", "data": data},
        }
        if h is not None:
            info["cluster-size"] = h.block_size
            data["block-size"] = h.block_size
            data["batmap"] = self.meta.batmap is not None
        if h is not None and self._diff:
            data["parent-uuid"] = _uuid(h.parent_uuid)
            info["backing-filename"] = h.parent_name
            if self.backing is not None:
                info["full-backing-filename"] = getattr(self.backing, "path", h.parent_name)
            info["backing-filename-format"] = "vhd"
        return info


def _uuid(raw: bytes) -> str:
    import uuid

    return str(uuid.UUID(bytes=raw))
