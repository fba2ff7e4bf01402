"""Persistent dirty bitmaps in a qcow2 image: the bitmaps header extension, the bitmap
directory and each bitmap's table, read as hostile input.

A bitmap has one bit per ``granularity`` bytes of the guest disk; its table names one
cluster of bits per entry (0: all zeros; only bit 0 set: all ones). The extension is
only valid while ``autoclear_features`` bit 0 is set: "If this bit is not set, the
bitmaps extension data must be considered inconsistent" (qcow2.txt), and qemu then
treats the bitmaps' clusters as leaked. Every limit is qemu's (block/qcow2-bitmap.c), so
an image qemu wrote opens here and one it would refuse is refused by name.

References: QEMU docs/interop/qcow2.txt "Bitmaps extension"; block/qcow2-bitmap.c.
"""

from __future__ import annotations

import re
import struct
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

from formats.engine.tables import be_array
from tapnbd.errors import InvalidImageError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tapnbd.driver import Driver

#: The extension's data: nb_bitmaps, reserved (0), bitmap_directory_size and _offset.
EXT = struct.Struct(">IIQQ")
#: A directory entry's fixed part: bitmap_table_offset, bitmap_table_size, flags, type,
#: granularity_bits, name_size, extra_data_size; the name follows, then padding to 8.
ENTRY = struct.Struct(">QIIBBHI")
MAX_BITMAPS = 65535
MAX_DIRECTORY = 1024 * MAX_BITMAPS
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_NAME = 1023
MAX_TABLE = 0x8000000  # entries
MAX_PHYS = 0x20000000  # bytes of bits: qemu keeps a bitmap in memory whole
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
#: "Bits 2-31: Reserved (must be zero)" as qemu reads them (it implements no bit 2).
RESERVED_FLAGS = 0xFFFFFFFC
TYPE_DIRTY_TRACKING = 1
#: Table entries: bits 1-8 and 56-63 reserved, 9-55 the data cluster, bit 0 all ones.
TE_RESERVED = 0xFF000000000001FE
TE_OFFSET = 0x00FFFFFFFFFFFE00
TE_ALL_ONES = 1
_NOT_ZEROS = re.compile(rb"[^\x00]")
_NOT_ONES = re.compile(rb"[^\xff]")


@dataclass(frozen=True, slots=True)
class BitmapsExt:
    """The bitmaps header extension."""

    nb_bitmaps: int
    directory_size: int
    directory_offset: int

    def build(self) -> bytes:
        return EXT.pack(self.nb_bitmaps, 0, self.directory_size, self.directory_offset)


