"""VHD on-disk layout: the footer, the dynamic header, parent locators, blktap's batmap.

Declarations and pure functions only, big-endian throughout ("All values in the file
format, unless otherwise specified, are stored in network byte order (big endian)").

References: Microsoft's Virtual Hard Disk Image Format Specification 1.0 ("Hard Disk
Footer Format", "Dynamic Disk Header Format", Appendix "CHS Calculation"); blktap2's
vhd.h for the batmap; QEMU block/vpc.c for how sizes are read.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace

from formats.probes import FOOTER_COOKIE as FOOTER_COOKIE
from tapnbd.errors import InvalidImageError

SECTOR = 512
FOOTER_SIZE = 512
HEADER_SIZE = 1024
HEADER_COOKIE = b"cxsparse"
BATMAP_COOKIE = b"tdbatmap"
#: "File Format Version ... must be initialized to 0x00010000".
VERSION = 0x00010000
#: Features: "Reserved. This bit must always be set to 1."
FEATURE_RESERVED = 0x2
#: A fixed disk's footer "Data Offset ... should be set to 0xFFFFFFFF".
NO_OFFSET = 0xFFFFFFFFFFFFFFFF
#: A BAT entry with no block.
BAT_UNUSED = 0xFFFFFFFF
DEFAULT_BLOCK_SIZE = 2 << 20
MIN_BLOCK_SIZE = SECTOR
MAX_BLOCK_SIZE = 256 << 20
#: QEMU block/vpc.c VHD_MAX_SECTORS: "a maximum disk size of 2040 GiB".
MAX_SECTORS = 0xFF000000
#: The spec's largest geometry, 65535 cylinders, 16 heads, 255 sectors per track.
MAX_GEOMETRY = 65535 * 16 * 255
#: The bound on max_table_entries: 2040 GiB in the default 2 MiB blocks needs 1,044,480
#: (4 MiB of BAT). Smaller blocks serve proportionally smaller disks.
MAX_TABLE_ENTRIES = 1 << 20
#: Seconds from the Unix epoch to the VHD epoch, January 1, 2000 12:00:00 AM UTC.
VHD_EPOCH = 946684800
#: Parent locator data is a path: anything longer is refused.
MAX_LOCATOR_BYTES = 64 << 10
#: blktap2's batmap versions (vhd.h VHD_BATMAP_VERSION): 1.1 summed signed chars.
BATMAP_V1_1 = 0x00010001
BATMAP_V1_2 = 0x00010002


class DiskType(enum.IntEnum):
    FIXED = 2
    DYNAMIC = 3
    DIFFERENCING = 4


# Parent locator platform codes.
PLAT_NONE = 0
PLAT_W2KU = 0x57326B75  # "W2ku": absolute Windows path, UTF-16LE
PLAT_W2RU = 0x57327275  # "W2ru": relative Windows path, UTF-16LE
PLAT_MACX = 0x4D616358  # "MacX": a file URL, UTF-8 (what blktap writes)
PLATFORM_NAMES = {PLAT_W2KU: "W2ku", PLAT_W2RU: "W2ru", PLAT_MACX: "MacX"}

#: cookie, features, version, data offset, timestamp, creator app, creator version,
#: creator host OS, original size, current size, cylinders, heads, sectors per track,
#: disk type, checksum, unique id, saved state.
_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
#: cookie, data offset, table offset, version, max table entries, block size, checksum,
#: parent unique id, parent timestamp, reserved, parent unicode name.
_HEADER = struct.Struct(">8sQQIIII16sII512s")
#: platform code, data space, data length, reserved, data offset.
_LOCATOR = struct.Struct(">IIIIQ")
LOCATORS_OFFSET = _HEADER.size  # 576
#: cookie, batmap offset, size in sectors, version, checksum.
_BATMAP = struct.Struct(">8sQIII")
FOOTER_CHECKSUM_AT = 64
HEADER_CHECKSUM_AT = 36


def checksum(data: bytes | bytearray, skip_at: int) -> int:
    """ "The one's complement of the sum of all the bytes", the checksum field as zero."""
    total = sum(data) - sum(data[skip_at : skip_at + 4])
    return ~total & 0xFFFFFFFF


def chs(total_sectors: int) -> tuple[int, int, int]:
    """Cylinders, heads, sectors per track for a disk size (the spec's CHS appendix)."""
    total = min(total_sectors, MAX_GEOMETRY)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


@dataclass(frozen=True)
class Footer:
    features: int
    version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors: int
    disk_type: int
    checksum: int
    uuid: bytes
    saved_state: int

    def build(self) -> bytes:
        """The 512 bytes, with the checksum computed afresh."""
        raw = bytearray(FOOTER_SIZE)
        _FOOTER.pack_into(
            raw, 0, FOOTER_COOKIE, self.features, self.version, self.data_offset,
            self.timestamp, self.creator_app, self.creator_version, self.creator_os,
            self.original_size, self.current_size, self.cylinders, self.heads,
            self.sectors, self.disk_type, 0, self.uuid, self.saved_state,
        )  # fmt: skip
        raw[FOOTER_CHECKSUM_AT : FOOTER_CHECKSUM_AT + 4] = checksum(
            raw, FOOTER_CHECKSUM_AT
        ).to_bytes(4, "big")
        return bytes(raw)

    def virtual_size(self) -> int:
        """The disk's size as QEMU's vpc driver computes it (block/vpc.c ``vpc_open``).

        Virtual PC and QEMU's older images size the disk by its CHS geometry; Hyper-V,
        Disk2vhd, XenServer's blktap ('tap\\0'), XenConverter and QEMU's 'qem2' by the
        current size; a geometry at the spec's maximum means the current size too.
        """
        by_size = self.creator_app in (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
        geometry = self.cylinders * self.heads * self.sectors
        if by_size or geometry == MAX_GEOMETRY:
            return self.current_size // SECTOR * SECTOR
        return geometry * SECTOR


def parse_footer(raw: bytes, where: str) -> Footer:
    """The footer in ``raw`` (512 bytes), its cookie and checksum verified."""
    if len(raw) < FOOTER_SIZE:
        raise InvalidImageError(f"{where}: footer: file too short")
    f = _FOOTER.unpack_from(raw)
    if f[0] != FOOTER_COOKIE:
        raise InvalidImageError(f"{where}: footer cookie {f[0]!r} is not 'conectix'")
    footer = Footer(*f[1:])
    want = checksum(raw[:FOOTER_SIZE], FOOTER_CHECKSUM_AT)
    if footer.checksum != want:
        raise InvalidImageError(
            f"{where}: footer checksum 0x{footer.checksum:08x} does not match 0x{want:08x}"
        )
    return footer


@dataclass(frozen=True)
class Locator:
    code: int
    space: int
    length: int
    offset: int


@dataclass(frozen=True)
class Header:
    data_offset: int
    table_offset: int
    version: int
    max_table_entries: int
    block_size: int
    checksum: int
    parent_uuid: bytes
    parent_timestamp: int
    reserved: int
    parent_name_raw: bytes
    locators: tuple[Locator, ...] = ()

    @property
    def parent_name(self) -> str:
        """ "Parent Unicode Name ... a UTF-16 string", big-endian, NUL-padded."""
        raw = self.parent_name_raw
        n = 0
        while n + 1 < len(raw) and raw[n : n + 2] != b"\0\0":
            n += 2
        return raw[:n].decode("utf-16-be", errors="replace")

    def build(self) -> bytes:
        raw = bytearray(HEADER_SIZE)
        _HEADER.pack_into(
            raw, 0, HEADER_COOKIE, self.data_offset, self.table_offset, self.version,
            self.max_table_entries, self.block_size, 0, self.parent_uuid,
            self.parent_timestamp, self.reserved, self.parent_name_raw,
        )  # fmt: skip
        for i, loc in enumerate(self.locators[:8]):
            _LOCATOR.pack_into(
                raw, LOCATORS_OFFSET + i * _LOCATOR.size,
                loc.code, loc.space, loc.length, 0, loc.offset,
            )  # fmt: skip
        raw[HEADER_CHECKSUM_AT : HEADER_CHECKSUM_AT + 4] = checksum(
            raw, HEADER_CHECKSUM_AT
        ).to_bytes(4, "big")
        return bytes(raw)

    def with_locators(self, locators: tuple[Locator, ...]) -> Header:
        return replace(self, locators=locators)


def parse_header(raw: bytes, where: str) -> Header:
    """The dynamic disk header in ``raw`` (1024 bytes), cookie and checksum verified."""
    if len(raw) < HEADER_SIZE:
        raise InvalidImageError(f"{where}: dynamic header: past the end of the file")
    h = _HEADER.unpack_from(raw)
    if h[0] != HEADER_COOKIE:
        raise InvalidImageError(f"{where}: dynamic header cookie {h[0]!r} is not 'cxsparse'")
    locs = tuple(
        Locator(code, space, length, offset)
        for code, space, length, _res, offset in (
            _LOCATOR.unpack_from(raw, LOCATORS_OFFSET + i * _LOCATOR.size) for i in range(8)
        )
    )
    (_c, doff, toff, ver, n, bs, ck, puuid, pts, res, pname) = h
    header = Header(doff, toff, ver, n, bs, ck, puuid, pts, res, pname, locs)
    want = checksum(raw[:HEADER_SIZE], HEADER_CHECKSUM_AT)
    if header.checksum != want:
        raise InvalidImageError(
            f"{where}: dynamic header checksum 0x{header.checksum:08x} does not match 0x{want:08x}"
        )
    return header


@dataclass(frozen=True)
class BatmapHeader:
    offset: int
    sectors: int
    version: int
    checksum: int


def parse_batmap_header(raw: bytes) -> BatmapHeader | None:
    """blktap2's batmap header, or None when the cookie is absent."""
    if len(raw) < _BATMAP.size:
        return None
    cookie, off, size, version, ck = _BATMAP.unpack_from(raw)
    if cookie != BATMAP_COOKIE:
        return None
    return BatmapHeader(off, size, version, ck)


def batmap_checksum(data: bytes | bytearray, version: int) -> int:
    """blktap2's batmap checksum: version 1.1 summed the bytes as signed chars."""
    total = sum(data)
    if version == BATMAP_V1_1:
        total -= 256 * sum(1 for b in data if b >= 0x80)
    return ~total & 0xFFFFFFFF


def bitmap_bytes(block_size: int) -> int:
    """A block's sector bitmap, one bit per sector, "padded to a 512-byte sector boundary"."""
    nbytes = (block_size // SECTOR + 7) // 8
    return (nbytes + SECTOR - 1) // SECTOR * SECTOR
