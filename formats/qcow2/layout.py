"""qcow2 on-disk layout (versions 2 and 3): declarations only, big-endian throughout.

The header, the header extensions' framing, the feature name table and the snapshot
table entries, declared as ``struct`` formats (as QCOW v1's and VHD's are; construct's
import cost ``tapnbd info`` its start-up goal, and ``tests/formats/test_layouts.py``
checks these formats against construct declarations written from the spec) and turned
into frozen dataclasses; plus the constants and the L1/L2 entry masks the driver uses on
its hot path.

References: QEMU docs/interop/qcow2.txt ("Header", "Header extensions", "Cluster
mapping", "Snapshots"); QEMU block/qcow2.h.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from formats.probes import QCOW_MAGIC
from tapnbd.errors import InvalidImageError

#: "QFI\xfb", as QCOW v1.
QCOW2_MAGIC = QCOW_MAGIC
V2_HEADER_SIZE = 72
#: "header_length: Length of the header structure in bytes. For version 2 images, the
#: length is always assumed to be 72 bytes. For version 3 it's at least 104 bytes and
#: must be a multiple of 8."
V3_HEADER_SIZE = 104
#: With the compression type byte and its padding (what qemu writes today).
V3_HEADER_SIZE_COMPRESSION = 112

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
#: QEMU block/qcow2.h: QCOW_MAX_L1_SIZE (32 MiB of L1 table) and QCOW_MAX_REFTABLE_SIZE.
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_BACKING_NAME = 1023
#: QEMU block/qcow2.h: QCOW_MAX_SNAPSHOTS, and the table's size bound.
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOTS_BYTES = 64 << 20
#: qcow2.txt: refcount_order "may not exceed 6" (64-bit refcounts).
MAX_REFCOUNT_ORDER = 6

# L1 and L2 entries ("Cluster mapping").
#: Bits 9-55: an L2 table's or a data cluster's offset.
OFFSET_MASK = 0x00FFFFFFFFFFFE00
#: Bit 63: "0 for an L2 table that is unused or requires COW, 1 if its refcount is
#: exactly one" (the same for data clusters).
OFLAG_COPIED = 1 << 63
#: Bit 62: "0 for standard clusters, 1 for compressed clusters".
OFLAG_COMPRESSED = 1 << 62
#: Bit 0 of a standard L2 entry: "If set to 1, the cluster reads as all zeros" (v3).
OFLAG_ZERO = 1
#: Bits that must be zero in an L1 entry (1-8 and 56-62) and a standard L2 entry
#: (1-8 and 56-61).
L1E_RESERVED = 0x7F000000000001FF
L2E_RESERVED = 0x3F000000000001FE


class Incompatible(enum.IntFlag):
    """``incompatible_features``: an implementation must refuse bits it doesn't know."""

    DIRTY = 1 << 0
    CORRUPT = 1 << 1
    DATA_FILE = 1 << 2
    COMPRESSION = 1 << 3
    EXTL2 = 1 << 4


class Compatible(enum.IntFlag):
    """``compatible_features``: may be ignored."""

    LAZY_REFCOUNTS = 1 << 0


class Autoclear(enum.IntFlag):
    """``autoclear_features``: cleared by a writer that doesn't know them."""

    BITMAPS = 1 << 0
    DATA_FILE_RAW = 1 << 1


#: Names of the bits above, as qemu's feature name table spells them.
INCOMPATIBLE_NAMES = {
    0: "dirty bit",
    1: "corrupt bit",
    2: "external data file",
    3: "compression type",
    4: "extended L2 entries",
}
AUTOCLEAR_NAMES = {0: "bitmaps", 1: "raw external data"}


class Ext(enum.IntEnum):
    """Header extension types."""

    END = 0x00000000
    BACKING_FORMAT = 0xE2792ACA
    FEATURE_TABLE = 0x6803F857
    BITMAPS = 0x23852875
    CRYPTO = 0x0537BE77
    DATA_FILE = 0x44415441


COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1

