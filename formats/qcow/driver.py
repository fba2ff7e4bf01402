"""QcowDriver: QCOW version 1 over a child driver, with blktap's allocation-optimised path.

Theory of operation
===================

Address translation (spec §1.2): guest offset -> L1 entry (an L2 table's file offset)
-> L2 entry (a data cluster's file offset, or a compressed cluster, or 0). The L1 table
lives in memory as an ``L1Table`` of 4 KiB pieces, only those holding entries (l1.py: a
header may claim 2 GiB of table); L2 tables come and go through an
``engine.table_cache.TableCache``. Every walk over a guest range (read, write, zero,
block status) goes through ``engine.runs`` over ``_lookup``, which answers from memory
or asks for a table to be loaded.

Allocation-optimised images (blktap's Xen extension, spec §2.4): the first write to an
L1 slot allocates a whole *extent*, the L2 table followed directly by all its data
clusters, and fills the table with their real offsets. Afterwards the *fast path*
computes any data offset from the L1 entry alone (the L1 entry + ``l2_size * 8`` + the
offset within the slot) and never reads L2; ``_bases`` keeps that data base per L1 slot
in a plain list (0: unallocated), so a request costs one list index. The fast path is
trusted only when the extension's MD5 of the L1 table matches, or, after a crash left it
stale (or the table is too large to checksum), when every L2 table has been read and
found to hold exactly the extent layout. On a clean close the checksum is rewritten.

Requests: reads and writes of allocated clusters go straight to the child with no lock
and no suspension of their own; several may be in flight on one cluster. Allocation is
synchronous bookkeeping (reserve file space, note the new offsets) plus I/O: a guest
cluster being allocated is recorded in ``_pending`` so a second writer waits for the
first instead of allocating it again.

Crash safety, by flush epochs (``engine.journal``, the write-back metadata scheme of
qcow2's cache):

1. A data cluster is written before its L2 entry changes in memory; a new L2 table is
   created in memory only.
2. ``flush()`` takes the dirty metadata as one snapshot, writes the new L2 tables (not
   yet referenced by anything on disk), syncs (data and tables are durable: the
   journal's ``data_first``), then writes the changed L2 entries and L1 entries and
   syncs again.

So on disk an L2 entry never points at data that is not durable, and an L1 entry never
points at an L2 table that is not durable; every write acknowledged before a completed
FLUSH survives a crash, metadata included. A FUA write that needs metadata flushes.
Space only ever grows at the end of the file, so a crash at worst leaks clusters.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import logging
import os
from array import array
from functools import partial
from typing import TYPE_CHECKING, Any

from formats.engine.backing import HOLE_ZERO, backing_status, read_backing
from formats.engine.compressed import Inflater
from formats.engine.image import Growable, ImageDriver, cache_tables
from formats.engine.journal import Journal
from formats.engine.runs import (
    COMPRESSED,
    DATA,
    UNALLOC,
    Miss,
    add_extent,
    host_status,
    run_at,
    runs,
)
from formats.engine.table_cache import TableCache
from formats.qcow.geometry import compressed_location, round_up
from formats.qcow.l1 import PIECE_BITS, PIECE_MASK, be_array, tables_with_data, to_be_bytes
from formats.qcow.layout import CKSUM_OFFSET, EXT_OFFSET, QCOW_OFLAG_COMPRESSED, XenFlags
from formats.qcow.meta import CKSUM_MAX_BYTES, QcowMeta
from formats.raw import RawDriver
from tapnbd import buffers
from tapnbd.driver import BlockSize, Driver, Extent, ExtentFlags

if TYPE_CHECKING:
    from collections.abc import Coroutine

__all__ = ["COMPRESSED", "DATA", "UNALLOC", "Growable", "QcowDriver"]

log = logging.getLogger(__name__)

#: L2 entries that failed validation when their table was loaded are replaced in memory
#: by this (a non-zero, unaligned offset no real entry has); using one fails with EIO.
_BAD = 1
#: Past this many tables with unwritten changes, write them back in the background.
WRITEBACK_TABLES = 1024
#: Block status answers at most this many extents per call; the client asks again.
MAX_EXTENTS = 1024
#: The fast path's flat list of data bases is kept for L1 tables up to this many
#: entries (8 MiB of list, 2 TiB at tapdisk's geometry); a larger table (a header may
#: claim 2**28 entries) takes the general lookup, which reads the sparse L1Table.
FLAT_L1_MAX = 1 << 20
#: Journal stages: new L2 tables, then the L2 and L1 entries that name them and data.
S_NEW, S_MAP = 0, 1
_ZERO_CHUNK = 1 << 20
_ZEROES = bytes(_ZERO_CHUNK)


def _eio(message: str) -> OSError:
    return OSError(errno.EIO, message)


class QcowDriver(ImageDriver[QcowMeta]):
    """A QCOW v1 image read and written through ``child``; ``backing`` fills holes."""

    name = "qcow"

    def __init__(
        self,
        child: Driver,
        backing: Driver | None,
        meta: QcowMeta,
        *,
        read_only: bool = False,
        path: str = "",
    ) -> None:
        g = meta.geometry
        super().__init__(child, backing, meta, g.size, read_only=read_only, path=path)
        self.g = g
        self._cb = g.cluster_bits
        self._cs = g.cluster_size
        self._shift = g.shift
        self._cov_mask = (1 << g.shift) - 1
        self._l2_mask = g.l2_size - 1
        self._data_off = g.l2_bytes
        self.l1 = meta.l1
        self._l1_pieces = meta.l1.pieces
        self._l1_off = meta.header.l1_table_offset
        #: Fast path on: data offsets come from L1 alone (see the module docstring).
        self._fast = False
        #: With the fast path on: each L1 slot's data base, 0 where unallocated.
        self._bases: list[int] | None = None
        #: The child when it is exactly the raw driver: the fast path reads its file.
        self._raw = child if type(child) is RawDriver else None
        #: Growth by sparse extension (SPARSE_FILE, the default) or by fallocate.
        self._sparse = meta.ext is None or not meta.ext_applies or meta.ext.sparse
        #: Next free cluster-aligned file offset: allocation only ever appends.
        self._end = round_up(max(meta.file_size, meta.data_start), self._cs)
        #: The end at open. A table as read from disk cannot rightly point past it unless
        #: this driver has changed the table since (``_touched``): the file grows under
        #: a corrupt pointer, which must not come to name a newly allocated cluster.
        self._open_end = self._end
        self._touched: set[int] = set()
        #: Entries found bad on a table's first load, marked again if it is read again.
        self._bad: dict[int, list[int]] = {}
        self._journal = Journal(2, self._meta_write, child.flush, data_first=True)
        self._l2: TableCache[array[int]] = TableCache(
            self._read_l2, cache_tables(g.l2_bytes), self._journal.busy
        )
        self._l2_tables = self._l2.tables
        #: L2 table offsets, sorted (an array: 8 bytes each).
        self._l2_sorted = meta.l2_tables
        self._writeback: asyncio.Task[None] | None = None
        #: Guest clusters whose allocation is in flight.
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._inflater = Inflater(child, self._cs)
        # Allocation-optimised images hold whole extents of clusters never written:
        # only there is the file asked which read as zeros. qemu's qcow driver never
        # asks (a normal image's partly written cluster is data, as qemu-nbd says).
        self._child_extents = child.can_extents() and meta.optimised

    # Open-time work: old-image conversion and the choice of the fast path.

    async def prepare(self) -> None:
        """Convert an old tapdisk image and decide whether the fast path may be used."""
        m = self.meta
        if m.ext_applies and m.ext is not None and not m.ext.l1_big_endian and not self.read_only:
            await self._convert_old_image()
        if not m.optimised or self.backing is not None:
            return
        if m.cksum_ok and self._extents_fit():
            self._fast_on()
        elif await self._verify_extents():
            log.info(
                "%s: L1 checksum %s; every extent checked, fast path on",
                self.path,
                "mismatch (not closed cleanly?)" if m.cksum_ok is False else "not checked",
            )
            self._fast_on()
        else:
            # "If it differs, the extension is ignored" (spec §2.2): the safe path.
            why = (
                "extents overlap or run past the end of the file"
                if m.cksum_ok
                else "L1 checksum mismatch"
                if m.cksum_ok is False
                else "L1 table too large to checksum"
            )
            log.warning("%s: %s; using the safe path", self.path, why)

    def _fast_on(self) -> None:
        """Turn the fast path on, with the flat list of data bases if L1 is not huge."""
        self._fast = True
        if self.g.l1_size <= FLAT_L1_MAX:
            bases = [0] * self.g.l1_size
            for i, e in self.l1.items():
                bases[i] = e + self._data_off
            self._bases = bases

    async def _convert_old_image(self) -> None:
        """Rewrite an old tapdisk image's L1 table big-endian and set the flag (spec §2.6).

        The table goes first and is synced before the flag changes; a crash in between
        leaves a big-endian table with the flag clear, which read_meta recognises.
        """
        m = self.meta
        assert m.ext is not None
        if m.l1_native:
            # Only the pieces holding entries: a piece of zeros reads the same either way.
            for off, data in self.l1.disk_pieces():
                await self.child.pwrite(m.header.l1_table_offset + off, data)
            await self.child.flush()
        # A checksum that matched the old bytes is carried over to the new ones.
        cksum = self.l1.cksum() if m.cksum_ok else m.ext.cksum
        ext = type(m.ext)(
            cksum, m.ext.min_cluster_alloc, m.ext.flags | XenFlags.EXTHDR_L1_BIG_ENDIAN
        )
        await self.child.pwrite(EXT_OFFSET, ext.build())
        await self.child.flush()
        if m.l1_native:
            log.info("%s: converted an old tapdisk image's L1 table to big-endian", self.path)
        m.ext, m.l1_native = ext, False

    def _extents_fit(self) -> bool:
        """Every allocated extent lies inside the file and apart from the others."""
        g, m = self.g, self.meta
        span = g.l2_bytes + (g.l2_size << g.cluster_bits)
        prev_end = m.data_start
        for e in self._l2_sorted:
            if e < prev_end or e + span > m.file_size:
                return False
            prev_end = e + span
        return True

    async def _verify_extents(self) -> bool:
        """Read every L2 table: does each hold exactly its extent's offsets?"""
        if not self._extents_fit():
            return False
        g = self.g
        for e in self._l2_sorted:
            t = be_array(await self.child.pread(e, g.l2_bytes))
            first = e + g.l2_bytes
            if t != array("Q", range(first, first + (g.l2_size << g.cluster_bits), g.cluster_size)):
                return False
        return True

    # Capabilities (the others come with ImageDriver).

    def can_trim(self) -> bool:
        return not self.read_only

    def can_fast_zero(self) -> bool:
        # With a backing file, zeroing an unallocated cluster means writing one.
        return not self.read_only and self.backing is None

    def block_size(self) -> BlockSize:
        return BlockSize(minimum=1, preferred=max(4096, self._cs))

    @property
    def fast_path(self) -> bool:
        return self._fast

    # Lookup.

    def _lookup(self, pos: int, end: int) -> tuple[int, int, int]:
        """(kind, host, length) of the run at ``pos``, from memory; raises Miss.

        A run never crosses an L1 slot. DATA runs are host-contiguous.
        """
        shift = self._shift
        l1i = pos >> shift
        lim = min(end, (l1i + 1) << shift)
        p = self._l1_pieces.get(l1i >> PIECE_BITS)  # self.l1[l1i], inlined (hot)
        l2off = p[l1i & PIECE_MASK] if p is not None else 0
        if not l2off:
            return UNALLOC, 0, lim - pos
        if self._fast:
            return DATA, l2off + self._data_off + (pos & self._cov_mask), lim - pos
        t = self._l2_tables.get(l2off)
        if t is None:
            raise Miss(l2off)
        cs = self._cs
        i = (pos >> self._cb) & self._l2_mask
        e = t[i]
        n = cs - (pos & (cs - 1))
        if not e:
            i += 1
            while pos + n < lim and not t[i]:
                n += cs
                i += 1
            return UNALLOC, 0, min(n, lim - pos)
        if e & QCOW_OFLAG_COMPRESSED:
            return COMPRESSED, e, min(n, lim - pos)
        if e == _BAD:
            raise _eio(
                f"L2 table at 0x{l2off:x}, entry {i}: cluster offset is outside the image "
                "data area (corrupt image)"
            )
        host = e + (pos & (cs - 1))
        nxt = e + cs
        i += 1
        while pos + n < lim and t[i] == nxt:
            n += cs
            nxt += cs
            i += 1
        return DATA, host, min(n, lim - pos)

    def _load(self, l2off: int) -> Coroutine[Any, Any, array[int]]:
        return self._l2.load(l2off)

    async def _run_at(self, pos: int, end: int) -> tuple[int, int, int]:
        return await run_at(self._lookup, self._load, pos, end)

    async def _read_l2(self, l2off: int) -> array[int]:
        """Read the L2 table at ``l2off`` for the cache, bad entries marked."""
        t = be_array(await self.child.pread(l2off, self.g.l2_bytes))
        self._check_l2(t, l2off)
        return t

    def _check_l2(self, t: array[int], l2off: int) -> None:
        """Mark entries pointing outside the data area or into an L2 table as _BAD."""
        g = self.g
        hi = self._end if l2off in self._touched else self._open_end
        lo, cs = self.meta.data_start, self._cs
        tables, l2_bytes = self._l2_sorted, g.l2_bytes
        known = self._bad.get(l2off)
        if known:
            for i in known:
                t[i] = _BAD
        bad: list[int] = []
        for i, e in enumerate(t):
            if not e:
                continue
            if e & QCOW_OFLAG_COMPRESSED:
                off, n = compressed_location(e, g)
                ok = lo <= off and n > 0 and off + n <= hi
            else:
                ok = not e & 511 and lo <= e and e + cs <= hi
                if ok:
                    j = bisect.bisect_right(tables, e + cs - 1) - 1
                    ok = j < 0 or tables[j] + l2_bytes <= e
            if not ok:
                t[i] = _BAD
                bad.append(i)
        if bad and not known:
            self._bad[l2off] = bad
            log.warning(
                "%s: L2 table at 0x%x has %d entries pointing outside the image data area; "
                "requests touching them fail with EIO",
                self.path,
                l2off,
                len(bad),
            )

    async def _meta_write(self, off: int, data: bytes) -> None:
        await self.child.pwrite(off, data)

    def _set_l2(self, l2off: int, t: array[int], i: int, value: int) -> None:
        """Change entry ``i`` of the L2 table at ``l2off``, owed to the next flush."""
        t[i] = value
        if not self._journal.has(S_NEW, l2off):  # else the whole table is written
            self._journal.record(S_MAP, l2off + 8 * i, value.to_bytes(8, "big"), tag=l2off)

    # Synchronous fast paths (Driver.pread_nowait): a cluster whose address is known in
    # memory is read or written by the child at once, if the child can.

    def _host_now(self, offset: int, length: int) -> int:
        """The host offset of [offset, offset + length) if it is one known data run, else -1."""
        try:
            kind, host, n = self._lookup(offset, offset + length)
        except (Miss, OSError):
            return -1
        return host if kind == DATA and n == length else -1

    def read_fd(self) -> int:
        # Only over exactly the raw driver: its file holds the data clusters as they are.
        return self._raw.fd if self._raw is not None else -1

    def read_at(self, offset: int, length: int) -> int:
        """The data run's offset in the file (the fast path's sum, or a cached L2
        entry), or -1: unallocated (backing file or zeros), compressed, or not one run."""
        bases = self._bases
        if bases is None:
            return self._host_now(offset, length)
        shift = self._shift
        l1i = offset >> shift
        base = bases[l1i]
        if not base or (offset + length - 1) >> shift != l1i:
            return -1
        return base + (offset & self._cov_mask)

    def pread_nowait(self, offset: int, length: int) -> bytes | bytearray | None:
        bases = self._bases
        if bases is None:
            host = self._host_now(offset, length)
            return None if host < 0 else self.child.pread_nowait(host, length)
        # The fast path, written out: this is most of a 4 KiB read's cost (issue 15).
        shift = self._shift
        l1i = offset >> shift
        base = bases[l1i]
        if not base or (offset + length - 1) >> shift != l1i:
            return None
        host = base + (offset & self._cov_mask)
        raw = self._raw
        if raw is None:
            return self.child.pread_nowait(host, length)
        # RawDriver.pread_nowait inlined: one preadv that the page cache answers or the
        # kernel refuses (EAGAIN); any other error is met again, and reported, by pread.
        if not raw._nowait:
            return None
        buf = buffers.take(length)
        try:
            done = os.preadv(raw.fd, [buf], host, os.RWF_NOWAIT)
        except OSError:
            done = -1
        if done == length:
            return buf
        buffers.give(buf)
        return None

    def pwrite_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        if self.read_only:
            return False
        bases = self._bases
        if bases is None:
            if self._fast and not self.l1[offset >> self._shift]:
                self._alloc_extent(offset >> self._shift)
            host = self._host_now(offset, len(data))
            return host >= 0 and self.child.pwrite_nowait(host, data)
        shift = self._shift
        l1i = offset >> shift
        if (offset + len(data) - 1) >> shift != l1i:
            return False
        base = bases[l1i]
        if not base:
            # Allocating an extent is bookkeeping plus one quick system call.
            self._alloc_extent(l1i)
            base = bases[l1i]
        return self.child.pwrite_nowait(base + (offset & self._cov_mask), data)

    @property
    def splices(self) -> bool:
        # Over exactly the raw driver with the flat list of bases: a write's place in
        # the file is a sum, as in pwrite_nowait, so the payload can go by splice too.
        return self._raw is not None and self._bases is not None and not self.read_only

    def pwrite_from_pipe(self, pipe: int, offset: int, length: int) -> bool:
        bases, raw = self._bases, self._raw
        if bases is None or raw is None or self.read_only:
            return False
        shift = self._shift
        l1i = offset >> shift
        if (offset + length - 1) >> shift != l1i:
            return False  # two extents: the usual path, which splits it
        base = bases[l1i]
        if not base:
            self._alloc_extent(l1i)  # as in pwrite_nowait
            base = bases[l1i]
        return raw.pwrite_from_pipe(pipe, base + (offset & self._cov_mask), length)

    # Reads.

    def pread(
        self, offset: int, length: int
    ) -> Coroutine[Any, Any, bytes | bytearray | memoryview]:
        # The fast path in a plain function: no coroutine frame of our own, the child's
        # read is the awaitable returned to the caller.
        bases = self._bases
        if bases is not None:
            shift = self._shift
            l1i = offset >> shift
            if (offset + length - 1) >> shift == l1i:
                base = bases[l1i]
                if base:
                    return self.child.pread(base + (offset & self._cov_mask), length)
        return self._pread(offset, length)

    async def _pread(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        end = offset + length
        kind, host, n = await self._run_at(offset, end)
        if n == length:  # one run: no copy
            if kind == DATA:
                return await self.child.pread(host, n)
            if kind == UNALLOC and self.backing is None:
                return bytes(n)
        buf = bytearray(length)
        pos = offset
        async for kind, host, n in runs(self._lookup, self._load, offset, end):
            o = pos - offset
            if kind == DATA:
                buf[o : o + n] = await self.child.pread(host, n)
            elif kind == COMPRESSED:
                data = await self._decompress(host)
                c = pos & (self._cs - 1)
                buf[o : o + n] = data[c : c + n]
            elif self.backing is not None:
                buf[o : o + n] = await read_backing(self.backing, pos, n)
            pos += n
        return buf

    async def _decompress(self, entry: int) -> bytes:
        """The cluster stored compressed by ``entry`` (spec §1.3)."""
        off, csize = compressed_location(entry, self.g)
        return await self._inflater.cluster(entry, off, csize)

    # Writes.

    def pwrite(
        self, offset: int, data: bytes | memoryview, fua: bool = False
    ) -> Coroutine[Any, Any, None]:
        bases = self._bases
        if bases is not None and not (fua and self._journal.pending):
            shift = self._shift
            l1i = offset >> shift
            if (offset + len(data) - 1) >> shift == l1i:
                base = bases[l1i]
                if base:
                    return self.child.pwrite(base + (offset & self._cov_mask), data, fua)
        return self._pwrite(offset, data, fua)

    async def _pwrite(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        view = memoryview(data)
        end = offset + len(view)
        pos = offset
        while pos < end:
            kind, host, n = await self._run_at(pos, end)
            if kind == DATA:
                o = pos - offset
                await self.child.pwrite(host, view[o : o + n], fua)
                pos += n
            elif self._fast:
                self._alloc_extent(pos >> self._shift)
            else:
                pos += await self._alloc_write(pos, pos + n, kind, host, view, offset)
        # An allocation is in the journal until a flush has made it and its data durable
        # (data_first), so a FUA write that allocated always finds it pending here.
        if fua and self._journal.pending:
            await self.flush()

    def _reserve(self, n: int) -> int:
        """Claim ``n`` bytes at the end of the file and grow the file over them."""
        if self._grow is None:
            raise OSError(errno.ENOSPC, "the image file cannot grow")
        host = self._end
        self._grow(host + n, allocate=not self._sparse)
        self._end = host + n
        return host

    def _new_table(self, l1i: int, table: array[int], l2off: int) -> None:
        """Install a new L2 table (in memory; written by the next flush)."""
        self.l1[l1i] = l2off
        self._journal.record(S_MAP, self._l1_off + 8 * l1i, l2off.to_bytes(8, "big"))
        self._journal.record(S_NEW, l2off, partial(to_be_bytes, table), tag=l2off)
        self._touched.add(l2off)
        bisect.insort(self._l2_sorted, l2off)
        if self._bases is not None:
            self._bases[l1i] = l2off + self._data_off
        if not self._fast:
            self._l2.put(l2off, table)
        self._maybe_writeback()

    def _alloc_extent(self, l1i: int) -> None:
        """Allocate an L2 table and all its data clusters at once (spec §2.4, step 5)."""
        if self.l1[l1i]:
            return
        g = self.g
        l2off = self._reserve(g.extent_bytes)
        first = l2off + g.l2_bytes
        table = array("Q", range(first, first + (g.l2_size << g.cluster_bits), g.cluster_size))
        self._new_table(l1i, table, l2off)

    async def _alloc_write(
        self, pos: int, lim: int, kind: int, entry: int, view: memoryview, voff: int
    ) -> int:
        """Allocate clusters for [pos, lim) and write there; returns the bytes written.

        0 means another request is allocating the first cluster: look again once it is
        done. Compressed clusters are rewritten into a new cluster (QEMU does the same).
        """
        cb, cs = self._cb, self._cs
        c0 = pos >> cb
        waiting = self._pending.get(c0)
        if waiting is not None:
            await waiting
            return 0
        c_end = ((lim - 1) >> cb) + 1
        k = 1
        if self._pending:
            while c0 + k < c_end and c0 + k not in self._pending:
                k += 1
        else:
            k = c_end - c0
        lim = min(lim, (c0 + k) << cb)

        l1i = pos >> self._shift
        l2off = self.l1[l1i]
        if not l2off:
            l2off = self._reserve(self.g.l2_alloc)
            self._new_table(l1i, array("Q", bytes(self.g.l2_bytes)), l2off)
        host = self._reserve(k * cs)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for c in range(c0, c0 + k):
            self._pending[c] = fut
        try:
            head = pos - (c0 << cb)
            tail = ((c0 + k) << cb) - lim
            chunk = view[pos - voff : lim - voff]
            if not head and not tail:
                await self.child.pwrite(host, chunk)
            else:
                # Copy on write: the rest of a partly written cluster keeps what it read
                # as before (the old compressed data, the backing file, or zeros).
                buf = bytearray(k * cs)
                if head:
                    buf[:head] = await self._old_content(c0 << cb, head, kind, entry)
                buf[head : head + len(chunk)] = chunk
                if tail:
                    buf[k * cs - tail :] = await self._old_content(lim, tail, kind, entry)
                await self.child.pwrite(host, memoryview(buf))
            # Evicted while we wrote (it was clean)? Then read again.
            t = self._l2.get(l2off) or await self._l2.load(l2off)
            i0 = c0 & self._l2_mask
            self._touched.add(l2off)
            for j in range(k):
                self._set_l2(l2off, t, i0 + j, host + j * cs)
            self._maybe_writeback()
        finally:
            for c in range(c0, c0 + k):
                del self._pending[c]
            fut.set_result(None)
        return lim - pos

    async def _old_content(
        self, pos: int, n: int, kind: int, entry: int
    ) -> bytes | bytearray | memoryview:
        """What [pos, pos + n) of a cluster being reallocated read as until now."""
        if kind == COMPRESSED:
            data = await self._decompress(entry)
            c = pos & (self._cs - 1)
            return data[c : c + n]
        if self.backing is not None:
            return await read_backing(self.backing, pos, n)
        return bytes(n)

    # Zeroing and discard.

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        if fast and self.backing is not None:
            raise OSError(errno.ENOTSUP, "zeroing needs writes over a backing file")
        await self._zero(offset, length, may_trim=may_trim, discard=False)
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._zero(offset, length, may_trim=True, discard=True)
        if fua:
            await self.flush()

    async def _zero(self, offset: int, length: int, *, may_trim: bool, discard: bool) -> None:
        """Make [offset, offset + length) read as zeros, or just discard it.

        Without a backing file a hole reads as zeros, so whole clusters may lose their L2
        entries ("hole punching" in qcow terms). With one, a hole would show the backing
        data: zeroes must be written. ``discard`` (TRIM) only frees what it can.
        """
        cs = self._cs
        pos = offset
        async for kind, host, n in runs(self._lookup, self._load, offset, offset + length):
            if kind == UNALLOC:
                if self.backing is not None and not discard:
                    for p in range(pos, pos + n, _ZERO_CHUNK):
                        k = min(_ZERO_CHUNK, pos + n - p)
                        await self._pwrite(p, memoryview(_ZEROES)[:k], False)
                pos += n
                continue
            whole_a, whole_b = round_up(pos, cs), (pos + n) // cs * cs
            if kind == COMPRESSED:
                if whole_a == pos and whole_b == pos + n and self.backing is None and may_trim:
                    self._clear(pos, n)
                elif not discard:
                    await self._pwrite(pos, memoryview(_ZEROES)[:n], False)
            elif (self._fast or self.backing is not None) and not discard:
                # Zero in place: the L2 entries stay (the fast path relies on them).
                await self.child.zero(host, n, may_trim=may_trim, fua=False, fast=False)
            elif self._fast or self.backing is not None:
                await self._discard(host, n)
            elif may_trim and whole_a < whole_b:
                # Drop the entries first, then free the old clusters' space.
                self._clear(whole_a, whole_b - whole_a)
                await self._discard(host + whole_a - pos, whole_b - whole_a)
                if not discard:
                    if whole_a > pos:
                        await self.child.zero(
                            host, whole_a - pos, may_trim=True, fua=False, fast=False
                        )
                    if pos + n > whole_b:
                        h = host + whole_b - pos
                        await self.child.zero(
                            h, pos + n - whole_b, may_trim=True, fua=False, fast=False
                        )
            elif not discard:
                await self.child.zero(host, n, may_trim=may_trim, fua=False, fast=False)
            pos += n

    async def _discard(self, host: int, n: int) -> None:
        """Give the space of [host, host + n) back to the file system, if it can."""
        try:
            await self.child.trim(host, n)
        except OSError as e:
            if e.errno != errno.ENOTSUP:
                raise

    def _clear(self, pos: int, n: int) -> None:
        """Set the L2 entries of the whole clusters in [pos, pos + n) to 0 (unallocated)."""
        l2off = self.l1[pos >> self._shift]
        t = self._l2_tables[l2off]  # present: the caller's lookup just used it
        i0 = (pos >> self._cb) & self._l2_mask
        self._touched.add(l2off)
        for i in range(i0, i0 + (n >> self._cb)):
            self._set_l2(l2off, t, i, 0)
        self._maybe_writeback()

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
            elif kind == DATA and self._child_extents:
                await host_status(self.child, out, pos, host, n)
            else:
                add_extent(out, pos, n, ExtentFlags.DATA)
            pos += n
            if len(out) >= MAX_EXTENTS:
                break
        return out

    # Flush and close.

    def _maybe_writeback(self) -> None:
        """Start a background flush once many tables hold unwritten changes."""
        if self._journal.tables > WRITEBACK_TABLES and self._writeback is None:
            self._writeback = asyncio.get_running_loop().create_task(self._write_back())

    async def _write_back(self) -> None:
        try:
            await self.flush()
        except Exception:
            log.exception("%s: background metadata write-back failed", self.path)
        finally:
            self._writeback = None

    async def flush(self) -> None:
        """Make every completed write durable, metadata included (two syncs at most)."""
        try:
            if not await self._journal.flush():
                await self.child.flush()
        finally:
            self._l2.trim()  # tables written are no longer pinned

    async def finish(self) -> None:
        """Flush, and rewrite the checksum if the fast path was used (spec §2.3)."""
        if self._writeback is not None:
            await asyncio.gather(self._writeback, return_exceptions=True)
        await self.flush()
        if self._fast and self.meta.l1_end - self._l1_off <= CKSUM_MAX_BYTES:
            await self._write_cksum()

    async def _write_cksum(self) -> None:
        """tdqcow_close: rewrite the checksum when the fast path was in use (spec §2.3)."""
        m = self.meta
        assert m.ext is not None
        cksum = self.l1.cksum()
        if cksum != m.ext.cksum:
            await self.child.pwrite(CKSUM_OFFSET, cksum.to_bytes(4, "big"))
            await self.child.flush()
            m.ext = type(m.ext)(cksum, m.ext.min_cluster_alloc, m.ext.flags)
        m.cksum_ok = True

    # Facts for `tapnbd info`.

    async def allocation(self) -> tuple[int, int]:
        """(allocated clusters, of which compressed), counted from the tables.

        Tables in memory are counted there; on disk, only tables the file holds data
        for are read. A table in a hole reads as zeros: nothing allocated. An image may
        name millions of tables in a sparse file, and reading each would take minutes.
        """
        if self._fast:
            return self.l1.count() * self.g.l2_size, 0
        l2_bytes = self.g.l2_bytes
        alloc = comp = 0

        def count(t: array[int]) -> None:
            nonlocal alloc, comp
            alloc += len(t) - t.count(0)
            comp += sum(1 for e in t if e & QCOW_OFLAG_COMPRESSED)

        # Tables with unwritten changes are pinned in the cache (new ones included).
        memory = dict(self._l2_tables)
        for t in memory.values():
            count(t)
        async for l2off in tables_with_data(self.child, self._l2_sorted, l2_bytes):
            if l2off not in memory:
                count(be_array(await self.child.pread(l2off, l2_bytes)))
        return alloc, comp

    def describe(self) -> dict[str, object]:
        m, g, h = self.meta, self.g, self.meta.header
        specific: dict[str, object] = {
            "l2-bits": g.l2_bits,
            "l1-size": g.l1_size,
            "l1-table-offset": h.l1_table_offset,
            "fast-path": self._fast,
        }
        if m.ext is not None:
            specific["xen-extension"] = {
                "honoured": m.ext_applies,
                "cksum": f"0x{m.ext.cksum:08x}",
                "cksum-matches": m.cksum_ok,
                "min-cluster-alloc": m.ext.min_cluster_alloc,
                "flags": int(m.ext.flags),
                "sparse": m.ext.sparse,
                "l1-big-endian": m.ext.l1_big_endian,
                "optimised": m.optimised,
            }
        info: dict[str, object] = {
            "format": self.name,
            "virtual-size": self._size,
            "cluster-size": self._cs,
            "encrypted": bool(h.crypt_method),
            "format-specific": {"type": "qcow", "data": specific},
        }
        if m.backing_name is not None:
            info["backing-filename"] = m.backing_name
            if self.backing is not None:
                info["full-backing-filename"] = getattr(self.backing, "path", m.backing_name)
        return info
