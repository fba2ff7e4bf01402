"""``tapnbd check`` for qcow2: every reference counted, then compared with the refcounts.

Walks the header cluster, the refcount table and blocks, the snapshot table, the bitmaps
(directory, tables, clusters of bits), and each L1 table (the active one and every
snapshot's) down to its L2 tables and data clusters, counting one reference per L1 table
that reaches a cluster (as qemu counts them). A stored refcount above the count is a
leak, one below it a corruption (qemu-img check's rule); so is a COPIED flag on an
active entry whose refcount isn't 1, or a pointer past the end of the file. Exit codes as ``qemu-img check``: 0, 1, 2 corrupt, 3 leaks only.
"""

from __future__ import annotations

import os
from array import array
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from formats.engine.checks import CheckResult
from formats.engine.tables import be_array
from formats.qcow2.bitmaps import read_table
from formats.qcow2.layout import (
    INCOMPATIBLE_OFFSET,
    MAX_L1_BYTES,
    OFFSET_MASK,
    Incompatible,
    parse_snapshot,
    snapshot_entry_end,
)
from formats.qcow2.meta import Qcow2Meta, check_walkable, read_meta, refcount_block_problem
from formats.qcow2.refcount import decode_block, encode_block, entries_per_block, max_refcount
from formats.qcow2.references import Bad, Kind, bitmap_refs, header_refs, l1_refs, l2_reader
from formats.raw import RawDriver
from tapnbd.errors import ImageError, InvalidImageError


@dataclass
class Qcow2CheckResult(CheckResult):
    """CheckResult, reported as qcow2."""

    def to_json(self) -> dict[str, object]:
        out = super().to_json()
        out["format"] = "qcow2"
        del out["cksum"]
        return out


