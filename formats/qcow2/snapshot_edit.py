"""``tapnbd snapshot -c|-d|-a``: create, delete and apply internal qcow2 snapshots in an
image no one has open (qemu-img snapshot), under the image's lock.

Every change builds the new state beside the old one and switches to it with one write:

1. Past the end of the file go a fresh active L1 table and a copy of every L2 table it
   names, a new snapshot table (and, for ``-c``, the snapshot's own L1 table: the old
   active one), then a refcount table and blocks for the new state, counted from every
   reference in it as ``qemu-img check`` counts them (one per L1 table that reaches a
   cluster). The active copies' COPIED flags say what the new counts say: set where a
   cluster's refcount is 1.
2. A sync; then the header's first sector is rewritten with the new tables' offsets and
   sizes. A disk writes a sector whole, so a power cut leaves the old state or the new
   one, each consistent; a sync.

Nothing the old state uses is written before the switch, and nothing the new one uses
after it; the old state's tables are free clusters from then on. The active state's
tables are copied on each change (an L2 table maps 512 MiB with 64 KiB clusters, so
this is small next to the data), which leaves the snapshots' tables exactly as they
were.

References: QEMU docs/interop/qcow2.txt "Snapshots"; block/qcow2-snapshot.c.
"""

from __future__ import annotations

import struct
import time
from array import array
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from formats.engine.tables import be_array, to_be_bytes
from formats.qcow2.layout import (
    L2E_RESERVED,
    MAX_SNAPSHOTS,
    MAX_SNAPSHOTS_BYTES,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    SNAPSHOT,
    V2_HEADER_SIZE,
    V3_HEADER_SIZE,
    Autoclear,
    Snapshot,
    compressed_span,
    parse_snapshot,
)
from formats.qcow2.meta import Qcow2Meta, l1_entries_needed, read_meta
from formats.qcow2.offline import SECTOR, rewritable
from formats.qcow2.refcount import covering, decode_block, encode_block, max_refcount
from formats.qcow2.snapshot import describe_snapshot, find_snapshot, snapshot_meta
from formats.raw import RawDriver
from tapnbd.errors import ImageError, InvalidImageError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from tapnbd.driver import Driver

    Change = Callable[["Driver", Qcow2Meta, list[bytes]], Awaitable[tuple["_NewState", str]]]

#: What qemu writes as a snapshot's extra data: vm_state_size_large, disk_size, icount.
EXTRA = struct.Struct(">QQq")


@dataclass
class _NewState:
    """The state being built: the active L1 (entries naming the L2 tables to copy), the
    virtual size, and each snapshot as (raw table entry, L1 table, where it lies: None
    for a copy still to be placed)."""

    l1: array[int]
    size: int
    snapshots: list[tuple[bytes, array[int], int | None]] = field(default_factory=list)


async def list_snapshots(path: str) -> list[Snapshot]:
    child = RawDriver(path, read_only=True)
    try:
        return (await read_meta(child)).snapshots
    finally:
        await child.close()


async def create_snapshot(path: str, name: str, *, share: bool = False) -> str:
    """Take a snapshot named ``name`` of the image's current state; returns its id."""
    if not name:
        raise ImageError("a snapshot needs a name")

    async def change(child: Driver, meta: Qcow2Meta, raw: list[bytes]) -> tuple[_NewState, str]:
        if any(s.name == name for s in meta.snapshots):
            raise ImageError(f"{path}: a snapshot named {name!r} already exists")
        if len(meta.snapshots) >= MAX_SNAPSHOTS:
            raise ImageError(f"{path}: the image has {MAX_SNAPSHOTS} snapshots, qemu's limit")
        ids = [int(s.id_str) for s in meta.snapshots if s.id_str.isdigit()]
        new_id = str(max(ids, default=0) + 1)  # as qemu's find_new_snapshot_id
        state = _NewState(array("Q", meta.l1), meta.header.size)
        state.snapshots = await _kept(child, meta, raw)
        now = time.time_ns()
        extra = EXTRA.pack(0, meta.header.size, 0)  # icount 0, as qemu-img writes it
        entry = _entry(0, len(meta.l1), new_id, name, now, extra)
        state.snapshots.append((entry, array("Q", (e & ~OFLAG_COPIED for e in meta.l1)), None))
        return state, new_id

    return await _edit(path, share, change)


async def delete_snapshot(path: str, key: str, *, share: bool = False) -> str:
    """Delete the snapshot ``key`` names (an id, else a name); returns its description."""

    async def change(child: Driver, meta: Qcow2Meta, raw: list[bytes]) -> tuple[_NewState, str]:
        gone = find_snapshot(meta.snapshots, key, path)
        state = _NewState(array("Q", meta.l1), meta.header.size)
        state.snapshots = await _kept(child, meta, raw, drop=gone)
        return state, describe_snapshot(gone)

    return await _edit(path, share, change)


async def apply_snapshot(path: str, key: str, *, share: bool = False) -> str:
    """Make the image read as the snapshot ``key`` names (its size too, as qemu does);
    the current state is lost. Returns the snapshot's description."""

    async def change(child: Driver, meta: Qcow2Meta, raw: list[bytes]) -> tuple[_NewState, str]:
        snap = find_snapshot(meta.snapshots, key, path)
        size = snap.disk_size if snap.disk_size is not None else meta.header.size
        at = await snapshot_meta(child, meta, snap)
        l1 = array("Q", at.l1[: snap.l1_size])
        need = l1_entries_needed(size, meta.cluster_bits)
        l1.extend([0] * (need - len(l1)))
        state = _NewState(l1, size)
        state.snapshots = await _kept(child, meta, raw)
        return state, describe_snapshot(snap)

    return await _edit(path, share, change)


