"""Reading and checking a VHD's metadata at open: footer, dynamic header, BAT, batmap.

Everything here runs once per open and every refusal names the field at fault. What is
read is bounded by the file's size and by MAX_TABLE_ENTRIES (4 MiB of BAT), so any
header opens or is refused quickly and in bounded memory.

A crash between a block's data write and the new footer leaves the end of the file
without a footer; a dynamic disk then opens from the footer's copy at offset 0 (blktap's
libvhd falls back the same way, and QEMU only ever reads the copy).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import sys
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote

from formats.vhd.layout import (
    BAT_UNUSED,
    FOOTER_SIZE,
    HEADER_SIZE,
    MAX_BLOCK_SIZE,
    MAX_LOCATOR_BYTES,
    MAX_SECTORS,
    MAX_TABLE_ENTRIES,
    MIN_BLOCK_SIZE,
    PLAT_MACX,
    PLAT_NONE,
    PLAT_W2KU,
    PLAT_W2RU,
    PLATFORM_NAMES,
    SECTOR,
    VERSION,
    BatmapHeader,
    DiskType,
    Footer,
    Header,
    batmap_checksum,
    bitmap_bytes,
    parse_batmap_header,
    parse_footer,
    parse_header,
)
from tapnbd.errors import InvalidImageError, UnsupportedImageError

if TYPE_CHECKING:
    from tapnbd.driver import Driver

log = logging.getLogger(__name__)


@dataclass(slots=True)
class VhdMeta:
    """A VHD's metadata, checked against the file's size."""

    footer: Footer
    file_size: int
    size: int
    #: Where the footer lives at the end of the file (blocks are appended here).
    footer_offset: int
    #: The footer at the end was bad or missing and the copy at 0 was used.
    footer_from_copy: bool = False
    header: Header | None = None
    bat: array[int] = field(default_factory=lambda: array("I"))
    batmap: bytearray | None = None
    batmap_header: BatmapHeader | None = None
    #: Parent paths from the locators, in the order to try them: (platform, path).
    parent_paths: list[tuple[str, str]] = field(default_factory=list)

    @property
    def disk_type(self) -> DiskType:
        return DiskType(self.footer.disk_type)


async def _read(child: Driver, off: int, n: int) -> bytes:
    return bytes(await child.pread(off, n))


async def read_meta(child: Driver, path: str) -> VhdMeta:
    """Read and check the metadata of the VHD in ``child``; raise naming the field."""
    fsize = child.size()
    if fsize < FOOTER_SIZE:
        raise InvalidImageError(f"{path}: footer: file too short ({fsize} bytes)")
    end_off = (fsize - FOOTER_SIZE) // SECTOR * SECTOR
    tail = await _read(child, end_off, FOOTER_SIZE)
    from_copy = False
    try:
        footer = parse_footer(tail, path)
    except InvalidImageError as at_end:
        head = await _read(child, 0, FOOTER_SIZE)
        try:
            footer = parse_footer(head, path)
        except InvalidImageError:
            raise at_end from None
        if footer.disk_type == DiskType.FIXED:
            raise at_end from None
        log.warning("%s: %s; using the footer's copy at offset 0", path, at_end)
        from_copy = True
        # The last block ends where the file does: the footer goes after it.
        end_off = (fsize + SECTOR - 1) // SECTOR * SECTOR
    if footer.disk_type not in tuple(DiskType):
        raise UnsupportedImageError(f"{path}: footer disk type {footer.disk_type} is unknown")
    if footer.version >> 16 != VERSION >> 16:
        raise UnsupportedImageError(f"{path}: footer file format version 0x{footer.version:x}")
    size = footer.virtual_size()
    if size > MAX_SECTORS * SECTOR:
        raise InvalidImageError(f"{path}: footer current size {size} is over 2040 GiB")
    meta = VhdMeta(footer, fsize, size, end_off, from_copy)
    if footer.disk_type == DiskType.FIXED:
        if size > end_off:
            raise InvalidImageError(
                f"{path}: footer current size {size} runs past the end of the file ({end_off})"
            )
        return meta
    await _read_dynamic(child, meta, path)
    return meta


async def _read_dynamic(child: Driver, meta: VhdMeta, path: str) -> None:
    footer, end = meta.footer, meta.footer_offset
    doff = footer.data_offset
    if doff % SECTOR or doff < FOOTER_SIZE or doff + HEADER_SIZE > end:
        raise InvalidImageError(f"{path}: footer data offset 0x{doff:x} is outside the file")
    h = parse_header(await _read(child, doff, HEADER_SIZE), path)
    meta.header = h
    if h.version != VERSION:
        raise UnsupportedImageError(f"{path}: dynamic header version 0x{h.version:x}")
    bs = h.block_size
    if bs & (bs - 1) or not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE:
        raise InvalidImageError(
            f"{path}: dynamic header block size {bs} is not a power of two from "
            f"{MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        )
    n = h.max_table_entries
    if n > MAX_TABLE_ENTRIES:
        raise InvalidImageError(
            f"{path}: dynamic header max table entries {n} is over {MAX_TABLE_ENTRIES}"
        )
    if n * bs < meta.size:
        raise InvalidImageError(
            f"{path}: dynamic header max table entries {n} of {bs}-byte blocks cannot "
            f"map the disk's {meta.size} bytes"
        )
    toff = h.table_offset
    bat_bytes = n * 4
    if toff % SECTOR or toff < FOOTER_SIZE or toff + bat_bytes > end:
        raise InvalidImageError(
            f"{path}: BAT (table offset 0x{toff:x}, {n} entries) is past the end of the file"
        )
    bat = array("I", await _read(child, toff, bat_bytes))
    if bat.itemsize != 4:  # pragma: no cover - every platform we run on
        raise RuntimeError("array('I') is not 32-bit")
    if sys.byteorder == "little":
        bat.byteswap()
    meta.bat = bat
    bat_padded = (bat_bytes + SECTOR - 1) // SECTOR * SECTOR
    # Regions nobody else may use: footer copy, header, BAT, batmap, locator data.
    regions: list[tuple[int, int, str]] = [
        (0, FOOTER_SIZE, "the footer copy"),
        (doff, HEADER_SIZE, "the dynamic header"),
        (toff, bat_padded, "the BAT"),
    ]
    await _read_batmap(child, meta, toff + bat_padded, end, regions, path)
    if footer.disk_type == DiskType.DIFFERENCING:
        await _read_locators(child, meta, end, regions, path)
    _check_blocks(meta, regions, path)


async def _read_batmap(
    child: Driver,
    meta: VhdMeta,
    at: int,
    end: int,
    regions: list[tuple[int, int, str]],
    path: str,
) -> None:
    """blktap2's batmap (a bit per block: "fully allocated"), kept only if it checks out."""
    if at + SECTOR > end:
        return
    bh = parse_batmap_header(await _read(child, at, SECTOR))
    if bh is None:
        return
    nbytes = bh.sectors * SECTOR
    need = (len(meta.bat) + 7) // 8
    if bh.offset % SECTOR or nbytes < need or bh.offset + nbytes > end or nbytes > 1 << 20:
        log.warning("%s: batmap header out of bounds; ignoring the batmap", path)
        return
    data = await _read(child, bh.offset, nbytes)
    if batmap_checksum(data, bh.version) != bh.checksum:
        log.warning("%s: batmap checksum mismatch; ignoring the batmap", path)
        return
    meta.batmap = bytearray(data)
    meta.batmap_header = bh
    regions.append((at, SECTOR, "the batmap header"))
    regions.append((bh.offset, nbytes, "the batmap"))