@dataclass(frozen=True, slots=True)
class Bitmap:
    """One directory entry."""

    name: str
    flags: int
    granularity_bits: int
    table_offset: int
    table_size: int

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        """Set while a writer has the bitmap open: after a crash its bits mean nothing."""
        return bool(self.flags & FLAG_IN_USE)

    @property
    def enabled(self) -> bool:
        """``auto``: writes to the image are tracked in it."""
        return bool(self.flags & FLAG_AUTO)

    def flag_names(self) -> list[str]:
        """As qemu-img info lists them."""
        return [n for f, n in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto")) if self.flags & f]

    def entry(self) -> bytes:
        name = self.name.encode("utf-8", "surrogateescape")
        out = ENTRY.pack(
            self.table_offset,
            self.table_size,
            self.flags,
            TYPE_DIRTY_TRACKING,
            self.granularity_bits,
            len(name),
            0,
        )
        out += name
        return out + bytes(-len(out) % 8)


def bitmap_bytes(size: int, granularity_bits: int) -> int:
    """Bytes of bits that cover ``size`` bytes of guest disk."""
    bits = -(-size >> granularity_bits)
    return -(-bits // 8)


def table_entries(size: int, granularity_bits: int, cluster_size: int) -> int:
    """Entries of the table of a bitmap over ``size`` bytes."""
    return -(-bitmap_bytes(size, granularity_bits) // cluster_size)


def parse_ext(data: bytes, cluster_size: int, file_size: int) -> BitmapsExt:
    """The extension's data, checked as qemu's qcow2_do_open checks it."""
    if len(data) != EXT.size:
        raise InvalidImageError(
            f"bitmaps extension: length {len(data)}, not {EXT.size}: the extension is invalid"
        )
    nb, reserved, dsize, doff = EXT.unpack(data)
    if reserved:
        raise InvalidImageError("bitmaps extension: the reserved field is not zero")
    if not 1 <= nb <= MAX_BITMAPS:
        raise InvalidImageError(f"bitmaps extension: nb_bitmaps {nb} is not in 1..{MAX_BITMAPS}")
    if not 1 <= dsize <= MAX_DIRECTORY:
        raise InvalidImageError(
            f"bitmaps extension: bitmap_directory_size {dsize} is not in 1..{MAX_DIRECTORY}"
        )
    if doff % cluster_size or doff < cluster_size or doff + dsize > file_size:
        raise InvalidImageError(
            f"bitmaps extension: bitmap_directory_offset 0x{doff:x} (+{dsize} bytes) is not a "
            f"cluster-aligned area inside the file ({file_size} bytes) past the header"
        )
    return BitmapsExt(nb, dsize, doff)


def parse_directory(data: bytes, ext: BitmapsExt, size: int, cluster_size: int) -> list[Bitmap]:
    """Every entry of the directory, each checked as qemu's check_dir_entry does."""
    out: list[Bitmap] = []
    pos = 0
    names: set[str] = set()
    while pos < len(data):
        if pos + ENTRY.size > len(data):
            raise InvalidImageError(f"bitmap directory: entry at {pos} runs past its end")
        toff, tsize, flags, btype, gbits, nsize, extra = ENTRY.unpack_from(data, pos)
        end = pos + ENTRY.size + extra + nsize
        end += -end % 8
        if end > len(data):
            raise InvalidImageError(f"bitmap directory: entry at {pos} runs past its end")
        if len(out) == ext.nb_bitmaps:
            raise InvalidImageError(
                f"bitmap directory: more entries than nb_bitmaps {ext.nb_bitmaps}"
            )
        at = f"bitmap directory entry {len(out)}"
        raw = data[pos + ENTRY.size + extra : pos + ENTRY.size + extra + nsize]
        name = raw.decode("utf-8", "surrogateescape")
        if extra:
            raise InvalidImageError(f"{at}: extra_data_size {extra}: extra data is not supported")
        if btype != TYPE_DIRTY_TRACKING:
            raise InvalidImageError(f"{at}: type {btype} is not a dirty tracking bitmap (1)")
        if flags & RESERVED_FLAGS:
            raise InvalidImageError(f"{at}: flags 0x{flags:x} has reserved bits set")
        if not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
            raise InvalidImageError(
                f"{at}: granularity_bits {gbits} is not in "
                f"{MIN_GRANULARITY_BITS}..{MAX_GRANULARITY_BITS}"
            )
        if not 1 <= nsize <= MAX_NAME:
            raise InvalidImageError(f"{at}: name_size {nsize} is not in 1..{MAX_NAME}")
        if name in names:
            raise InvalidImageError(f"{at}: the name {name!r} is used twice")
        if toff == 0 or toff % cluster_size:
            raise InvalidImageError(
                f"{at}: bitmap_table_offset 0x{toff:x} is not a cluster-aligned offset"
            )
        if not 1 <= tsize <= MAX_TABLE or tsize * cluster_size > MAX_PHYS:
            raise InvalidImageError(f"{at}: bitmap_table_size {tsize} is out of range")
        if not flags & FLAG_IN_USE and tsize != table_entries(size, gbits, cluster_size):
            # A bitmap left in use may have the size before a resize; its bits are unused.
            raise InvalidImageError(
                f"{at}: bitmap_table_size {tsize} does not cover the disk "
                f"({table_entries(size, gbits, cluster_size)} entries needed)"
            )
        names.add(name)
        out.append(Bitmap(name, flags, gbits, toff, tsize))
        pos = end
    if len(out) != ext.nb_bitmaps:
        raise InvalidImageError(
            f"bitmap directory: {len(out)} entries, and nb_bitmaps says {ext.nb_bitmaps}"
        )
    return out


async def read_directory(
    child: Driver, ext: BitmapsExt, size: int, cluster_size: int
) -> list[Bitmap]:
    data = bytes(await child.pread(ext.directory_offset, ext.directory_size))
    return parse_directory(data, ext, size, cluster_size)


async def read_table(child: Driver, bm: Bitmap, cluster_size: int, file_size: int) -> array[int]:
    """A bitmap's table, every entry checked (qemu's check_table_entry)."""
    n = bm.table_size * 8
    if bm.table_offset + n > file_size:
        raise InvalidImageError(
            f"bitmap {bm.name!r}: bitmap_table_offset 0x{bm.table_offset:x} (+{n} bytes) runs "
            "past the end of the file"
        )
    table = be_array(await child.pread(bm.table_offset, n))
    for i, e in enumerate(table):
        off = e & TE_OFFSET
        bad = (
            e & TE_RESERVED
            or (off and (e & TE_ALL_ONES or off % cluster_size or off + cluster_size > file_size))
            or (off and off < cluster_size)
        )
        if bad:
            raise InvalidImageError(f"bitmap {bm.name!r}: table entry {i} (0x{e:x}) is invalid")
    return table


def data_clusters(table: array[int]) -> Iterator[int]:
    """The offsets of the clusters of bits a table names."""
    for e in table:
        if e & TE_OFFSET:
            yield e & TE_OFFSET


async def read_bits(
    child: Driver,
    bm: Bitmap,
    size: int,
    cluster_size: int,
    file_size: int,
    table: array[int] | None = None,
) -> bytearray:
    """A bitmap's bits, ``bitmap_bytes(size)`` of them (bit j of byte i is granule 8i+j),
    through ``table`` if it was read already.

    Bounded by qemu's limit of MAX_PHYS bytes per bitmap, checked in the directory.
    """
    if table is None:
        table = await read_table(child, bm, cluster_size, file_size)
    total = bitmap_bytes(size, bm.granularity_bits)
    bits = bytearray(total)
    for i, e in enumerate(table):
        start = i * cluster_size
        if start >= total:
            break
        n = min(cluster_size, total - start)
        if e & TE_OFFSET:
            bits[start : start + n] = bytes(await child.pread(e & TE_OFFSET, n))
        elif e & TE_ALL_ONES:
            bits[start : start + n] = b"\xff" * n
    return bits


def set_granules(bits: bytearray, first: int, last: int) -> None:
    """Set granules ``first`` to ``last`` (inclusive)."""
    b0, b1 = first >> 3, last >> 3
    lo, hi = (0xFF << (first & 7)) & 0xFF, 0xFF >> (7 - (last & 7))
    if b0 == b1:
        bits[b0] |= lo & hi
        return
    bits[b0] |= lo
    if b1 > b0 + 1:
        bits[b0 + 1 : b1] = b"\xff" * (b1 - b0 - 1)
    bits[b1] |= hi


def granule_runs(bits: bytes | bytearray, first: int, last: int) -> Iterator[tuple[int, int, bool]]:
    """(first granule, count, set) of each run of equal bits from ``first`` to ``last``
    (inclusive); whole bytes of zeros or ones are passed over a byte at a time."""
    g = first
    while g <= last:
        value = bits[g >> 3] >> (g & 7) & 1
        start = g
        while g <= last:
            if not g & 7 and g + 7 <= last:
                # Whole bytes of the same bits, found at C speed.
                other = _NOT_ONES if value else _NOT_ZEROS
                m = other.search(bits, g >> 3, (last + 1) >> 3)
                nxt = m.start() << 3 if m else ((last + 1) >> 3) << 3
                if nxt > g:
                    g = nxt
                    continue
            if bits[g >> 3] >> (g & 7) & 1 != value:
                break
            g += 1
        yield start, g - start, bool(value)
