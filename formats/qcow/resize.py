"""Growing a QCOW v1 image: a new size in the header, and a longer L1 table in place.

QEMU's qcow driver cannot resize at all. The L1 table never moves here: it may grow
into the bytes after it up to the first cluster anything refers to (blktap's
qcow-create pads it to a page, qemu-img to a sector), and a size that needs more is
refused. Shrinking is refused too (qemu-img: the format "does not support resize").
The Xen extension's checksum covers the whole table, so it is recomputed when it was
right before. The caller holds the image's lock.
"""

from __future__ import annotations

import os
from dataclasses import replace

from formats.qcow.geometry import Geometry, compressed_location, l1_cksum
from formats.qcow.l1 import be_array, tables_with_data
from formats.qcow.layout import CKSUM_OFFSET, QCOW_OFLAG_COMPRESSED
from formats.qcow.meta import read_meta
from formats.raw import RawDriver
from tapnbd.errors import ImageError


async def _first_referenced(path: str) -> tuple[int, bool | None]:
    """The lowest file offset any L2 table or data cluster has, and the checksum state."""
    child = RawDriver(path, read_only=True)
    try:
        meta = await read_meta(child)
        g = meta.geometry
        lowest = meta.file_size
        async for l2off in tables_with_data(child, meta.l2_tables, g.l2_bytes):
            lowest = min(lowest, l2off)
            for e in be_array(await child.pread(l2off, g.l2_bytes)):
                if e:
                    off = compressed_location(e, g)[0] if e & QCOW_OFLAG_COMPRESSED else e
                    lowest = min(lowest, off)
        if len(meta.l2_tables):
            lowest = min(lowest, meta.l2_tables[0])
        return lowest, meta.cksum_ok if meta.ext_applies else None
    finally:
        await child.close()


async def grow_qcow(fd: int, path: str, size: int) -> None:
    """Give the image at ``path`` (locked through ``fd``) the larger virtual ``size``."""
    from formats.qcow.layout import QcowHeader

    h = QcowHeader.parse(os.pread(fd, 48, 0))
    old, new = Geometry.from_header(h), Geometry.from_header(replace(h, size=size))
    if size < h.size:
        raise ImageError(f"{path}: a QCOW v1 image cannot shrink")
    lowest, cksum_ok = await _first_referenced(path)
    l1_end = h.l1_table_offset + new.l1_size * 8
    if l1_end > lowest:
        room = (lowest - h.l1_table_offset) // 8
        raise ImageError(
            f"{path}: {size} bytes need {new.l1_size} L1 entries; the L1 table can grow to "
            f"{room} in place (up to {room << (h.cluster_bits + h.l2_bits)} bytes): "
            "convert the image to make it larger"
        )
    grown = new.l1_size - old.l1_size
    if grown:
        os.pwrite(fd, bytes(grown * 8), h.l1_table_offset + old.l1_size * 8)
    os.pwrite(fd, replace(h, size=size).build(), 0)
    if cksum_ok:
        l1 = os.pread(fd, new.l1_size * 8, h.l1_table_offset).ljust(new.l1_size * 8, b"\0")
        os.pwrite(fd, l1_cksum(l1).to_bytes(4, "big"), CKSUM_OFFSET)
    os.fsync(fd)
