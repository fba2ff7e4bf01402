"""A new virtual size in a qcow2 header (QEMU: qcow2_co_truncate, without preallocation).

Growing needs L1 entries for the new size: the L1 table takes whole clusters, and the
entries up to their end are used in place; a size that needs more is refused rather
than the table moved. Shrinking (the caller has the image's driver discard the clusters
past the new end first) only lowers the size. Images with internal snapshots are
refused, as their tables would need the same care. The caller holds the lock.
"""

from __future__ import annotations

import os
from dataclasses import replace

from formats.qcow2.layout import Qcow2Header
from formats.qcow2.meta import l1_entries_needed
from formats.qcow2.rebase import read_header
from tapnbd.errors import ImageError


def check_qcow2_size(fd: int, path: str, size: int) -> None:
    """Refuse ``size`` before anything is written (a shrink discards clusters first)."""
    _plan(fd, path, size)


def _plan(fd: int, path: str, size: int) -> tuple[Qcow2Header, int]:
    """The header, and the L1 entries the new size needs."""
    h, _head = read_header(fd)
    if h.nb_snapshots:
        raise ImageError(f"{path}: the image has internal snapshots; resize refuses it")
    cs = 1 << h.cluster_bits
    need = l1_entries_needed(size, h.cluster_bits)
    if need > h.l1_size:
        have = (h.l1_size * 8 + cs - 1) // cs * cs // 8 if h.l1_table_offset else 0
        if need > have:
            span = have << (2 * h.cluster_bits - 3)
            raise ImageError(
                f"{path}: {size} bytes need {need} L1 entries; the table's clusters hold "
                f"{have} (up to {span} bytes): convert the image to make it larger"
            )
    return h, need


def set_qcow2_size(fd: int, path: str, size: int) -> None:
    """Write ``size`` (and a longer L1 table when it grows) into the header."""
    h, need = _plan(fd, path, size)
    l1_size = h.l1_size
    if need > l1_size:
        os.pwrite(fd, bytes((need - l1_size) * 8), h.l1_table_offset + l1_size * 8)
        l1_size = need
    os.pwrite(fd, replace(h, size=size, l1_size=l1_size).build(), 0)
    os.fsync(fd)


async def resize_with_bitmaps(path: str, size: int) -> bool:
    """Resize an image that has persistent bitmaps, and its bitmaps with it, in one
    switch (``formats.qcow2.rebuild``); False if it has none (``set_qcow2_size``).

    As qemu-img resize: a bitmap's bits past the old end start clean, and those past a
    new, smaller end are dropped; a bitmap left in use keeps its table (it means
    nothing). The caller holds the lock, and has checked ``size`` (check_qcow2_size).
    """
    from array import array

    from formats.qcow2.bitmaps import bitmap_bytes, read_bits
    from formats.qcow2.offline import rewritable
    from formats.qcow2.rebuild import NewState, kept_bitmaps, kept_snapshots, switch

    async with rewritable(path, share=True) as (child, meta):
        if not meta.bitmaps:
            return False
        h, cs = meta.header, meta.cluster_size
        bitmaps = await kept_bitmaps(child, meta)
        for nb in bitmaps:
            bm = nb.bitmap
            if bm.in_use:
                continue
            bits = await read_bits(child, bm, h.size, cs, meta.file_size, nb.table)
            n = bitmap_bytes(size, bm.granularity_bits)
            bits = bits[:n].ljust(n, b"\0")
            granules = -(-size >> bm.granularity_bits)
            if granules % 8:  # no bit past the new end
                bits[-1] &= (1 << (granules % 8)) - 1
            nb.bits, nb.table = bytes(bits), None
        l1 = array("Q", meta.l1)
        need = l1_entries_needed(size, meta.cluster_bits)
        l1.extend([0] * (need - len(l1)))
        state = NewState(l1, size, await kept_snapshots(child, meta), bitmaps)
        await switch(child, meta, state, path)
        return True