async def _kept(
    child: Driver, meta: Qcow2Meta, raw: list[bytes], drop: Snapshot | None = None
) -> list[tuple[bytes, array[int], int | None]]:
    """The snapshots that stay, each L1 table read and checked as the active one is."""
    out: list[tuple[bytes, array[int], int | None]] = []
    for entry, snap in zip(raw, meta.snapshots, strict=True):
        if snap is not drop:
            l1 = (await snapshot_meta(child, meta, snap)).l1[: snap.l1_size]
            out.append((entry, l1, snap.l1_table_offset))
    return out


def _entry(l1_offset: int, l1_size: int, ident: str, name: str, ns: int, extra: bytes) -> bytes:
    """A snapshot table entry, padded to 8 bytes."""
    i, n = ident.encode(), name.encode()
    out = SNAPSHOT.pack(
        l1_offset, l1_size, len(i), len(n), ns // 10**9, ns % 10**9, 0, 0, len(extra)
    )
    out += extra + i + n
    return out + bytes(-len(out) % 8)


def _with_l1(entry: bytes, offset: int) -> bytes:
    return struct.pack(">Q", offset) + entry[8:]


async def _edit(path: str, share: bool, change: Change) -> str:
    async with rewritable(path, share=share) as (child, meta):
        if meta.header.autoclear_features & Autoclear.BITMAPS:
            # Their clusters are not counted here: refused, rather than dropped unasked.
            raise ImageError(
                f"{path}: the image has persistent dirty bitmaps, which tapnbd does not "
                "keep; remove them first (qemu-img bitmap --remove) or use qemu-img snapshot"
            )
        state, said = await change(child, meta, await _raw_entries(child, meta))
        await _switch(child, meta, state, path)
        return said


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


async def _switch(child: Driver, meta: Qcow2Meta, state: _NewState, path: str) -> None:
    h, cs, cb = meta.header, meta.cluster_size, meta.cluster_bits
    file_size = meta.file_size
    tables: dict[int, array[int]] = {}

    async def l2(off: int) -> array[int]:
        t = tables.get(off)
        if t is None:
            t = tables[off] = be_array(await child.pread(off, cs))
        return t

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
    order = h.refcount_order
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

    async def walk(l1: array[int], what: str) -> None:
        """Count what the L2 tables of ``l1`` name (their own clusters are counted by the
        caller: the active state's are copies)."""
        for i, e in enumerate(l1):
            l2off = e & OFFSET_MASK
            if not l2off:
                continue
            if l2off % cs or l2off + cs > file_size:
                raise InvalidImageError(f"{what} L1 entry {i} (0x{e:x}) is invalid")
            for j, le in enumerate(await l2(l2off)):
                if le & OFLAG_COMPRESSED:
                    off, n = compressed_span(le, cb)
                    if off < cs:  # inside the header cluster: as the driver refuses it
                        raise InvalidImageError(
                            f"L2 table 0x{l2off:x} entry {j} (0x{le:x}): compressed data "
                            "in the header cluster"
                        )
                    add(off, min(n, file_size - off), f"{what} compressed cluster")
                    continue
                if le & L2E_RESERVED:
                    raise InvalidImageError(
                        f"L2 table 0x{l2off:x} entry {j} (0x{le:x}): reserved bits set"
                    )
                off = le & OFFSET_MASK
                if off:
                    if off % cs or off + cs > file_size:
                        raise InvalidImageError(f"L2 table 0x{l2off:x} entry {j} (0x{le:x})")
                    add(off, cs, f"{what} data cluster")

    add(0, cs, "header")
    add(rt_off, rt_clusters * cs, "refcount table")
    add(blocks_off, blocks * cs, "refcount blocks")
    if table:
        add(table_off, len(table), "snapshot table")
    if len(state.l1):
        add(l1_off, len(state.l1) * 8, "active L1 table")
    for off in copies.values():
        add(off, cs, "active L2 table")
    await walk(state.l1, "active")
    for _entry, l1, off, _new in snaps:
        what = f"snapshot at 0x{off:x}"
        if len(l1):
            add(off, len(l1) * 8, f"{what} L1 table")
        for e in l1:
            if e & OFFSET_MASK:
                add(e & OFFSET_MASK, cs, f"{what} L2 table")
        await walk(l1, what)
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
    counts = decode_block(bytes(blocks * cs), order)
    for c, v in enumerate(refs):
        counts[c] = v
    writes.append((rt_off, to_be_bytes(array("Q", (blocks_off + i * cs for i in range(blocks))))))
    writes.append((blocks_off, encode_block(counts, order)))
    for off, data in writes:  # the blocks come last and end the file at lay.next
        await child.pwrite(off, data)
    await child.flush()

    # The switch: one sector; every field it changes is in the fixed header. Autoclear
    # bits tapnbd does not know are cleared, as on the driver's writable open.
    header = replace(
        h,
        size=state.size,
        l1_size=len(state.l1),
        l1_table_offset=l1_off,
        refcount_table_offset=rt_off,
        refcount_table_clusters=rt_clusters,
        nb_snapshots=len(snaps),
        snapshots_offset=table_off,
        autoclear_features=0,
    )
    sector = bytearray(await child.pread(0, SECTOR))
    fixed = header.build()[: V3_HEADER_SIZE if h.version >= 3 else V2_HEADER_SIZE]
    sector[: len(fixed)] = fixed
    await child.pwrite(0, bytes(sector))
    await child.flush()