#: The header, versions 2 and 3, bytes 0-71: magic, version, backing_file_offset,
#: backing_file_size, cluster_bits, size, crypt_method, l1_size, l1_table_offset,
#: refcount_table_offset, refcount_table_clusters, nb_snapshots, snapshots_offset.
HEADER_V2 = struct.Struct(">IIQIIQIIQQIIQ")
#: Version 3's additional fields, bytes 72-103: incompatible_features,
#: compatible_features, autoclear_features, refcount_order, header_length.
HEADER_V3 = struct.Struct(">QQQII")
#: A header extension's framing: type, length.
EXT_HEADER = struct.Struct(">II")
#: A feature name table entry: type, bit, name (46 bytes, NUL-padded).
FEATURE_NAME = struct.Struct(">BB46s")
#: A snapshot table entry's fixed part: l1_table_offset, l1_size, id_str_size,
#: name_size, date_sec, date_nsec, vm_clock_nsec, vm_state_size, extra_data_size.
SNAPSHOT = struct.Struct(">QIHHIIQII")
SNAPSHOT_FIXED = SNAPSHOT.size

#: The fields of HEADER_V2 after the magic and of HEADER_V3, as Qcow2Header names them.
_V2_FIELDS = (
    "version",
    "backing_file_offset",
    "backing_file_size",
    "cluster_bits",
    "size",
    "crypt_method",
    "l1_size",
    "l1_table_offset",
    "refcount_table_offset",
    "refcount_table_clusters",
    "nb_snapshots",
    "snapshots_offset",
)
_V3_FIELDS = (
    "incompatible_features",
    "compatible_features",
    "autoclear_features",
    "refcount_order",
    "header_length",
)

#: Byte offsets of header fields the driver rewrites.
REFTABLE_FIELDS_OFFSET = 48  # refcount_table_offset (8) + refcount_table_clusters (4)
INCOMPATIBLE_OFFSET = 72
AUTOCLEAR_OFFSET = 88


@dataclass(frozen=True, slots=True)
class Qcow2Header:
    """The header as numbers; v2 images get v3's fields at their implied values."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_SIZE
    compression_type: int = COMPRESSION_DEFLATE

    @classmethod
    def parse(cls, data: bytes) -> Qcow2Header:
        """Decode a header; a short file, a bad magic or a short v3 header fails here."""
        if len(data) < V2_HEADER_SIZE:
            raise InvalidImageError(
                f"file is {len(data)} bytes, shorter than the {V2_HEADER_SIZE}-byte qcow2 header"
            )
        magic, *v2 = HEADER_V2.unpack_from(data)
        if magic != QCOW2_MAGIC:
            raise InvalidImageError(
                f"magic 0x{magic:08x} is not qcow2's 0x{QCOW2_MAGIC:08x}: not a qcow2 image"
            )
        fields = dict(zip(_V2_FIELDS, v2, strict=True))
        if fields["version"] >= 3:
            if len(data) < V3_HEADER_SIZE:
                raise InvalidImageError(
                    f"file is {len(data)} bytes, shorter than the {V3_HEADER_SIZE}-byte "
                    "qcow2 version 3 header"
                )
            fields.update(zip(_V3_FIELDS, HEADER_V3.unpack_from(data, V2_HEADER_SIZE), strict=True))
            if fields["header_length"] > V3_HEADER_SIZE and len(data) > V3_HEADER_SIZE:
                fields["compression_type"] = data[V3_HEADER_SIZE]
        return cls(**fields)

    def build(self) -> bytes:
        """The header bytes: 72 for version 2, ``header_length`` for version 3."""
        out = HEADER_V2.pack(QCOW2_MAGIC, *(getattr(self, k) for k in _V2_FIELDS))
        if self.version < 3:
            return out
        out += HEADER_V3.pack(*(getattr(self, k) for k in _V3_FIELDS))
        if self.header_length > V3_HEADER_SIZE:
            out += bytes([self.compression_type]) + bytes(self.header_length - V3_HEADER_SIZE - 1)
        return out


def build_extension(ext_type: int, payload: bytes) -> bytes:
    """One header extension: type, length, data padded to a multiple of 8."""
    pad = -len(payload) % 8
    return EXT_HEADER.pack(ext_type, len(payload)) + payload + bytes(pad)


def parse_ext_header(data: bytes) -> tuple[int, int]:
    if len(data) < EXT_HEADER.size:
        raise InvalidImageError("a header extension runs past the header's cluster")
    ext_type, length = EXT_HEADER.unpack_from(data)
    return ext_type, length


def parse_feature_names(data: bytes) -> dict[tuple[int, int], str]:
    """The feature name table: (type, bit) -> name (type 0 incompatible, 1 compatible,
    2 autoclear)."""
    names: dict[tuple[int, int], str] = {}
    for i in range(0, len(data) - 47, 48):
        ftype, bit, name = FEATURE_NAME.unpack_from(data, i)
        names[(ftype, bit)] = name.rstrip(b"\0").decode("utf-8", "replace")
    return names


def build_feature_names() -> bytes:
    """The table qemu writes, for the features this layout knows."""
    out = b""
    for ftype, table in ((0, INCOMPATIBLE_NAMES), (2, AUTOCLEAR_NAMES)):
        for bit, name in table.items():
            out += FEATURE_NAME.pack(ftype, bit, name.encode())  # "s" pads with NULs
    return out + FEATURE_NAME.pack(1, 0, b"lazy refcounts")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One internal snapshot's table entry."""

    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None = None
    extra: bytes = field(default=b"", repr=False)

    @property
    def icount(self) -> int:
        """The guest's instruction count, extra data bytes 16-23; -1 if the entry has
        none (as stored: an unset count reads 2**64 - 1)."""
        return int.from_bytes(self.extra[16:24], "big") if len(self.extra) >= 24 else -1


