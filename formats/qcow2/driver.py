"""Qcow2Driver: qcow2 versions 2 and 3 over a child driver, read and write.

Theory of operation
===================

Translation ("Cluster mapping"): guest offset -> L1 entry (an L2 table's offset) -> L2
entry: a data cluster's offset, a compressed cluster's descriptor, a zero cluster (v3's
bit 0), or 0 (unallocated: the backing file shows through, or zeros). The L1 table is in
memory; L2 tables and refcount blocks come and go through ``TableCache``s. Every walk
over a guest range (read, write, zero, block status) goes through ``engine.runs.runs``
over ``_lookup``, which answers from memory or asks for a table to be loaded.

Allocation appends clusters at the end of the file, or takes back freed clusters, the
lowest first (as qemu's free_cluster_index search); a write of several clusters takes a
run of freed ones in a row, never a scattered set. Freed clusters are reused only once
the flush that made their refcount 0 durable has completed; before that, a crash could
leave an old L2 entry on disk naming one beside the new one. A reused cluster is written
whole (it may hold old data where punching is not supported). Bit 63 of an entry
(COPIED) says the refcount is exactly one: only such clusters and L2 tables are written
in place. Anything else (a snapshot's, a compressed or zero cluster) is copied into a
new cluster first, and the old one loses a reference.

Crash safety, by flush epochs (``engine.journal``), with refcounts in them. Changes are
made in memory, data first; ``flush`` writes them in stages, syncing after each:

0. new L2 tables, new refcount blocks, changed refcount blocks (increments), a moved
   refcount table: nothing on disk points at any of them yet;
1. refcount table entries naming new blocks, and the header fields of a moved table;
2. L2 and L1 entries: now the new clusters are named, and their refcounts are durable.

"A refcount is incremented and durable before any L2 entry names the cluster." Clusters
that lost a reference are decremented only after stage 2 is durable, then written and
synced ("decrements after the pointers are gone"); a cluster whose refcount reaches 0 is
then punched out of the file. A crash at any point leaves only leaked clusters, and
every write acknowledged before a completed FLUSH reads back.

References: QEMU docs/interop/qcow2.txt; block/qcow2-cluster.c, qcow2-refcount.c.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
import zlib
from array import array
from functools import partial
from typing import TYPE_CHECKING, Any

from formats.engine.backing import HOLE_ZERO, backing_status, read_backing
from formats.engine.compressed import Inflater
from formats.engine.image import ImageDriver, cache_tables
from formats.engine.journal import Journal
from formats.engine.runs import (
    COMPRESSED,
    DATA,
    SHARED,
    UNALLOC,
    ZERO,
    Miss,
    add_extent,
    host_status,
    runs,
)
from formats.engine.table_cache import TableCache
from formats.engine.tables import be_array, to_be_bytes
from formats.qcow2.layout import (
    AUTOCLEAR_OFFSET,
    L2E_RESERVED,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFTABLE_FIELDS_OFFSET,
    Autoclear,
    Incompatible,
    compressed_span,
)
from formats.qcow2.live_bitmaps import LiveBitmaps
from formats.qcow2.refcount import decode_block, encode_block, entries_per_block, max_refcount
from formats.raw import RawDriver
from tapnbd.driver import BlockSize, Driver, Extent, ExtentFlags
from tapnbd.errors import RefusedIOError

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from formats.qcow2.meta import Qcow2Meta

log = logging.getLogger(__name__)

#: Block status answers at most this many extents per call; the client asks again.
MAX_EXTENTS = 1024
#: An L2 entry found bad when its table was read is replaced by this (reserved bit 1):
#: using it fails with EIO, the rest of the table still works.
_BAD = 2
#: Likewise (reserved bit 2), for an entry whose data lies on the image's own metadata
#: (Qcow2Driver._metadata): a write there would change the tables, and the copy-on-write
#: of a shared one would free them; a writable open refuses both with EIO.
_ON_META = 4
#: Journal stages (see the module docstring).
S_NEW, S_REFTABLE, S_MAP = 0, 1, 2
_ZERO_CHUNK = 1 << 20
#: The file grows this far ahead of need, as a hole: one ftruncate per this many bytes
#: of allocation instead of an fstat and an ftruncate per allocating write. Space past
#: the last cluster with a refcount is nothing to qemu-img check (it is not counted).
GROW_AHEAD = 4 << 20
#: How many freed clusters a write of several looks through for a run of its length
#: (a bounded cost per allocating write while freed clusters are fragmented).
_RUN_SCAN = 1024
#: Bits of an L2 entry that make it anything but a plain data cluster.
_NOT_PLAIN = OFLAG_COMPRESSED | OFLAG_ZERO | L2E_RESERVED


def _eio(message: str) -> OSError:
    return OSError(errno.EIO, message)


class Qcow2Driver(ImageDriver["Qcow2Meta"]):
    """A qcow2 image read and written through ``child``; ``backing`` fills holes."""

    name = "qcow2"

    def __init__(
        self,
        child: Driver,
        backing: Driver | None,
        meta: Qcow2Meta,
        *,
        read_only: bool = False,
        path: str = "",
    ) -> None:
        h = meta.header
        super().__init__(child, backing, meta, h.size, read_only=read_only, path=path)
        self._v3 = h.version >= 3
        #: An encrypted image's ``encrypt`` block for info (``read_encryption``).
        self.encrypt: dict[str, object] | None = None
        cb = self._cb = h.cluster_bits
        cs = self._cs = 1 << cb
        self._shift = cb + cb - 3  # bytes mapped by one L2 table, as a shift
        self._l2_mask = (1 << (cb - 3)) - 1
        self.l1 = meta.l1
        self._l1_off = h.l1_table_offset
        self.reftable = meta.reftable
        self._rt_off = h.refcount_table_offset
        self._rt_clusters = h.refcount_table_clusters
        self._order = h.refcount_order
        self._rb_bits = cb + 3 - self._order
        self._rb_mask = entries_per_block(cb, self._order) - 1
        self._rc_max = max_refcount(self._order)
        # Compressed descriptors: "x = 62 - (cluster_bits - 8)".
        x = 62 - (cb - 8)
        self._c_off_mask = (1 << x) - 1
        self._c_shift = x
        # data_first: should an epoch ever name new data without a refcount record of
        # its own, the data is still synced before the entries. Today every such epoch
        # has one (a write into a zero cluster that keeps its offset moves to a new
        # cluster), so this costs no sync; it keeps the rule from hanging on that.
        self._journal = Journal(3, self._meta_write, child.flush, data_first=True)
        tables = cache_tables(cs)
        self._l2: TableCache[array[int]] = TableCache(self._read_l2, tables, self._journal.busy)
        self._rb: TableCache[array[int]] = TableCache(self._read_rb, tables, self._journal.busy)
        self._l2_tables = self._l2.tables
        #: Next free cluster: allocation only ever appends.
        self._end = (meta.file_size + cs - 1) // cs * cs
        #: How far the file has been grown (``GROW_AHEAD``); 0 turns growing ahead off.
        self._grown = self._end
        self._grow_ahead = GROW_AHEAD
        #: metadata_preallocated(), once asked.
        self._preallocated: bool | None = None
        #: Freed host clusters (indices, sorted) whose refcount 0 is durable: they may
        #: be handed out again.
        self._reusable: list[int] = []
        #: A table as read from disk cannot rightly point past the end at open, unless
        #: this driver changed it since (``_touched``).
        self._open_end = self._end
        self._touched: set[int] = set()
        #: Host clusters (indices) of the metadata at open (meta.claim_metadata), on a
        #: writable open; an L2 entry whose data lies there is refused (``_read_l2``).
        #: The bitmaps kept up to date add their clusters of bits (live_bitmaps). New
        #: metadata is only ever appended (``_reserve``), never in a freed cluster that
        #: another entry of a hostile image may still name.
        self._metadata = meta.metadata
        #: Guest clusters whose allocation is in flight.
        self._pending: dict[int, asyncio.Future[None]] = {}
        #: Host clusters that lost a reference, (first cluster index, count): decremented
        #: once the tables no longer naming them are durable.
        self._decrefs: list[tuple[int, int]] = []
        self._flush_lock = asyncio.Lock()
        #: Compressed writes: one at a time, packed from ``_zpos`` on.
        self._compress_lock = asyncio.Lock()
        self._zpos = 0
        self._inflater = Inflater(child, cs)
        #: Persistent dirty bitmaps; ``_tracked`` (its list of bitmaps kept up to date)
        #: is checked on the write paths, and is empty unless the image has some.
        self._bitmaps = LiveBitmaps(self)
        self._tracked = self._bitmaps.tracked

    # Open-time work.

    async def prepare(self) -> None:
        """On a writable open, clear autoclear bits we don't maintain (qcow2.txt), and
        keep the persistent bitmaps up to date (``live_bitmaps``).

        "An implementation may only write to an image with unknown auto-clear features
        if it clears the respective bits from this field first."
        """
        h = self.meta.header
        if self.read_only or not self._v3:
            return
        keep = Autoclear.BITMAPS if self.meta.bitmaps_ext is not None else 0
        if h.autoclear_features & ~keep:
            await self.child.pwrite(AUTOCLEAR_OFFSET, int(keep).to_bytes(8, "big"))
            await self.child.flush()
        await self._bitmaps.open()

    # Capabilities.

    @property
    def cluster_size(self) -> int:
        return self._cs

    def can_trim(self) -> bool:
        return not self.read_only

    def can_fast_zero(self) -> bool:
        # Zero clusters make zeroing fast on v3; v2 over a backing file must write.
        return not self.read_only and (self._v3 or self.backing is None)

    def block_size(self) -> BlockSize:
        return BlockSize(minimum=1, preferred=max(4096, min(self._cs, 1 << 20)))

    # Tables.

    async def _read_l2(self, off: int) -> array[int]:
        """Read an L2 table, marking entries that point outside the file as bad, and on
        a writable open those whose data lies on the image's metadata."""
        t = be_array(await self.child.pread(off, self._cs))
        limit = self._end if off in self._touched else self._open_end
        cs, cb, on_meta = self._cs, self._cb, self._metadata
        for i, e in enumerate(t):
            if not e:
                continue
            mark = 0
            if e & OFLAG_COMPRESSED:
                host = e & self._c_off_mask
                if host < cs or host >= limit:
                    mark = _BAD
                elif on_meta:
                    at, n = self._compressed_location(e)
                    if not on_meta.isdisjoint(range(at >> cb, ((at + n - 1) >> cb) + 1)):
                        mark = _ON_META
            else:
                host = e & OFFSET_MASK
                if host and (host % cs != 0 or host < cs or host + cs > limit):
                    mark = _BAD
                elif host and host >> cb in on_meta:  # (0: a hole or a zero cluster)
                    mark = _ON_META
            if mark == _ON_META:
                log.error(
                    "%s: L2 table 0x%x entry %d (0x%x) points at the image's own metadata",
                    self.path,
                    off,
                    i,
                    e,
                )
            elif mark:
                log.error("%s: L2 table 0x%x entry %d (0x%x) is invalid", self.path, off, i, e)
            if mark:
                t[i] = mark
        return t

    async def _read_rb(self, off: int) -> array[int]:
        return decode_block(await self.child.pread(off, self._cs), self._order)

    async def _meta_write(self, off: int, data: bytes) -> None:
        await self.child.pwrite(off, data)

    # Lookup.

    def _lookup(self, pos: int, end: int) -> tuple[int, int, int]:
        """(kind, host, length) of the run at ``pos``, from memory; raises Miss.

        A run never crosses an L2 table. DATA and SHARED runs are host-contiguous, and
        ``host`` includes the offset into the cluster; a COMPRESSED run is one cluster
        and ``host`` is its entry; a ZERO run that still holds a cluster is one cluster.
        """
        shift = self._shift
        l1i = pos >> shift
        lim = min(end, (l1i + 1) << shift)
        l2off = self.l1[l1i] & OFFSET_MASK
        if not l2off:
            return UNALLOC, 0, lim - pos
        t = self._l2.get(l2off)
        if t is None:
            raise Miss(l2off)
        cb = self._cb
        i = (pos >> cb) & self._l2_mask
        in_cl = pos & (self._cs - 1)
        e = t[i]
        last = i + (((lim - 1) >> cb) - (pos >> cb))  # index of the last cluster asked
        if e & OFLAG_COMPRESSED:
            return COMPRESSED, e, min(lim - pos, self._cs - in_cl)
        if e & L2E_RESERVED or (e & OFLAG_ZERO and not self._v3):
            if e == _BAD:  # the entry as read was logged when the table was
                raise RefusedIOError(
                    f"L2 table 0x{l2off:x} entry {i} points outside the image file"
                )
            if e == _ON_META:
                raise RefusedIOError(
                    f"L2 table 0x{l2off:x} entry {i} points at the image's own metadata "
                    "(a table, the header); not used by a writer"
                )
            raise _eio(f"L2 table 0x{l2off:x} entry {i} (0x{e:x}) is invalid")
        host = e & OFFSET_MASK
        j = i + 1
        if e & OFLAG_ZERO:
            kind = ZERO
            if not host:
                while j <= last and t[j] == OFLAG_ZERO:
                    j += 1
        elif not host:
            kind = UNALLOC
            while j <= last and not t[j]:
                j += 1
        else:
            kind = DATA if e & OFLAG_COPIED else SHARED
            nxt = e + self._cs
            while j <= last and t[j] == nxt:
                j += 1
                nxt += self._cs
            host += in_cl
        return kind, host, min(lim - pos, ((j - i) << cb) - in_cl)

    def _load(self, off: int) -> Coroutine[Any, Any, array[int]]:
        return self._l2.load(off)

    # Synchronous fast paths.

    def _host_now(self, offset: int, length: int, write: bool) -> int:
        """The host offset of [offset, offset + length) if it is one known run, else -1.

        The common case, inside one cluster whose table is in memory, is answered
        inline: the full lookup costs as much again as the rest of a 4 KiB read.
        """
        in_cl = offset & (self._cs - 1)
        if in_cl + length <= self._cs:
            t = self._l2_tables.get(self.l1[offset >> self._shift] & OFFSET_MASK)
            if t is None:
                return -1
            e = t[(offset >> self._cb) & self._l2_mask]
            if e & _NOT_PLAIN or not e & OFFSET_MASK or (write and not e & OFLAG_COPIED):
                return -1
            return (e & OFFSET_MASK) + in_cl
        try:
            kind, host, n = self._lookup(offset, offset + length)
        except (Miss, OSError):
            return -1
        if n != length or not (kind == DATA or (kind == SHARED and not write)):
            return -1
        return host

    def pread_nowait(self, offset: int, length: int) -> bytes | bytearray | None:
        host = self._host_now(offset, length, False)
        if host >= 0:
            return self.child.pread_nowait(host, length)
        return None if self.backing is None else self._backing_now(offset, length)

    def _backing_now(self, offset: int, length: int) -> bytes | bytearray | None:
        """An overlay's read of one unallocated run, from the backing file at once."""
        assert self.backing is not None
        if offset + length > self.backing.size():
            return None  # partly past the backing file's end: read_backing pads it
        try:
            kind, _host, n = self._lookup(offset, offset + length)
        except (Miss, OSError):
            return None
        if kind != UNALLOC or n != length:
            return None
        return self.backing.pread_nowait(offset, length)

    def pwrite_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        if self.read_only:
            return False
        if self._tracked:  # marked first: a bit set for a write that fails is harmless
            self._bitmaps.mark(offset, len(data))
        host = self._host_now(offset, len(data), True)
        if host >= 0:
            return self.child.pwrite_nowait(host, data)
        return self._alloc_now(offset, data)

    def _alloc_now(self, offset: int, data: bytes | memoryview) -> bool:
        """An allocating write done without waiting, when everything it needs is in memory.

        Only for clusters that read as zeros (unallocated with no backing file, or zero
        clusters without a host cluster): the new clusters lie past the file's old end,
        holes that read as zeros already, so only the data is written. The data goes
        first; the refcounts and L2 entries are then set in memory and recorded in the
        journal, which makes the refcounts durable before the entries (module docstring).
        """
        cb, cs = self._cb, self._cs
        n = len(data)
        c0, c1 = offset >> cb, (offset + n - 1) >> cb
        k = c1 - c0 + 1
        if (c0 ^ c1) >> (cb - 3) or self._grow is None:
            return False  # crosses an L2 table, or the file cannot grow
        if self._reusable and self._freed_run(k) >= 0:
            return False  # freed clusters are due for reuse: the asynchronous path
        l1e = self.l1[offset >> self._shift]
        if not l1e & OFLAG_COPIED:
            return False
        l2off = l1e & OFFSET_MASK
        t = self._l2_tables.get(l2off)
        if t is None:
            return False
        i0 = c0 & self._l2_mask
        i1 = i0 + c1 - c0
        pending = self._pending
        for i in range(i0, i1 + 1):
            e = t[i]
            if e and (e != OFLAG_ZERO or not self._v3):
                return False
            if not e and self.backing is not None:
                return False
        if pending and any(c in pending for c in range(c0, c1 + 1)):
            return False
        host = self._end
        h0, h1 = host >> cb, (host >> cb) + k - 1
        ri = h0 >> self._rb_bits
        if ri != h1 >> self._rb_bits or ri >= len(self.reftable):
            return False
        boff = self.reftable[ri] & OFFSET_MASK
        block = self._rb.get(boff) if boff else None
        if block is None:
            return False
        b0 = h0 & self._rb_mask
        if any(block[b0 : b0 + k]):
            return False  # the async path reports it
        self._reserve(k * cs)
        if not self.child.pwrite_nowait(host + (offset & (cs - 1)), data):
            self._end = host  # nothing refers to the clusters yet: give them back
            return False
        for b in range(b0, b0 + k):
            block[b] = 1
        if not self._journal.has(S_NEW, boff):
            self._journal.record(S_NEW, boff, partial(encode_block, block, self._order), tag=boff)
        for j in range(k):
            self._set_l2(l2off, t, i0 + j, (host + (j << cb)) | OFLAG_COPIED)
        return True

    # Reads.

    async def pread(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        end = offset + length
        while True:
            try:
                kind, host, n = self._lookup(offset, end)
                break
            except Miss as miss:
                await self._l2.load(miss.offset)
        if n == length:  # one run: no copy
            if kind in (DATA, SHARED):
                return await self.child.pread(host, n)
            if kind == ZERO or (kind == UNALLOC and self.backing is None):
                return bytes(n)
            if kind == UNALLOC and self.backing is not None:
                return await read_backing(self.backing, offset, n)
        buf = bytearray(length)
        pos = offset
        async for kind, host, n in runs(self._lookup, self._load, offset, end):
            o = pos - offset
            if kind in (DATA, SHARED):
                buf[o : o + n] = await self.child.pread(host, n)
            elif kind == COMPRESSED:
                c = pos & (self._cs - 1)
                buf[o : o + n] = (await self._decompress(host))[c : c + n]
            elif kind == UNALLOC and self.backing is not None:
                buf[o : o + n] = await read_backing(self.backing, pos, n)
            pos += n
        return buf

    def _compressed_location(self, entry: int) -> tuple[int, int]:
        """(host offset, byte count) of a compressed cluster's data."""
        return compressed_span(entry, self._cb)

    async def _decompress(self, entry: int) -> bytes:
        """The cluster stored compressed by ``entry`` (engine.compressed)."""
        if entry in (_BAD, _ON_META):
            raise _eio("invalid compressed cluster descriptor")
        off, csize = self._compressed_location(entry)
        return await self._inflater.cluster(entry, off, csize)

    async def _old_content(
        self, pos: int, n: int, kind: int, host: int
    ) -> bytes | bytearray | memoryview:
        """What [pos, pos + n) read as before the cluster holding it is reallocated."""
        if kind == COMPRESSED:
            c = pos & (self._cs - 1)
            return (await self._decompress(host))[c : c + n]
        if kind == SHARED:
            return await self.child.pread(host, n)
        if kind == UNALLOC and self.backing is not None:
            return await read_backing(self.backing, pos, n)
        return bytes(n)

    # Writes.

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if self._tracked:
            self._bitmaps.mark(offset, len(data))
        view = memoryview(data)
        end = offset + len(view)
        pos = offset
        allocated = False
        while pos < end:
            try:
                kind, host, n = self._lookup(pos, end)
            except Miss as miss:
                await self._l2.load(miss.offset)
                continue
            if kind == DATA:
                o = pos - offset
                await self.child.pwrite(host, view[o : o + n], fua)
                pos += n
            else:
                done = await self._alloc_write(pos, pos + n, kind, host, view, offset)
                allocated = allocated or done > 0
                pos += done
        if fua and (allocated or self._journal.pending):
            await self.flush()

    def _reserve(self, n: int, allocate: bool = False) -> int:
        """Claim ``n`` bytes (whole clusters) at the end of the file (``allocate``: with
        fallocate, else as a hole). Metadata comes from here only: a freed cluster may
        still be named by another entry of a hostile image (two entries, refcount 1),
        and a table put there would be rewritten by the guest's writes through it."""
        if self._grow is None:
            raise OSError(errno.ENOSPC, "the image file cannot grow")
        host = self._end
        end = host + n
        if allocate or end > self._grown:
            grown = end if allocate else end + self._grow_ahead
            self._grow(grown, allocate=allocate)
            self._grown = max(self._grown, grown)
        self._end = end
        return host

    def _reserve_run(self, k: int) -> int:
        """``k`` data clusters in a row: the lowest run of ``k`` freed ones, else at the
        end of the file. A write's clusters stay together, as qemu keeps them: split over
        two runs, one guest block would be two writes to the file, and a power cut could
        keep one without the other."""
        i = self._freed_run(k)
        if i < 0:
            return self._reserve(k * self._cs)
        first = self._reusable[i]
        del self._reusable[i : i + k]
        return first << self._cb

    def _freed_run(self, k: int) -> int:
        """Where the lowest run of ``k`` freed clusters starts in ``_reusable``, or -1."""
        free = self._reusable
        # Sorted and distinct: free[i:i + k] is a run exactly when its ends are k - 1
        # apart. The scan is bounded; past it, the file grows as it did before.
        for i in range(min(len(free) - k + 1, _RUN_SCAN)):
            if free[i + k - 1] - free[i] == k - 1:
                return i
        return -1

    async def _writable_l2(self, l1i: int) -> tuple[int, array[int]]:
        """The L2 table for L1 slot ``l1i``, made if absent and copied if shared."""
        e = self.l1[l1i]
        old = e & OFFSET_MASK
        if old and e & OFLAG_COPIED:
            return old, await self._l2.load(old)
        # A copied table keeps any entries marked bad: they stay unusable.
        table = array("Q", await self._l2.load(old)) if old else array("Q", bytes(self._cs))
        new = self._reserve(self._cs)
        await self._incref(new >> self._cb, 1)
        if self.l1[l1i] != e:  # another request installed a table meanwhile
            self._decrefs.append((new >> self._cb, 1))
            return await self._writable_l2(l1i)
        self._touched.add(new)
        self._l2.put(new, table)
        self._journal.record(S_NEW, new, lambda: to_be_bytes(table), tag=new)
        self._set_l1(l1i, new | OFLAG_COPIED)
        if old:
            self._decrefs.append((old >> self._cb, 1))
            self._l2.drop(old)
        return new, table

    def _set_l1(self, l1i: int, value: int) -> None:
        self.l1[l1i] = value
        self._journal.record(S_MAP, self._l1_off + 8 * l1i, value.to_bytes(8, "big"))

    def _set_l2(self, l2off: int, t: array[int], i: int, value: int) -> None:
        t[i] = value
        if not self._journal.has(S_NEW, l2off):  # else the whole table is written
            self._journal.record(S_MAP, l2off + 8 * i, value.to_bytes(8, "big"), tag=l2off)

    async def _alloc_write(
        self, pos: int, lim: int, kind: int, host: int, view: memoryview, voff: int
    ) -> int:
        """Write [pos, lim) into new clusters; returns the bytes written.

        0 means another request is allocating the first cluster: look again once it is
        done. The rest of a partly written cluster keeps what it read as before.
        """
        cb, cs = self._cb, self._cs
        c0 = pos >> cb
        waiting = self._pending.get(c0)
        if waiting is not None:
            await waiting
            return 0
        c_end = ((lim - 1) >> cb) + 1
        k = 1
        while c0 + k < c_end and c0 + k not in self._pending:
            k += 1
        lim = min(lim, (c0 + k) << cb)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for c in range(c0, c0 + k):
            self._pending[c] = fut
        try:
            l1i = pos >> self._shift
            await self._writable_l2(l1i)
            old_end = self._end
            new = self._reserve_run(k)
            reused = new < old_end  # freed clusters: not a hole, so written whole
            await self._incref(new >> cb, k)
            head = pos - (c0 << cb)
            tail = ((c0 + k) << cb) - lim
            chunk = view[pos - voff : lim - voff]
            # A fresh cluster lies past the file's old end: it is a hole and reads as
            # zeros already, so zeros around the data need no writing (qemu zeroes the
            # cluster with fallocate instead of writing it, for the same reason).
            zeros = kind == ZERO or (kind == UNALLOC and self.backing is None)
            if (zeros and not reused) or (not head and not tail):
                await self.child.pwrite(new + head, chunk)
            else:
                buf = bytearray(k * cs)
                old_host = host - head if kind == SHARED else host
                if head:
                    buf[:head] = await self._old_content(c0 << cb, head, kind, old_host)
                buf[head : head + len(chunk)] = chunk
                if tail:
                    t_host = old_host + (lim - (c0 << cb)) if kind == SHARED else host
                    buf[k * cs - tail :] = await self._old_content(lim, tail, kind, t_host)
                await self.child.pwrite(new, memoryview(buf))
            # The table may have been copied (a snapshot's) by another request meanwhile.
            l2off, t = await self._writable_l2(l1i)
            i0 = c0 & self._l2_mask
            for j in range(k):
                self._forget(t[i0 + j])
                self._set_l2(l2off, t, i0 + j, (new + j * cs) | OFLAG_COPIED)
        finally:
            for c in range(c0, c0 + k):
                del self._pending[c]
            fut.set_result(None)
        return lim - pos

    def _forget(self, entry: int) -> None:
        """The entry is being replaced: its cluster(s) lose a reference."""
        if not entry or entry in (_BAD, _ON_META):
            return  # never a reference to drop: nothing may be freed by it
        if entry & OFLAG_COMPRESSED:
            off, n = self._compressed_location(entry)
            first = off >> self._cb
            self._decrefs.append((first, ((off + n - 1) >> self._cb) - first + 1))
        elif entry & OFFSET_MASK:
            self._decrefs.append(((entry & OFFSET_MASK) >> self._cb, 1))

    async def preallocate(self, mode: str = "metadata", start: int = 0) -> None:
        """Give every unallocated guest cluster from ``start`` (cluster-aligned) on a
        data cluster.

        ``metadata``: the file grows sparse and the clusters read as zeros until
        written; ``falloc``: their space is reserved with fallocate; ``full``: zeros are
        written to them too (qemu-img's preallocation modes).
        """
        cb, cs = self._cb, self._cs
        clusters = (self._size + cs - 1) >> cb
        per_table = self._l2_mask + 1
        if mode != "metadata":
            # Space grown ahead as a hole would not be reserved by fallocate later.
            self._grow_ahead = 0
        first = start >> cb
        for l1i in range(first // per_table, (clusters + per_table - 1) // per_table):
            l2off, t = await self._writable_l2(l1i)
            n = min(per_table, clusters - l1i * per_table)
            lo = max(0, first - l1i * per_table)
            free = [i for i in range(lo, n) if not t[i]]
            if not free:
                continue
            host = self._reserve(len(free) * cs, allocate=mode != "metadata")
            await self._incref(host >> cb, len(free))
            if mode == "full":
                zeros = bytes(min(len(free) * cs, _ZERO_CHUNK))
                for off in range(host, host + len(free) * cs, len(zeros)):
                    await self.child.pwrite(off, zeros[: host + len(free) * cs - off])
            # The table may have left the cache while the refcounts loaded: fetch again.
            l2off, t = await self._writable_l2(l1i)
            for j, i in enumerate(free):
                self._set_l2(l2off, t, i, (host + j * cs) | OFLAG_COPIED)
        await self.flush()

    async def write_compressed(self, offset: int, data: bytes | memoryview) -> bool:
        """Write one whole guest cluster compressed, if it is unallocated and shrinks.

        Returns False after writing it the normal way instead (qemu does the same when
        the data does not shrink below ``cluster_size - 1``). Compressed clusters are
        packed one after the other into host clusters, each holding one reference per
        compressed cluster in it (qemu's ``qcow2_alloc_bytes``); one at a time, so two
        writers never share a host cluster's first reference.
        """
        cs, cb = self._cs, self._cb
        assert offset % cs == 0 and len(data) <= cs
        if self._tracked:
            self._bitmaps.mark(offset, len(data))
        z = zlib.compressobj(6, zlib.DEFLATED, -12)
        packed = z.compress(bytes(data).ljust(cs, b"\0")) + z.flush()
        async with self._compress_lock:
            try:
                kind, _host, _n = self._lookup(offset, offset + len(data))
            except Miss as miss:
                await self._l2.load(miss.offset)
                kind, _host, _n = self._lookup(offset, offset + len(data))
            if len(packed) >= cs - 1 or kind != UNALLOC or (offset >> cb) in self._pending:
                await self.pwrite(offset, data)
                return False
            used = self._zpos & (cs - 1)
            fresh = not used or cs - used < len(packed)
            if fresh:
                self._zpos = self._reserve_run(1)
            off = self._zpos
            self._zpos += len(packed)
            if fresh:
                await self._incref(off >> cb, 1)
            else:
                await self._addref(off >> cb)
            await self.child.pwrite(off, packed)
            nsect = ((off + len(packed) - 1) >> 9) - (off >> 9)
            l2off, t = await self._writable_l2(offset >> self._shift)
            i = (offset >> cb) & self._l2_mask
            self._forget(t[i])
            self._set_l2(l2off, t, i, OFLAG_COMPRESSED | (nsect << self._c_shift) | off)
        return True

    async def _addref(self, c: int) -> None:
        """One more reference to cluster ``c``, which already has some."""
        boff, block = await self._refblock(c >> self._rb_bits)
        i = c & self._rb_mask
        if not block[i] or block[i] >= self._rc_max:
            raise _eio(f"cluster 0x{c << self._cb:x} has refcount {block[i]}: cannot add one")
        block[i] += 1
        if not self._journal.has(S_NEW, boff):
            self._journal.record(S_NEW, boff, partial(encode_block, block, self._order), tag=boff)

    # Refcounts.

    async def _refblock(self, ri: int) -> tuple[int, array[int]]:
        """The refcount block for reftable index ``ri``, created if absent."""
        if ri >= len(self.reftable):
            await self._grow_reftable(ri)
        boff = self.reftable[ri] & OFFSET_MASK
        if boff:
            return boff, await self._rb.load(boff)
        boff = self._reserve(self._cs)
        block = decode_block(bytes(self._cs), self._order)
        self._rb.put(boff, block)
        self._touched.add(boff)
        self.reftable[ri] = boff
        self._journal.record(S_NEW, boff, partial(encode_block, block, self._order), tag=boff)
        self._journal.record(S_REFTABLE, self._rt_off + 8 * ri, boff.to_bytes(8, "big"))
        # The new block counts itself (or is counted by the block its cluster falls in).
        await self._incref(boff >> self._cb, 1)
        return boff, block

    async def _incref(self, first: int, count: int) -> None:
        """Refcount 0 -> 1 for ``count`` fresh clusters from index ``first``."""
        c, end = first, first + count
        while c < end:
            ri = c >> self._rb_bits
            boff, block = await self._refblock(ri)
            stop = min(end, (ri + 1) << self._rb_bits)  # one refcount block at a time
            i0 = c & self._rb_mask
            for i in range(i0, i0 + stop - c):
                if block[i]:
                    at = (c + i - i0) << self._cb
                    raise _eio(f"cluster 0x{at:x} past the end has refcount {block[i]}")
                block[i] = 1
            if not self._journal.has(S_NEW, boff):
                self._journal.record(
                    S_NEW, boff, partial(encode_block, block, self._order), tag=boff
                )
            c = stop

    async def _grow_reftable(self, ri: int) -> None:
        """Move the refcount table to a bigger place at the end of the file.

        The new table is written whole in stage 0 and the header switches to it in
        stage 1; the old table's clusters are freed after that.
        """
        old_off, old_clusters = self._rt_off, self._rt_clusters
        entries = max(ri + 1, 2 * len(self.reftable))
        clusters = (entries * 8 + self._cs - 1) >> self._cb
        new_off = self._reserve(clusters * self._cs)
        table = array("Q", self.reftable)
        table.extend([0] * ((clusters << self._cb) // 8 - len(table)))
        self.reftable = table
        self._rt_off, self._rt_clusters = new_off, clusters
        self._journal.record(S_NEW, new_off, lambda: to_be_bytes(self.reftable))
        self._journal.record(
            S_REFTABLE,
            REFTABLE_FIELDS_OFFSET,
            lambda: struct.pack(">QI", self._rt_off, self._rt_clusters),
        )
        await self._incref(new_off >> self._cb, clusters)
        self._decrefs.append((old_off >> self._cb, old_clusters))

    async def _apply_decrefs(self, decrefs: list[tuple[int, int]]) -> list[int]:
        """Decrement in memory; returns the clusters whose refcount reached 0."""
        freed: list[int] = []
        for first, count in decrefs:
            for c in range(first, first + count):
                ri = c >> self._rb_bits
                boff = self.reftable[ri] & OFFSET_MASK if ri < len(self.reftable) else 0
                if not boff:
                    log.error("%s: cluster 0x%x has no refcount block", self.path, c << self._cb)
                    continue
                block = await self._rb.load(boff)
                i = c & self._rb_mask
                if not block[i]:
                    log.error("%s: cluster 0x%x refcount underflow", self.path, c << self._cb)
                    continue
                block[i] -= 1
                if not block[i]:
                    freed.append(c)
                if not self._journal.has(S_NEW, boff):
                    self._journal.record(
                        S_NEW, boff, partial(encode_block, block, self._order), tag=boff
                    )
        return freed

    # Zeroing and discard.

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        if fast and not self.can_fast_zero():
            raise OSError(errno.ENOTSUP, "zeroing needs writes on a v2 image with a backing file")
        await self._zero(offset, length, discard=False, keep=not may_trim)
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._zero(offset, length, discard=True)
        if fua:
            await self.flush()

    async def _zero(self, offset: int, length: int, *, discard: bool, keep: bool = False) -> None:
        """Make [offset, offset + length) read as zeros, or (``discard``) free what it can.

        Whole clusters become what qemu leaves (``_zero_clusters``); a discard on an
        overlay never exposes the backing file's data. A partial cluster is written with
        zeros, unless it reads as zeros already or, unallocated, can become a zero
        cluster whole (``_widen_zeroing``); a discard leaves it alone. ``keep`` (NBD's
        NO_HOLE: "the area MUST be fully provisioned"): a v3 image's data clusters stay
        its own, flagged zero (qemu's QCOW2_CLUSTER_ZERO_ALLOC), not freed.
        """
        if self._tracked:
            self._bitmaps.mark(offset, length)
        end = offset + length
        cs = self._cs
        pos = offset
        while pos < end:
            try:
                kind, host, n = self._lookup(pos, end)
            except Miss as miss:
                await self._l2.load(miss.offset)
                continue
            a = min(pos + n, (pos + cs - 1) // cs * cs)
            b = max(a, (pos + n) // cs * cs)
            reads_zero = kind == ZERO or (kind == UNALLOC and self.backing is None)
            for s, e in ((pos, a), (b, pos + n)) if not discard else ():
                if s >= e or (kind == UNALLOC and await self._widen_zeroing(s, e)):
                    continue
                if not reads_zero:
                    await self._write_zeros(s, e - s)
            if a < b:
                if keep and kind == DATA and self._v3:
                    await self._flag_zero(a, b)
                else:
                    await self._zero_clusters(a, b, kind, discard, held=bool(host))
            pos += n

    async def _widen_zeroing(self, s: int, e: int) -> bool:
        """Zero [s, e), part of one unallocated cluster, by making the whole cluster a
        zero cluster (v3), if the rest of it reads as zeros: always without a backing
        file, else if the backing file says so (qemu's qcow2_co_pwrite_zeroes). False:
        it must be written, or (no backing file) may be left as it is."""
        backing, cs = self.backing, self._cs
        if not self._v3:
            return False
        c0 = s // cs * cs
        if backing is not None:
            status: list[Extent] = []
            for lo, hi in ((c0, s), (e, min(c0 + cs, self._size))):
                if lo < hi:
                    await backing_status(backing, status, lo, hi - lo)
            if any(not x.flags & ExtentFlags.ZERO for x in status):
                return False
        l2off, t, slots = await self._whole_clusters(c0, c0 + cs)
        i = slots[0]
        if t[i]:  # written meanwhile: no longer ours to flag
            return False
        self._set_l2(l2off, t, i, OFLAG_ZERO)
        return True

    async def _write_zeros(self, pos: int, n: int) -> None:
        zeros = memoryview(bytes(min(n, _ZERO_CHUNK)))
        while n:
            m = min(n, len(zeros))
            await self.pwrite(pos, zeros[:m])
            pos += m
            n -= m

    async def _zero_clusters(self, a: int, b: int, kind: int, discard: bool, *, held: bool) -> None:
        """Whole clusters [a, b) of one run (``held``: a ZERO run's cluster still holds
        a host cluster) become zero clusters or unallocated, as qemu leaves them
        (zero_in_l2_slice, discard_in_l2_slice): on v3, a zeroing flags every cluster
        zero, and so does a discard, but for clusters that read as zeros already."""
        if not self._v3:
            # v2 has no zero clusters: over a backing file, zeros must be written.
            if self.backing is not None:
                if not discard:
                    await self._write_zeros(a, b - a)
            elif kind != UNALLOC:
                await self._set_clusters(a, b, 0)
            return
        if not discard:
            if kind != ZERO:  # (a zero cluster reads as zeros already)
                await self._set_clusters(a, b, OFLAG_ZERO)
            return
        # A discard skips zero clusters, and unallocated ones with nothing to show.
        if (kind == ZERO and not held) or (kind == UNALLOC and self.backing is None):
            return
        await self._set_clusters(a, b, OFLAG_ZERO)

    async def _flag_zero(self, a: int, b: int) -> None:
        """Whole clusters [a, b), in one L2 table, read as zeros and keep their host
        clusters and references; one that stopped being plain data meanwhile (another
        request changed it) is zeroed the usual way."""
        l2off, t, slots = await self._whole_clusters(a, b)
        for i in slots:
            e = t[i]
            if e & OFFSET_MASK and e & OFLAG_COPIED and not e & _NOT_PLAIN:
                self._set_l2(l2off, t, i, e | OFLAG_ZERO)
            else:
                self._forget(e)
                self._set_l2(l2off, t, i, OFLAG_ZERO)

    async def _set_clusters(self, a: int, b: int, value: int) -> None:
        """Give whole clusters [a, b), in one L2 table, the entry ``value`` (zero or
        unallocated); what they held loses a reference."""
        l2off, t, slots = await self._whole_clusters(a, b)
        for i in slots:
            self._forget(t[i])
            self._set_l2(l2off, t, i, value)

    async def _whole_clusters(self, a: int, b: int) -> tuple[int, array[int], range]:
        """The writable L2 table of whole clusters [a, b) and their slots in it, once
        no allocating write of theirs is in flight."""
        cb = self._cb
        for c in range(a >> cb, b >> cb):
            waiting = self._pending.get(c)
            if waiting is not None:
                await waiting
        l2off, t = await self._writable_l2(a >> self._shift)
        i0 = (a >> cb) & self._l2_mask
        return l2off, t, range(i0, i0 + ((b - a) >> cb))

    async def make_empty(self) -> None:
        """Unmap every guest cluster, so the backing file shows through everywhere: what
        qemu-img commit does to the overlay (qcow2_make_empty, by discard). The header,
        its options and internal snapshots stay; so do the L2 tables, and a cluster a
        snapshot shares only loses this reference. Durable once flushed."""
        cs = self._cs
        if self._tracked:
            self._bitmaps.mark(0, self._size)
        pos = 0
        async for kind, _host, n in runs(self._lookup, self._load, 0, -(-self._size // cs) * cs):
            if kind != UNALLOC:
                await self._set_clusters(pos, pos + n, 0)
            pos += n

    # Block status.

    async def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        pos = offset
        async for kind, host, n in runs(self._lookup, self._load, offset, offset + length):
            if kind == UNALLOC:
                if self.backing is None:
                    add_extent(out, pos, n, HOLE_ZERO)
                else:
                    await backing_status(self.backing, out, pos, n)
            elif kind == ZERO:
                add_extent(out, pos, n, HOLE_ZERO)
            elif (
                kind in (DATA, SHARED)
                and self.child.can_extents()
                and await self.metadata_preallocated()
            ):
                # Only then does qemu ask the file whether a data cluster reads as
                # zeros (BDRV_BLOCK_RECURSE); otherwise data is data, as qemu-nbd says.
                await host_status(self.child, out, pos, host, n)
            else:
                add_extent(out, pos, n, ExtentFlags.DATA)
            pos += n
            if len(out) >= MAX_EXTENTS:
                break
        return out

    # Flush and close.

    async def flush(self) -> None:
        """Make every completed write durable, metadata and decrements included."""
        async with self._flush_lock:
            decrefs, self._decrefs = self._decrefs, []
            try:
                if not await self._journal.flush():
                    await self.child.flush()
            except BaseException:
                self._decrefs[:0] = decrefs
                raise
            if not decrefs:
                return
            # The pointers are gone on disk: now the refcounts may drop.
            freed = await self._apply_decrefs(decrefs)
            await self._journal.flush()
            for c in freed:
                try:
                    await self.child.trim(c << self._cb, self._cs)
                except OSError as e:
                    if e.errno != errno.ENOTSUP:
                        raise
            # Their refcount 0 is durable now (and so is the end of every L2 entry that
            # named them): from here on they may be handed out again.
            self._reusable.extend(freed)
            self._reusable.sort()

    async def finish(self) -> None:
        await self._bitmaps.store()
        await self.flush()
        self._trim_ahead()

    async def new_cluster(self) -> int:
        """A cluster for metadata outside the tables (a bitmap's), its refcount 1 once
        the next flush completes: nothing may name it before that."""
        host = self._reserve(self._cs)
        await self._incref(host >> self._cb, 1)
        return host

    def free_clusters(self, clusters: list[int]) -> None:
        """Clusters (indices) nothing on disk names any more: freed by the next flush."""
        self._decrefs.extend((c, 1) for c in clusters)

    # Persistent dirty bitmaps, for the qemu:dirty-bitmap:NAME block status context.

    def bitmaps(self) -> list[str]:
        return self._bitmaps.names()

    async def bitmap_extents(self, name: str, offset: int, length: int) -> list[Extent]:
        return await self._bitmaps.extents(name, offset, length)

    def _trim_ahead(self) -> None:
        """A clean close gives back the space grown ahead (``GROW_AHEAD``), so the file
        ends at its last cluster as qemu leaves it. After a crash it stays: a hole past
        every refcount, which qemu-img check does not count."""
        child = self.child
        if self._grown > self._end and isinstance(child, RawDriver) and not child.is_block:
            os.ftruncate(child.fd, self._end)
            self._grown = self._end

    # Facts for `tapnbd map`.

    async def metadata_preallocated(self) -> bool:
        """qemu's guess that clusters were allocated without their space
        (qcow2_detect_metadata_preallocation): at least max(10/9 of, 2 more than) the
        clusters the file really holds have a refcount. Only then does qemu ask the
        file whether a data cluster reads as zeros (BDRV_BLOCK_RECURSE), and so does
        ``map``. A file whose real allocation is unknown (not a regular file) is not."""
        if self._preallocated is not None:
            return self._preallocated
        self._preallocated = False
        child = self.child
        if not isinstance(child, RawDriver) or child.is_block:
            return False
        cs, per = self._cs, self._rb_mask + 1
        real = os.fstat(child.fd).st_blocks * 512 // cs
        threshold = max(real * 10 // 9, real + 2)
        end = (child.size() + cs - 1) // cs
        count = 0
        # Block by block, counted in C (a hostile sparse file may be huge).
        for ri, entry in enumerate(self.reftable):
            if ri * per >= end or count >= threshold:
                break
            boff = entry & OFFSET_MASK
            if boff:
                block = await self._rb.load(boff)
                used = block[: min(per, end - ri * per)]
                count += len(used) - used.count(0)
        self._preallocated = count >= threshold
        return self._preallocated

    # Facts for `tapnbd info`.

    async def read_encryption(self) -> None:
        """Read what info shows of the encryption: the LUKS header, as hostile input."""
        from formats.qcow2.luks import SIZE, luks_info

        if self.meta.header.crypt_method == 1:
            self.encrypt = {"format": "aes"}
        elif self.meta.crypto_area is not None:
            off, n = self.meta.crypto_area
            self.encrypt = luks_info(bytes(await self.child.pread(off, min(n, SIZE))), n)

    def describe(self) -> dict[str, object]:
        """Keys as ``qemu-img info --output=json`` spells them for qcow2."""
        m, h = self.meta, self.meta.header
        data: dict[str, object] = {"compat": "1.1" if self._v3 else "0.10"}
        if self._v3:
            data["compression-type"] = "zlib"
            data["lazy-refcounts"] = bool(h.compatible_features & 1)
            if m.bitmaps:
                data["bitmaps"] = [
                    {"flags": b.flag_names(), "name": b.name, "granularity": b.granularity}
                    for b in m.bitmaps
                ]
        data["refcount-bits"] = 1 << h.refcount_order
        if self.encrypt is not None:
            data["encrypt"] = self.encrypt
        data["corrupt"] = bool(h.incompatible_features & Incompatible.CORRUPT)
        if self._v3:
            data["extended-l2"] = False
        info: dict[str, object] = {
            "format": self.name,
            "virtual-size": self._size,
            "cluster-size": self._cs,
            "dirty-flag": bool(h.incompatible_features & Incompatible.DIRTY),
            "format-specific": {"type": "qcow2", "data": data},
        }
        if h.crypt_method:
            info["encrypted"] = True
        if m.snapshots:
            info["snapshots"] = [
                {
                    "id": s.id_str,
                    "name": s.name,
                    "vm-state-size": s.vm_state_size,
                    "date-sec": s.date_sec,
                    "date-nsec": s.date_nsec,
                    "vm-clock-sec": s.vm_clock_nsec // 1_000_000_000,
                    "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
                    "icount": s.icount,
                }
                for s in m.snapshots
            ]
        if m.backing_name is not None:
            info["backing-filename"] = m.backing_name
            if self.backing is not None:
                info["full-backing-filename"] = getattr(self.backing, "path", m.backing_name)
            if m.backing_format:
                info["backing-filename-format"] = m.backing_format
        return info