def _windows_path(text: str) -> str | None:
    """A W2ku/W2ru path as a local one: a drive-letter path has no meaning here."""
    p = text.replace("\\", "/")
    if len(p) >= 2 and p[1] == ":":
        return None
    return p


async def _read_locators(
    child: Driver, meta: VhdMeta, end: int, regions: list[tuple[int, int, str]], path: str
) -> None:
    assert meta.header is not None
    found: list[tuple[int, str, str]] = []
    for i, loc in enumerate(meta.header.locators):
        if loc.code == PLAT_NONE:
            continue
        name = PLATFORM_NAMES.get(loc.code)
        if name is None:
            continue  # other platforms (Mac, Wi2r, Wi2k) are not resolved
        field_name = f"parent locator {i} ({name})"
        if loc.length == 0 or loc.length > MAX_LOCATOR_BYTES:
            raise InvalidImageError(f"{path}: {field_name}: data length {loc.length}")
        if loc.offset % SECTOR or loc.offset < FOOTER_SIZE or loc.offset + loc.length > end:
            raise InvalidImageError(
                f"{path}: {field_name}: data offset 0x{loc.offset:x} is outside the file"
            )
        regions.append((loc.offset, loc.length, field_name))
        raw = await _read(child, loc.offset, loc.length)
        try:
            if loc.code == PLAT_MACX:
                text = raw.rstrip(b"\0").decode("utf-8")
                if not text.startswith("file://"):
                    raise InvalidImageError(f"{path}: {field_name}: not a file:// URL")
                local: str | None = unquote(text[7:])
            else:
                local = _windows_path(raw.decode("utf-16-le").rstrip("\0"))
        except UnicodeDecodeError:
            raise InvalidImageError(f"{path}: {field_name}: not valid text") from None
        if not local or "\0" in local:
            continue
        # Try MacX first (blktap's), then the relative path, then the absolute one.
        rank = {PLAT_MACX: 0, PLAT_W2RU: 1, PLAT_W2KU: 2}[loc.code]
        found.append((rank, name, local))
    meta.parent_paths = [(name, p) for _r, name, p in sorted(found)]
    pname = meta.header.parent_name
    if pname and "\0" not in pname:
        meta.parent_paths.append(("parent unicode name", pname))


