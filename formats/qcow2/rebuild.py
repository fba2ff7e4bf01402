"""The offline tools' crash-safe switch (``snapshot``, ``bitmap``): a new metadata state
built beside the old one, then switched to with one sector write.

1. Past the end of the file go a fresh active L1 table and a copy of every L2 table it
   names, the snapshot table (and new snapshots' L1 tables), the clusters and tables of
   the bitmaps that change and the bitmap directory, then a refcount table and blocks
   for the new state, counted from every reference in it as ``qemu-img check`` counts
   them (one per L1 table that reaches a cluster). The active copies' COPIED flags say
   what the new counts say: set where a cluster's refcount is 1.
2. A sync; then the header's first sector is rewritten with the new tables' offsets
   (and, when the bitmaps change, its extensions too: ``offline.header_sector``). A
   disk writes a sector whole, so a power cut leaves the old state or the new one, each
   consistent; a sync.

Nothing the old state uses is written before the switch, and nothing the new one uses
after it; the old state's tables are free clusters from then on. The active state's
tables are copied on each change (an L2 table maps 512 MiB with 64 KiB clusters, so
this is small next to the data), which leaves the snapshots' tables exactly as they
were.

References: QEMU docs/interop/qcow2.txt; block/qcow2-snapshot.c, block/qcow2-bitmap.c.
"""

from __future__ import annotations

import errno
from array import array
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from formats.engine.tables import to_be_bytes
from formats.qcow2.bitmaps import (
    MAX_DIRECTORY,
    Bitmap,
    BitmapsExt,
    read_table,
    table_entries,
)
from formats.qcow2.layout import (
    MAX_L1_BYTES,
    MAX_SNAPSHOTS_BYTES,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    V2_HEADER_SIZE,
    V3_HEADER_SIZE,
    Autoclear,
    Ext,
    Snapshot,
    parse_snapshot,
)
from formats.qcow2.offline import SECTOR, clear_tail, header_sector
from formats.qcow2.refcount import covering, decode_block, encode_block, max_refcount
from formats.qcow2.references import Bad, Kind, bitmap_refs, header_refs, l1_refs, l2_reader
from formats.qcow2.snapshot import snapshot_meta
from tapnbd.errors import ImageError, InvalidImageError, UnsupportedImageError

if TYPE_CHECKING:
    from formats.qcow2.meta import Qcow2Meta
    from tapnbd.driver import Driver


@dataclass
class NewBitmap:
    """A bitmap of the new state: its entry, and either its table as stored (kept) or
    its new bits (``bits``), written to new clusters and a new table."""

    bitmap: Bitmap
    table: array[int] | None = None
    bits: bytes | None = None


@dataclass
class NewState:
    """The state being built: the active L1 (entries naming the L2 tables to copy), the
    virtual size, each snapshot as (raw table entry, L1 table, where it lies: None for a
    copy still to be placed), and the bitmaps (None: as they are)."""

    l1: array[int]
    size: int
    snapshots: list[tuple[bytes, array[int], int | None]] = field(default_factory=list)
    bitmaps: list[NewBitmap] | None = None
    #: A new refcount width (amend -o refcount_bits), as an order; None keeps it.
    refcount_order: int | None = None


async def kept_bitmaps(child: Driver, meta: Qcow2Meta) -> list[NewBitmap]:
    """The image's bitmaps as they are, each table read and checked."""
    cs = meta.cluster_size
    return [NewBitmap(bm, await read_table(child, bm, cs, meta.file_size)) for bm in meta.bitmaps]


#: The snapshot L1 tables a rewrite holds at once. Each may be MAX_L1_BYTES, and a
#: hostile table may name one area thousands of times; a real one of a 1 TiB disk
#: (64 KiB clusters) is 16 KiB, so this keeps 8192 such snapshots.
MAX_KEPT_L1_BYTES = 4 * MAX_L1_BYTES


async def kept_snapshots(
    child: Driver, meta: Qcow2Meta, drop: Snapshot | None = None
) -> list[tuple[bytes, array[int], int | None]]:
    """The snapshots that stay, each L1 table read and checked as the active one is."""
    kept = [s for s in meta.snapshots if s is not drop]
    # (One over the per-table limit is refused by name as it is read, below.)
    total = sum(n for s in kept if (n := s.l1_size * 8) <= MAX_L1_BYTES)
    if total > MAX_KEPT_L1_BYTES:
        raise UnsupportedImageError(
            f"snapshot table: the L1 tables (l1_size) of its {len(kept)} snapshots "
            f"(nb_snapshots) add up to {total} bytes; a rewrite holds them all, and takes "
            f"at most {MAX_KEPT_L1_BYTES}"
        )
    out: list[tuple[bytes, array[int], int | None]] = []
    raw = await _raw_entries(child, meta)
    for entry, snap in zip(raw, meta.snapshots, strict=True):
        if snap is not drop:
            l1 = (await snapshot_meta(child, meta, snap)).l1[: snap.l1_size]
            out.append((entry, l1, snap.l1_table_offset))
    return out


