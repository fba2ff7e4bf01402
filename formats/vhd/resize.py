"""Growing a dynamic (or differencing) VHD: a larger block table in place, and the new
size in both footers (qemu-img cannot resize a VHD at all).

The block table (BAT) has ``max_table_entries`` entries and is followed by the parent
locators and the data blocks; it may grow into the bytes after it up to the first of
those (blktap and tapnbd pad it to a sector: 128 entries, 256 MiB of 2 MiB blocks),
and a size that needs more is refused. The new entries are "unused" (0xFFFFFFFF, spec:
"the entry contains 0xFFFFFFFF" for an unallocated block). Fixed disks, images with
tapdisk's batmap and shrinking are refused. The caller holds the image's lock.
"""

from __future__ import annotations

import os
from dataclasses import replace

from formats.raw import RawDriver
from formats.vhd.layout import BAT_UNUSED, FOOTER_SIZE, MAX_SECTORS, SECTOR, DiskType, chs
from formats.vhd.meta import read_meta
from tapnbd.errors import ImageError


async def grow_vhd(fd: int, path: str, size: int) -> None:
    """Give the VHD at ``path`` (locked through ``fd``) the larger virtual ``size``."""
    child = RawDriver(path, read_only=True)
    try:
        meta = await read_meta(child, path)
    finally:
        await child.close()
    h, f = meta.header, meta.footer
    if h is None or meta.disk_type == DiskType.FIXED:
        raise ImageError(f"{path}: a fixed VHD is not resized here; convert it instead")
    if meta.batmap is not None:
        raise ImageError(f"{path}: the VHD has tapdisk's batmap; resize refuses it")
    if size < meta.size:
        raise ImageError(f"{path}: a VHD cannot shrink")
    if size % SECTOR or size > MAX_SECTORS * SECTOR:
        raise ImageError(f"{path}: a VHD's size is whole sectors, at most 2040 GiB")
    need = -(-size // h.block_size)
    # The first byte after the table that something uses: a locator, a block, the footer.
    lowest = meta.footer_offset
    for loc in h.locators:
        if loc.space and loc.offset > h.table_offset:
            lowest = min(lowest, loc.offset)
    for entry in meta.bat:
        if entry != BAT_UNUSED:
            lowest = min(lowest, entry * SECTOR)
    room = (lowest - h.table_offset) // 4
    if need > room:
        raise ImageError(
            f"{path}: {size} bytes need {need} block table entries; the table can grow to "
            f"{room} in place (up to {room * h.block_size} bytes): convert the image to "
            "make it larger"
        )
    old = h.max_table_entries
    if need > old:
        os.pwrite(fd, BAT_UNUSED.to_bytes(4, "big") * (need - old), h.table_offset + old * 4)
        os.pwrite(fd, replace(h, max_table_entries=need).build(), f.data_offset)
    cyl, heads, spt = chs(size // SECTOR)
    footer = replace(f, current_size=size, cylinders=cyl, heads=heads, sectors=spt).build()
    os.pwrite(fd, footer, meta.footer_offset)
    os.pwrite(fd, footer, 0)
    os.fsync(fd)
    assert len(footer) == FOOTER_SIZE
