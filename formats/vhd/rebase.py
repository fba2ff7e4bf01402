"""Changing a differencing VHD's parent: its UUID, timestamp, name and locators.

QEMU cannot do this (it has no differencing VHDs). The parent locators' data areas
were sized when the disk was created and do not move: each new locator must fit the
space of an existing one of its platform, and one that does not (or has no slot) is
cleared, as long as the MacX one (blktap's, the first tried) fits; else refused.
Making a VHD standalone (``-b ""``) would turn it into a dynamic disk whose sector
bitmaps no longer mean anything: refused, convert it instead. The caller holds the
image's lock and has checked the header by opening the image.
"""

from __future__ import annotations

import os
from dataclasses import replace

from formats.raw import RawDriver
from formats.vhd.create import _locator_data
from formats.vhd.layout import (
    PLAT_MACX,
    PLAT_NONE,
    SECTOR,
    VHD_EPOCH,
    DiskType,
    Locator,
)
from formats.vhd.meta import read_meta
from tapnbd.errors import ImageError


def refuse_standalone(path: str) -> None:
    raise ImageError(
        f"{path}: a differencing VHD cannot be made standalone in place (its sector "
        "bitmaps would lose their meaning): convert it to a new image instead"
    )


async def write_parent(fd: int, path: str, name: str, parent_path: str) -> None:
    """Make ``name`` (resolved to ``parent_path``, a VHD) the parent of ``path``."""
    from formats import open_image
    from formats.vhd.driver import VhdDriver

    if not name:
        refuse_standalone(path)
    child = RawDriver(path, read_only=True)
    try:
        meta = await read_meta(child, path)
    finally:
        await child.close()
    h = meta.header
    if h is None or meta.disk_type != DiskType.DIFFERENCING:
        raise ImageError(f"{path}: not a differencing VHD: it has no parent to change")
    parent = await open_image(parent_path, fmt="vhd", read_only=True)
    try:
        assert isinstance(parent, VhdDriver)
        parent_uuid = parent.meta.footer.uuid
    finally:
        await parent.close()
    wanted = dict(_locator_data(path, name))
    locators: list[Locator] = []
    blobs: list[tuple[int, bytes]] = []
    for loc in h.locators:
        data = wanted.pop(loc.code, None) if loc.code != PLAT_NONE else None
        if data is not None and len(data) <= loc.space * SECTOR:
            locators.append(replace(loc, length=len(data)))
            blobs.append((loc.offset, data.ljust(loc.space * SECTOR, b"\0")))
        elif loc.code == PLAT_MACX:
            raise ImageError(
                f"{path}: the new parent's MacX locator ({len(data or b'')} bytes) does not "
                f"fit the {loc.space * SECTOR} bytes the disk has for it: convert instead"
            )
        else:
            locators.append(replace(loc, code=PLAT_NONE, length=0))
    if not any(loc.code == PLAT_MACX for loc in locators):
        raise ImageError(f"{path}: the disk has no MacX parent locator to rewrite")
    header = replace(
        h,
        parent_uuid=parent_uuid,
        parent_timestamp=max(0, int(os.stat(parent_path).st_mtime) - VHD_EPOCH) & 0xFFFFFFFF,
        parent_name_raw=os.path.basename(name).encode("utf-16-be")[:512].ljust(512, b"\0"),
        locators=tuple(locators),
    )
    for off, data in blobs:
        os.pwrite(fd, data, off)
    os.pwrite(fd, header.build(), meta.footer.data_offset)
    os.fsync(fd)
