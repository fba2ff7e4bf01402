"""Persistent dirty bitmaps kept up to date while the image is open for writing, and
read for the ``qemu:dirty-bitmap:NAME`` block status context, as qemu keeps them.

On a writable open each enabled bitmap is read into memory and marked ``in_use`` on
disk before any write ("The bitmap ... is being modified and its data may be
inconsistent": qcow2.txt). Every write, zeroing and discard sets the bits of the
granules it touches. On a clean close the bits are stored back and ``in_use`` cleared;
after a crash the flag stays, and qemu (and tapnbd) treat the bitmap as meaningless,
which is exactly what it is.

Storing is crash-safe with the driver's refcount rules. While ``in_use`` is set the
table and its clusters mean nothing, so they are rewritten in place. A cluster of bits
that becomes non-zero gets a new cluster, whose refcount is durable (a flush) before the
table names it; one that becomes all zeros gets entry 0, and its cluster is freed after
the table no longer names it. Then the flag is cleared: a 4-byte write, which no sector
boundary can split.

Memory: one bitmap holds at most 512 MiB of bits (qemu's limit, checked when the
directory is read); the bitmaps kept at once hold at most ``MAX_LIVE_BYTES``, so a
hostile image listing many large bitmaps is refused instead of filling memory.

References: QEMU docs/interop/qcow2.txt "Bitmaps extension"; block/qcow2-bitmap.c.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

from formats.engine.tables import to_be_bytes
from formats.qcow2.bitmaps import (
    FLAG_IN_USE,
    TE_OFFSET,
    Bitmap,
    bitmap_bytes,
    granule_runs,
    read_bits,
    read_table,
    set_granules,
)
from tapnbd.driver import Extent, ExtentFlags
from tapnbd.errors import InvalidImageError, UnsupportedImageError

if TYPE_CHECKING:
    from formats.qcow2.driver import Qcow2Driver

#: Bits kept in memory at once, over all bitmaps of one open image.
MAX_LIVE_BYTES = 1 << 30
#: qemu:dirty-bitmap's one flag: "NBD_STATE_DIRTY (bit 0): the extent is dirty".
DIRTY = ExtentFlags(1)
CLEAN = ExtentFlags(0)
#: Block status answers at most this many extents per call; the client asks again.
MAX_EXTENTS = 1024


@dataclass(slots=True)
class LiveBitmap:
    """An enabled bitmap held in memory by a writer."""

    bitmap: Bitmap
    entry_at: int  # where its directory entry lies in the file
    table: array[int]
    bits: bytearray


def _claim(bm: Bitmap, table: array[int], cs: int, metadata: set[int], claimed: set[int]) -> None:
    """Refuse a bitmap kept up to date whose clusters of bits lie on the image's metadata
    (``metadata``, every table at open, bitmap tables included: claim_metadata already
    refused tables that share a cluster) or on another such bitmap's (``claimed``, which
    gets this one's clusters of bits)."""
    for i, e in enumerate(table):
        off = e & TE_OFFSET
        if not off:
            continue
        c = off // cs
        if c in metadata or c in claimed:
            raise InvalidImageError(
                f"bitmap {bm.name!r}: table entry {i} (0x{off:x}) points at the image's "
                "metadata or another bitmap's bits"
            )
        claimed.add(c)