def _check_blocks(meta: VhdMeta, regions: list[tuple[int, int, str]], path: str) -> None:
    """Every block inside the file, none overlapping another or the metadata.

    With up to MAX_TABLE_ENTRIES blocks, this works on plain ints (sector << 32 | entry):
    one sorted list, no object per block, so a hostile BAT costs ~40 MiB and under a
    second at most.
    """
    assert meta.header is not None
    bs = meta.header.block_size
    span = bitmap_bytes(bs) + bs
    end = meta.footer_offset
    last = (end - span) // SECTOR  # the last sector a block may start at
    for i, e in enumerate(meta.bat):
        if e != BAT_UNUSED and e > last:
            raise InvalidImageError(
                f"{path}: BAT entry {i} (sector 0x{e:x}) is past the end of the file"
            )
    starts = sorted((e << 32) | i for i, e in enumerate(meta.bat) if e != BAT_UNUSED)
    prev_end, prev_i = -1, -1
    for k in starts:
        off, i = (k >> 32) * SECTOR, k & 0xFFFFFFFF
        if off < prev_end:
            raise InvalidImageError(
                f"{path}: BAT entry {i} at 0x{off:x} overlaps BAT entry {prev_i} (overlapping)"
            )
        prev_end, prev_i = off + span, i
    regions = sorted(regions)
    for (a, alen, aname), (b, _blen, bname) in itertools.pairwise(regions):
        if a + alen > b:
            raise InvalidImageError(f"{path}: {bname} at 0x{b:x} overlaps {aname} (overlapping)")
    for roff, rlen, rname in regions:
        # The last block starting before the region ends is the only one that can reach
        # into it: the blocks before it end before it starts.
        j = bisect.bisect_left(starts, ((roff + rlen + SECTOR - 1) // SECTOR) << 32) - 1
        if j >= 0:
            off, i = (starts[j] >> 32) * SECTOR, starts[j] & 0xFFFFFFFF
            if off + span > roff:
                raise InvalidImageError(
                    f"{path}: BAT entry {i} at 0x{off:x} overlaps {rname} (overlapping)"
                )