def compressed_span(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, byte count) of a compressed cluster's data, from its L2 entry.

    "Number of additional 512-byte sectors used for the compressed data, beyond the
    sector containing the offset" (qcow2.txt).
    """
    shift = 62 - (cluster_bits - 8)
    off = entry & ((1 << shift) - 1)
    nsect = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return off, nsect * 512 - (off & 511)


def snapshot_entry_end(data: bytes, pos: int) -> int:
    """Where the entry at ``pos`` ends, before its padding: qemu counts a table up to
    there (the last entry's padding need not be in the file)."""
    fields = SNAPSHOT.unpack_from(data, pos)
    id_size, name_size, extra_size = int(fields[2]), int(fields[3]), int(fields[8])
    return pos + SNAPSHOT_FIXED + extra_size + id_size + name_size


def parse_snapshot(data: bytes, pos: int) -> tuple[Snapshot, int]:
    """The snapshot entry at ``pos`` of ``data`` and the position of the next one.

    Raises InvalidImageError when the entry runs past ``data``.
    """
    if pos + SNAPSHOT_FIXED > len(data):
        raise InvalidImageError("snapshot table entry runs past the table's end")
    (
        l1_table_offset,
        l1_size,
        id_str_size,
        name_size,
        date_sec,
        date_nsec,
        vm_clock_nsec,
        vm_state_size,
        extra_data_size,
    ) = SNAPSHOT.unpack_from(data, pos)
    p = pos + SNAPSHOT_FIXED
    end = p + extra_data_size + id_str_size + name_size
    if end > len(data):
        raise InvalidImageError(
            f"snapshot table entry (extra_data_size {extra_data_size}, id_str_size "
            f"{id_str_size}, name_size {name_size}) runs past the table's end"
        )
    extra = data[p : p + extra_data_size]
    p += extra_data_size
    id_str = data[p : p + id_str_size].decode("utf-8", "replace")
    p += id_str_size
    name = data[p : p + name_size].decode("utf-8", "replace")
    p += name_size
    # "vm_state_size_large" (8) then "disk_size" (8) in the extra data, if present.
    disk_size = int.from_bytes(extra[8:16], "big") if len(extra) >= 16 else None
    snap = Snapshot(
        l1_table_offset=l1_table_offset,
        l1_size=l1_size,
        id_str=id_str,
        name=name,
        date_sec=date_sec,
        date_nsec=date_nsec,
        vm_clock_nsec=vm_clock_nsec,
        vm_state_size=vm_state_size,
        disk_size=disk_size,
        extra=bytes(extra),
    )
    return snap, p + (-(p - pos) % 8)
