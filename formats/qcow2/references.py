"""Every cluster a qcow2 state names, in one walk shared by ``check`` (which reports what
is wrong and goes on) and the offline rebuild (which refuses it).

Each reference comes as a ``Ref`` (offset, length, what names it) and each entry that
cannot be a reference as a ``Bad``. The caller counts: one reference per L1 table that
reaches a cluster, as qemu-img check counts them (block/qcow2-refcount.c,
check_refcounts_l1 and check_refcounts_l2).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from formats.engine.tables import be_array
from formats.qcow2.bitmaps import Bitmap, BitmapsExt, data_clusters
from formats.qcow2.layout import (
    L2E_RESERVED,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    compressed_span,
)

if TYPE_CHECKING:
    from array import array

    from formats.qcow2.meta import Qcow2Meta
    from tapnbd.driver import Driver


class Kind(enum.Enum):
    META = "meta"  # a header, table or directory
    L2 = "l2"  # an L2 table, named by an L1 entry
    DATA = "data"  # a standard cluster (a zero cluster that keeps its cluster too)
    COMPRESSED = "compressed"


@dataclass(frozen=True, slots=True)
class Ref:
    off: int
    length: int
    what: str
    kind: Kind = Kind.META
    #: The naming entry has OFLAG_COPIED set (its refcount must then be exactly 1).
    copied: bool = False


@dataclass(frozen=True, slots=True)
class Bad:
    message: str


def header_refs(meta: Qcow2Meta) -> Iterator[Ref]:
    """The header cluster, and the LUKS header when the image is encrypted."""
    yield Ref(0, meta.cluster_size, "header")
    if meta.crypto_area is not None:
        yield Ref(*meta.crypto_area, "crypto header")


def bitmap_refs(
    ext: BitmapsExt | None, tables: Iterable[tuple[Bitmap, array[int]]], cs: int
) -> Iterator[Ref]:
    """The bitmap directory, each bitmap's table and its clusters of bits."""
    if ext is not None:
        yield Ref(ext.directory_offset, ext.directory_size, "bitmap directory")
    for bm, table in tables:
        yield Ref(bm.table_offset, bm.table_size * 8, f"bitmap {bm.name!r} table")
        for off in data_clusters(table):
            yield Ref(off, cs, f"bitmap {bm.name!r} data cluster")


def l2_reader(child: Driver, cs: int) -> Callable[[int], Awaitable[array[int]]]:
    """Read an L2 table once: the snapshots' L1 tables share most of theirs with the
    active one, and a rebuild reads the active tables again to copy them."""
    tables: dict[int, array[int]] = {}

    async def read(off: int) -> array[int]:
        t = tables.get(off)
        if t is None:
            t = tables[off] = be_array(await child.pread(off, cs))
        return t

    return read


async def l1_refs(
    l1: array[int],
    read_l2: Callable[[int], Awaitable[array[int]]],
    meta: Qcow2Meta,
    what: str,
) -> AsyncIterator[Ref | Bad]:
    """The L2 tables ``l1`` names and the clusters they name (the L1 table itself is the
    caller's: it may be new). Every offset is checked against the file before it is
    read or counted."""
    cs, cb, end = meta.cluster_size, meta.cluster_bits, meta.file_size
    for i, e in enumerate(l1):
        l2off = e & OFFSET_MASK
        if not l2off:
            continue
        if l2off % cs or l2off + cs > end:
            yield Bad(f"{what} L1 entry {i} (0x{e:x}) is invalid")
            continue
        yield Ref(l2off, cs, f"{what} L2 table", Kind.L2, bool(e & OFLAG_COPIED))
        for j, le in enumerate(await read_l2(l2off)):
            if not le:
                continue
            if le & OFLAG_COMPRESSED:
                off, n = compressed_span(le, cb)
                if off < cs:  # the driver refuses it too; a rebuild would overwrite it
                    yield Bad(
                        f"L2 table 0x{l2off:x} entry {j} (0x{le:x}): compressed data in "
                        "the header cluster"
                    )
                elif off >= end:
                    yield Bad(
                        f"L2 table 0x{l2off:x} entry {j} (0x{le:x}): compressed data "
                        "lies past the end of the file"
                    )
                else:  # the last cluster's span may run past the end: count what is there
                    yield Ref(off, min(n, end - off), f"{what} compressed cluster", Kind.COMPRESSED)
                continue
            if le & L2E_RESERVED:
                yield Bad(f"L2 table 0x{l2off:x} entry {j} (0x{le:x}): reserved bits set")
                continue
            off = le & OFFSET_MASK
            if not off:
                continue
            if off % cs or off + cs > end:
                yield Bad(f"L2 table 0x{l2off:x} entry {j} (0x{le:x}) is invalid")
                continue
            yield Ref(off, cs, f"{what} data cluster", Kind.DATA, bool(le & OFLAG_COPIED))