async def _raw_entries(child: Driver, meta: Qcow2Meta) -> list[bytes]:
    """The snapshot table's entries as stored (names are kept byte for byte)."""
    h = meta.header
    if not h.nb_snapshots:
        return []
    n = min(meta.file_size - h.snapshots_offset, MAX_SNAPSHOTS_BYTES)
    data = bytes(await child.pread(h.snapshots_offset, n))
    out, pos = [], 0
    for _ in range(h.nb_snapshots):
        _snap, nxt = parse_snapshot(data, pos)
        # The last entry's padding may lie past the end of the file (qemu-img snapshot
        # writes the table last, unpadded): an entry copied short would shift the next.
        out.append(data[pos:nxt].ljust(nxt - pos, b"\0"))
        pos = nxt
    return out


class _Layout:
    """Clusters handed out past the end of the file."""

    def __init__(self, start: int, cs: int) -> None:
        self.next, self.cs = start, cs

    def take(self, nbytes: int) -> int:
        off = self.next
        self.next += -(-nbytes // self.cs) * self.cs
        return off


def _with_l1(entry: bytes, offset: int) -> bytes:
    return offset.to_bytes(8, "big") + entry[8:]


async def switch(child: Driver, meta: Qcow2Meta, state: NewState, path: str) -> None:
    """Write ``state`` past the end of the file, then switch the header to it."""
    h, cs, cb = meta.header, meta.cluster_size, meta.cluster_bits
    file_size = meta.file_size
    l2 = l2_reader(child, cs)
    bitmaps_changed = state.bitmaps is not None
    bitmaps = state.bitmaps if state.bitmaps is not None else await kept_bitmaps(child, meta)
    if state.size != h.size and any(nb.bits is None and not nb.bitmap.in_use for nb in bitmaps):
        raise ImageError(
            f"{path}: the image's bitmaps cover {h.size} bytes and the new size is "
            f"{state.size}; remove them first (tapnbd bitmap --remove)"
        )

    # Where everything new goes, the refcount structures last (they cover themselves).
    lay = _Layout(-(-file_size // cs) * cs, cs)
    l1_off = lay.take(len(state.l1) * 8)
    copies = {i: lay.take(cs) for i, e in enumerate(state.l1) if e & OFFSET_MASK}
    snaps: list[tuple[bytes, array[int], int, bool]] = []  # entry, L1, its offset, new
    for entry, l1, where in state.snapshots:
        if where is None:
            off = lay.take(len(l1) * 8)
            snaps.append((_with_l1(entry, off), l1, off, True))
        else:
            snaps.append((entry, l1, where, False))
    table = b"".join(s[0] for s in snaps)
    if len(table) > MAX_SNAPSHOTS_BYTES:
        raise ImageError(f"{path}: the snapshot table would exceed {MAX_SNAPSHOTS_BYTES} bytes")
    table_off = lay.take(len(table)) if table else 0
    # Bitmaps with new bits: a cluster for each cluster of bits that is not all zeros
    # (as qemu stores them), then the table; kept ones stay where they are.
    bm_writes: list[tuple[int, bytes]] = []
    placed: list[tuple[Bitmap, array[int]]] = []
    for nb in bitmaps:
        bm, bt = nb.bitmap, nb.table
        if nb.bits is not None:
            n = table_entries(state.size, bm.granularity_bits, cs)
            bt = array("Q", bytes(8 * n))
            for i in range(n):
                chunk = nb.bits[i * cs : (i + 1) * cs]
                if chunk.count(0) != len(chunk):
                    bt[i] = lay.take(cs)
                    bm_writes.append((bt[i], chunk.ljust(cs, b"\0")))
            bm = replace(bm, table_offset=lay.take(n * 8), table_size=n)
            bm_writes.append((bm.table_offset, to_be_bytes(bt)))
        assert bt is not None
        placed.append((bm, bt))
    directory = b"".join(bm.entry() for bm, _t in placed)
    if len(directory) > MAX_DIRECTORY:
        raise ImageError(f"{path}: the bitmap directory would exceed {MAX_DIRECTORY} bytes")
    ext: BitmapsExt | None
    if directory and (bitmaps_changed or meta.bitmaps_ext is None):
        ext = BitmapsExt(len(placed), len(directory), lay.take(len(directory)))
        bm_writes.append((ext.directory_offset, directory))
    else:
        ext = meta.bitmaps_ext if directory else None
    order = h.refcount_order if state.refcount_order is None else state.refcount_order
    rt_clusters, blocks = covering(lay.next >> cb, cb, order)
    rt_off = lay.take(rt_clusters * cs)
    blocks_off = lay.take(blocks * cs)
    total = lay.next >> cb

    # Every reference of the new state, counted.
    refs = array("I", bytes(4 * total))

    def add(off: int, n: int, what: str) -> None:
        if off + n > max(file_size, lay.next) or n <= 0:
            raise InvalidImageError(f"{what} at 0x{off:x} (+{n}) lies past the end of the file")
        for c in range(off >> cb, ((off + n - 1) >> cb) + 1):
            refs[c] += 1

    async def walk(l1: array[int], what: str, *, l2_tables: bool) -> None:
        """Count what ``l1`` names; its L2 tables only if ``l2_tables`` (the active
        state's are counted as their copies)."""
        async for ref in l1_refs(l1, l2, meta, what):
            if isinstance(ref, Bad):
                raise InvalidImageError(ref.message)
            if l2_tables or ref.kind is not Kind.L2:
                add(ref.off, ref.length, ref.what)

    for ref in header_refs(meta):
        add(ref.off, ref.length, ref.what)
    add(rt_off, rt_clusters * cs, "refcount table")
    add(blocks_off, blocks * cs, "refcount blocks")
    if table:
        add(table_off, len(table), "snapshot table")
    if len(state.l1):
        add(l1_off, len(state.l1) * 8, "active L1 table")
    for off in copies.values():
        add(off, cs, "active L2 table")
    await walk(state.l1, "active", l2_tables=False)
    for _entry, l1, off, _new in snaps:
        what = f"snapshot at 0x{off:x}"
        if len(l1):
            add(off, len(l1) * 8, f"{what} L1 table")
        await walk(l1, what, l2_tables=True)
    for ref in bitmap_refs(ext, placed, cs):
        add(ref.off, ref.length, ref.what)
    limit = max_refcount(order)
    if any(v > limit for v in refs):
        raise ImageError(
            f"{path}: refcount_bits {1 << order} cannot count the references this needs "
            f"(at most {limit} each)"
        )

    # The new state's tables, COPIED set where the new refcount is 1.
    writes: list[tuple[int, bytes]] = []
    active = array("Q", bytes(len(state.l1) * 8))
    for i, e in enumerate(state.l1):
        if i not in copies:
            continue
        t = array("Q", await l2(e & OFFSET_MASK))
        for j, le in enumerate(t):
            le &= ~OFLAG_COPIED
            host = le & OFFSET_MASK
            if host and not le & OFLAG_COMPRESSED and refs[host >> cb] == 1:
                le |= OFLAG_COPIED
            t[j] = le
        writes.append((copies[i], to_be_bytes(t)))
        active[i] = copies[i] | OFLAG_COPIED
    writes.append((l1_off, to_be_bytes(active)))
    for _entry, l1, off, new in snaps:
        if new:
            writes.append((off, to_be_bytes(l1)))
    if table:
        writes.append((table_off, table))
    writes.extend(bm_writes)
    counts = decode_block(bytes(blocks * cs), order)
    for c, v in enumerate(refs):
        counts[c] = v
    writes.append((rt_off, to_be_bytes(array("Q", (blocks_off + i * cs for i in range(blocks))))))
    writes.append((blocks_off, encode_block(counts, order)))
    for off, data in sorted(writes):  # the blocks come last and end the file at lay.next
        await child.pwrite(off, data)
    await child.flush()

    # The switch: one sector. Autoclear bits tapnbd does not know are cleared, as on
    # the driver's writable open; the bitmaps' bit says whether there are bitmaps.
    header = replace(
        h,
        size=state.size,
        l1_size=len(state.l1),
        l1_table_offset=l1_off,
        refcount_table_offset=rt_off,
        refcount_table_clusters=rt_clusters,
        nb_snapshots=len(snaps),
        snapshots_offset=table_off,
        autoclear_features=Autoclear.BITMAPS if ext is not None else 0,
        refcount_order=order,
    )
    head = bytes(await child.pread(0, min(cs, file_size)))
    if ext is meta.bitmaps_ext:  # the extensions stay: only the fixed header changes
        sector = bytearray(head[:SECTOR])
        fixed = header.build()[: V3_HEADER_SIZE if h.version >= 3 else V2_HEADER_SIZE]
        sector[: len(fixed)] = fixed
        await child.pwrite(0, bytes(sector))
        await child.flush()
    else:
        one = header_sector(path, meta, head, header, {Ext.BITMAPS: ext.build() if ext else None})
        await child.pwrite(0, one)
        await child.flush()
        await clear_tail(child, meta, head)
    await _punch_free(child, refs, cb, file_size)


async def _punch_free(child: Driver, refs: array[int], cb: int, file_size: int) -> None:
    """Give back the space of the clusters nothing names any more (the old state's
    tables among them): they read as zeros from then on, and the file keeps its length.
    Only once the switch is durable, so the old state is never needed again."""
    end = -(-file_size >> cb)
    c = 0
    while c < end:
        if refs[c]:
            c += 1
            continue
        start = c
        while c < end and not refs[c]:
            c += 1
        try:
            await child.trim(start << cb, (c - start) << cb)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