class LiveBitmaps:
    """The bitmaps of one open qcow2 image."""

    def __init__(self, driver: Qcow2Driver) -> None:
        self.driver = driver
        #: Enabled bitmaps tracking writes (a writable open); the driver checks this list
        #: on its hot paths, so it is emptied in place, never replaced.
        self.tracked: list[LiveBitmap] = []
        #: Bits read from disk for block status, by name (bitmaps not tracked).
        self._read: dict[str, bytearray] = {}

    async def open(self) -> None:
        """Take charge of the enabled bitmaps: read them, then mark them in use."""
        d = self.driver
        meta, cs = d.meta, d.cluster_size
        ext = meta.bitmaps_ext
        if ext is None:
            return
        at = ext.directory_offset
        total = 0
        # Their clusters are rewritten at close: never over the image's metadata, nor
        # over each other's (nor, below, under the guest's data: the driver's set).
        claimed: set[int] = set()
        for bm in meta.bitmaps:
            entry_at, at = at, at + len(bm.entry())
            if bm.in_use or not bm.enabled:
                continue  # meaningless already, or not tracking writes
            total += bitmap_bytes(d.size(), bm.granularity_bits)
            if total > MAX_LIVE_BYTES:
                raise UnsupportedImageError(
                    f"the enabled bitmaps need more than {MAX_LIVE_BYTES} bytes of memory "
                    "to be kept up to date; disable or remove some (tapnbd bitmap)"
                )
            table = await read_table(d.child, bm, cs, meta.file_size)
            _claim(bm, table, cs, d._metadata, claimed)
            bits = await read_bits(d.child, bm, d.size(), cs, meta.file_size, table)
            self.tracked.append(LiveBitmap(bm, entry_at, table, bits))
        d._metadata |= claimed
        for t in self.tracked:
            await d.child.pwrite(t.entry_at + 12, (t.bitmap.flags | FLAG_IN_USE).to_bytes(4, "big"))
        if self.tracked:
            await d.child.flush()

    def mark(self, offset: int, length: int) -> None:
        """[offset, offset + length) changed."""
        if length <= 0:
            return
        last = offset + length - 1
        for t in self.tracked:
            g = t.bitmap.granularity_bits
            set_granules(t.bits, offset >> g, last >> g)

    async def store(self) -> None:
        """Write every tracked bitmap back, then clear its in-use flag (a clean close)."""
        if not self.tracked:
            return
        d = self.driver
        cs, cb = d.cluster_size, d.cluster_size.bit_length() - 1
        plans: list[tuple[LiveBitmap, array[int]]] = []
        dropped: list[int] = []
        for t in self.tracked:
            table = array("Q", t.table)
            for i in range(len(table)):
                chunk = t.bits[i * cs : (i + 1) * cs]
                old = table[i] & TE_OFFSET
                if chunk.count(0) == len(chunk):
                    table[i] = 0
                    if old:
                        dropped.append(old >> cb)
                elif old:
                    table[i] = old
                else:
                    table[i] = await d.new_cluster()
            plans.append((t, table))
        await d.flush()  # the new clusters' refcounts are durable before a table names them
        for t, table in plans:
            for i, e in enumerate(table):
                if e:
                    await d.child.pwrite(e, bytes(t.bits[i * cs : (i + 1) * cs]).ljust(cs, b"\0"))
            await d.child.pwrite(t.bitmap.table_offset, to_be_bytes(table))
        await d.child.flush()
        for t, _table in plans:
            flags = t.bitmap.flags & ~FLAG_IN_USE
            await d.child.pwrite(t.entry_at + 12, flags.to_bytes(4, "big"))
        await d.child.flush()
        d.free_clusters(dropped)  # after the tables that named them are durable
        self.tracked.clear()

    def names(self) -> list[str]:
        """The bitmaps whose bits mean something: not left in use by another writer."""
        return [b.name for b in self.driver.meta.bitmaps if not b.in_use]

    async def _bits(self, name: str) -> tuple[bytearray, int]:
        for t in self.tracked:
            if t.bitmap.name == name:
                return t.bits, t.bitmap.granularity_bits
        d = self.driver
        bm = next((b for b in d.meta.bitmaps if b.name == name and not b.in_use), None)
        if bm is None:
            raise OSError(f"no usable bitmap named {name!r}")
        bits = self._read.get(name)
        if bits is None:
            bits = await read_bits(d.child, bm, d.size(), d.cluster_size, d.meta.file_size)
            self._read[name] = bits
        return bits, bm.granularity_bits

    async def extents(self, name: str, offset: int, length: int) -> list[Extent]:
        """Dirty and clean runs of bitmap ``name`` over [offset, offset + length)."""
        bits, g = await self._bits(name)
        end = offset + length
        out: list[Extent] = []
        for first, count, dirty in granule_runs(bits, offset >> g, (end - 1) >> g):
            a, b = max(first << g, offset), min((first + count) << g, end)
            out.append(Extent(a, b - a, DIRTY if dirty else CLEAN))
            if len(out) >= MAX_EXTENTS:
                break
        return out
