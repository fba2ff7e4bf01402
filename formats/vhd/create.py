"""Creating empty VHDs: fixed, dynamic, and differencing children of a VHD parent.

Laid out as blktap2 and QEMU lay them out: the footer's copy, the dynamic header at 512,
the BAT at 1536, then (differencing) each parent locator's data in its own sectors, then
the footer; blocks are appended where the footer is. The creator is ``tap\\0``, so QEMU
(and Hyper-V) size the disk by its current size, not by its CHS geometry; the geometry
is still filled in as the specification's appendix computes it.

A differencing child records its parent three ways, as blktap2's ``vhd-util snapshot``
does: MacX (a ``file://`` URL, what blktap reads), W2ru (the relative name) and W2ku (the
absolute path), plus the parent's name in the header.
"""

from __future__ import annotations

import os
import time
import uuid
from contextlib import ExitStack
from urllib.parse import quote

from formats.locks import locked_target
from formats.raw import truncate_to_empty
from formats.vhd.layout import (
    BAT_UNUSED,
    DEFAULT_BLOCK_SIZE,
    FEATURE_RESERVED,
    FOOTER_SIZE,
    HEADER_SIZE,
    MAX_BLOCK_SIZE,
    MAX_SECTORS,
    MIN_BLOCK_SIZE,
    NO_OFFSET,
    PLAT_MACX,
    PLAT_W2KU,
    PLAT_W2RU,
    SECTOR,
    VERSION,
    VHD_EPOCH,
    DiskType,
    Footer,
    Header,
    Locator,
    chs,
)
from tapnbd.errors import ImageError

SUBFORMATS = ("dynamic", "fixed")
#: blktap2's creator version for tapdisk-made images.
CREATOR_VERSION = 0x00010003


def _pad(n: int) -> int:
    return (n + SECTOR - 1) // SECTOR * SECTOR


def make_footer(size: int, disk_type: DiskType, data_offset: int) -> Footer:
    cyl, heads, spt = chs(size // SECTOR)
    return Footer(
        features=FEATURE_RESERVED,
        version=VERSION,
        data_offset=data_offset,
        timestamp=max(0, int(time.time()) - VHD_EPOCH) & 0xFFFFFFFF,
        creator_app=b"tap\0",
        creator_version=CREATOR_VERSION,
        creator_os=b"Lnux",
        original_size=size,
        current_size=size,
        cylinders=cyl,
        heads=heads,
        sectors=spt,
        disk_type=disk_type,
        checksum=0,
        uuid=uuid.uuid4().bytes,
        saved_state=0,
    )


def _locator_data(path: str, backing: str) -> list[tuple[int, bytes]]:
    """(platform, data) for MacX, W2ru and W2ku, as blktap2 writes them."""
    out = [(PLAT_MACX, ("file://" + quote(backing, safe="/._-~")).encode())]
    if not os.path.isabs(backing):
        out.append((PLAT_W2RU, backing.replace("/", "\\").encode("utf-16-le")))
    absolute = os.path.abspath(os.path.join(os.path.dirname(path), backing))
    out.append((PLAT_W2KU, absolute.replace("/", "\\").encode("utf-16-le")))
    return out


async def create_vhd(
    path: str,
    size: int | None,
    *,
    subformat: str = "dynamic",
    backing: str | None = None,
    block_size: int | None = None,
    share: bool = False,
    target_fd: int | None = None,
) -> None:
    """Create ``path`` (overwritten). With ``backing``, a differencing child of it.

    The image's lock is taken before anything is written, unless ``share``, or the
    caller passes ``target_fd``, an fd whose lock it already holds.
    """
    from formats import open_image
    from formats.engine.opening import resolve_backing
    from formats.vhd.driver import VhdDriver

    if subformat not in SUBFORMATS:
        raise ImageError(f"subformat {subformat!r}: use {' or '.join(SUBFORMATS)}")
    bs = block_size or DEFAULT_BLOCK_SIZE
    if bs & (bs - 1) or not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE:
        raise ImageError(
            f"block size {bs} must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        )
    parent_uuid = bytes(16)
    parent_ts = 0
    if backing is not None:
        if subformat != "dynamic":
            raise ImageError("a differencing disk (--backing) is always dynamic")
        bpath = resolve_backing(path, backing)
        parent = await open_image(bpath, fmt="vhd", read_only=True)
        try:
            assert isinstance(parent, VhdDriver)
            parent_uuid = parent.meta.footer.uuid
            psize = parent.size()
        finally:
            await parent.close()
        parent_ts = max(0, int(os.stat(bpath).st_mtime) - VHD_EPOCH) & 0xFFFFFFFF
        if size is None:
            size = psize
    if size is None:
        raise ImageError("a size is needed (or a parent to take it from)")
    size = _pad(size)
    if size > MAX_SECTORS * SECTOR:
        raise ImageError(f"size {size} is over the VHD limit of 2040 GiB")

    if subformat == "fixed":
        footer = make_footer(size, DiskType.FIXED, NO_OFFSET)
        with ExitStack() as stack:
            fd = target_fd
            if fd is None:
                fd = stack.enter_context(locked_target(path, share=share))
            truncate_to_empty(fd)
            os.ftruncate(fd, size)
            os.pwrite(fd, footer.build(), size)
            os.fsync(fd)
        return

    dtype = DiskType.DIFFERENCING if backing is not None else DiskType.DYNAMIC
    footer = make_footer(size, dtype, FOOTER_SIZE)
    entries = (size + bs - 1) // bs
    bat_off = FOOTER_SIZE + HEADER_SIZE
    pos = bat_off + _pad(entries * 4)
    locators: list[Locator] = []
    blobs: list[tuple[int, bytes]] = []
    name_raw = b""
    if backing is not None:
        for code, data in _locator_data(path, backing):
            space = _pad(len(data))
            locators.append(Locator(code, space // SECTOR, len(data), pos))
            blobs.append((pos, data))
            pos += space
        name_raw = os.path.basename(backing).encode("utf-16-be")[:512]
    header = Header(
        data_offset=NO_OFFSET,
        table_offset=bat_off,
        version=VERSION,
        max_table_entries=entries,
        block_size=bs,
        checksum=0,
        parent_uuid=parent_uuid,
        parent_timestamp=parent_ts,
        reserved=0,
        parent_name_raw=name_raw.ljust(512, b"\0"),
        locators=tuple(locators),
    )
    fbytes = footer.build()
    with ExitStack() as stack:
        fd = target_fd
        if fd is None:
            fd = stack.enter_context(locked_target(path, share=share))
        truncate_to_empty(fd)
        writes = [
            (0, fbytes),
            (FOOTER_SIZE, header.build()),
            (bat_off, BAT_UNUSED.to_bytes(4, "big") * entries),
            *blobs,
            (pos, fbytes),
        ]
        for off, data in writes:
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n
        os.fsync(fd)