async def check_qcow2(
    path: str, repair: bool = False, *, leaks_only: bool = False, share: bool = False
) -> Qcow2CheckResult:
    """Check ``path`` (read-only unless ``repair``).

    ``repair`` sets every refcount that disagrees with the references to the count of
    references (leaks freed, missing increments made: what a crash with lazy refcounts
    leaves), then clears the dirty bit, and checks again; ``leaks_only`` (qemu-img
    check -r leaks) lowers only the refcounts above their references. A reference
    whose refcount block does not exist cannot be repaired here.
    """
    res = Qcow2CheckResult(filename=path)
    child = RawDriver(path, read_only=not repair, lock=True, share=share)
    fixes: dict[int, int] = {}
    try:
        meta = await read_meta(child)
        check_walkable(meta, path)
        h, cs, cb = meta.header, meta.cluster_size, meta.cluster_bits
        res.cluster_size = cs
        file_size = meta.file_size
        refs: Counter[int] = Counter()

        def add(off: int, n: int, what: str) -> bool:
            if off + n > file_size:
                res.corrupt(f"{what} at 0x{off:x} (+{n}) lies past the end of the file")
                return False
            for c in range(off >> cb, ((off + n - 1) >> cb) + 1):
                refs[c] += 1
            return True

        for ref in header_refs(meta):
            add(ref.off, ref.length, ref.what)
        add(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
        if h.nb_snapshots:
            data = bytes(
                await child.pread(h.snapshots_offset, min(file_size - h.snapshots_offset, 64 << 20))
            )
            pos = last = 0
            for _ in range(h.nb_snapshots):
                last = pos
                _snap, pos = parse_snapshot(data, pos)
            add(h.snapshots_offset, snapshot_entry_end(data, last), "snapshot table")
        bitmap_tables = []
        for bm in meta.bitmaps:  # valid: read_meta checked the directory
            try:
                bitmap_tables.append((bm, await read_table(child, bm, cs, file_size)))
            except InvalidImageError as err:
                res.corrupt(str(err))
        for ref in bitmap_refs(meta.bitmaps_ext, bitmap_tables, cs):
            add(ref.off, ref.length, ref.what)
        read_l2 = l2_reader(child, cs)
        copied_checks: list[tuple[int, str]] = []

        async def l1_tables() -> AsyncIterator[tuple[array[int], int, bool, str]]:
            """The active L1, then each snapshot's, read one at a time: each may be 32
            MiB, and a hostile table may name thousands of them (one area, many times)."""
            yield meta.l1, h.l1_table_offset, True, "active"
            for s in meta.snapshots:
                if s.l1_size * 8 > min(file_size, MAX_L1_BYTES) or s.l1_table_offset % cs:
                    where = f"L1 table 0x{s.l1_table_offset:x}"
                    res.corrupt(f"snapshot {s.name!r}: {where} is invalid")
                    continue
                l1 = be_array(await child.pread(s.l1_table_offset, s.l1_size * 8))
                yield l1, s.l1_table_offset, False, f"snapshot {s.name!r}"

        async for l1, l1_off, active, name in l1_tables():
            if len(l1):
                add(l1_off, len(l1) * 8, f"{name} L1 table")
            async for item in l1_refs(l1, read_l2, meta, name):
                if isinstance(item, Bad):
                    res.corrupt(item.message)
                    continue
                ref = item
                add(ref.off, ref.length, ref.what)
                if not active:
                    continue
                if ref.kind is not Kind.L2:  # a zero cluster that keeps its cluster counts
                    res.allocated_clusters += 1
                if ref.kind is Kind.COMPRESSED:
                    res.compressed_clusters += 1
                elif ref.copied:
                    copied_checks.append((ref.off >> cb, f"{ref.what} 0x{ref.off:x}"))

        # The refcounts as stored.
        per_block = entries_per_block(cb, h.refcount_order)
        stored: dict[int, int] = {}
        # A block in the header cluster, a table, or a cluster something else uses is
        # read for what it says, but a repair never writes into it (_repair).
        bad_blocks: set[int] = set()
        blocks: list[tuple[int, int]] = []
        for ri, be in enumerate(meta.reftable):
            boff = be & OFFSET_MASK
            if not boff:
                continue
            why = refcount_block_problem(meta, boff)
            if why or not add(boff, cs, f"refcount block {ri}"):
                res.corrupt(f"refcount table entry {ri} (0x{be:x}) {why or 'is invalid'}")
                bad_blocks.add(ri)
                continue
            blocks.append((ri, boff))
            block = decode_block(await child.pread(boff, cs), h.refcount_order)
            for i, v in enumerate(block):
                if v:
                    stored[ri * per_block + i] = v
        for ri, boff in blocks:
            if refs[boff >> cb] > 1:
                res.corrupt(f"refcount block {ri} at 0x{boff:x} shares its cluster")
                bad_blocks.add(ri)
        file_clusters = (file_size + cs - 1) >> cb
        for c in sorted(set(refs) | set(stored)):
            have, want = stored.get(c, 0), refs.get(c, 0)
            if have > want and c >= file_clusters:
                continue  # qemu-img check ignores refcounts past the end of the file
            if have > want or (have < want and not leaks_only):
                fixes[c] = want
            if have > want:
                res.leaked_clusters += 1
                if want:
                    res.notes.append(f"cluster {c}: refcount={have} reference={want}")
            elif have < want:
                res.corrupt(f"cluster {c}: refcount={have} reference={want}")
        for c, what in copied_checks:
            if stored.get(c, 0) != 1:
                res.corrupt(f"OFLAG_COPIED {what}: refcount={stored.get(c, 0)}")
        used = max(refs) + 1 if refs else 0
        res.image_end_offset = max(used * cs, 0)
        if repair and not res.check_errors:
            await _repair(child, meta, fixes, per_block, bad_blocks)
    except OSError as e:
        res.check_errors.append(f"{path}: {os.strerror(e.errno or 5)}")
    finally:
        await child.close()
    if repair and not res.check_errors:
        after = await check_qcow2(path, share=share)
        after.notes.insert(0, f"repaired {len(fixes)} refcounts; the dirty bit is clear")
        return after
    return res


async def _repair(
    child: RawDriver,
    meta: Qcow2Meta,
    fixes: dict[int, int],
    per_block: int,
    bad_blocks: set[int],
) -> None:
    """Write the corrected refcounts, sync, then clear the dirty bit.

    Never into a refcount block whose table entry is invalid (``bad_blocks``): it may
    lie in the header cluster or another table, which the "repair" would overwrite."""
    h, cs = meta.header, meta.cluster_size
    by_block: dict[int, list[tuple[int, int]]] = {}
    for c, want in fixes.items():
        by_block.setdefault(c // per_block, []).append((c % per_block, want))
    limit = max_refcount(h.refcount_order)
    for ri, changes in by_block.items():
        boff = meta.reftable[ri] & OFFSET_MASK if ri < len(meta.reftable) else 0
        if not boff:
            raise ImageError(
                f"cluster {ri * per_block + changes[0][0]} is referenced but has no refcount "
                "block; repair it with qemu-img check -r all"
            )
        if ri in bad_blocks:
            raise ImageError(
                f"refcount table entry {ri} (0x{meta.reftable[ri]:x}) is invalid, and its "
                "refcounts are not written there; repair it with qemu-img check -r all"
            )
        block = decode_block(await child.pread(boff, cs), h.refcount_order)
        for i, want in changes:
            block[i] = min(want, limit)
        await child.pwrite(boff, encode_block(block, h.refcount_order))
    await child.flush()
    if h.incompatible_features & Incompatible.DIRTY:
        bits = h.incompatible_features & ~Incompatible.DIRTY
        await child.pwrite(INCOMPATIBLE_OFFSET, bits.to_bytes(8, "big"))
        await child.flush()
