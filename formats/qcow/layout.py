"""QCOW version 1 on-disk layout, and blktap's Xen extension header.

Only declarations live here: the two fixed structures, their constants and the L2 entry
masks. Everything is big-endian. The structures are ``struct`` formats, as VHD's are,
turned straight into frozen dataclasses (construct declared them until its import, about
34 ms, put ``tapnbd info`` over its start-up goal; ``tests/formats/test_layouts.py``
still checks these formats against construct declarations written from the spec).

References: ../shared/spec/blktap.md §1.1 (header), §1.3 (entries), §2.1 (extension);
QEMU block/qcow.c ``QCowHeader``; blktap block-qcow.c ``QCowHeader_ext``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from formats.probes import QCOW_MAGIC as QCOW_MAGIC
from formats.probes import QCOW_VERSION as QCOW_VERSION
from tapnbd.errors import InvalidImageError

#: ('X'<<24)|('E'<<16)|('N'<<8)|0xFB: bytes "XEN\xfb".
XEN_MAGIC = 0x58454EFB

HEADER_SIZE = 48
EXT_OFFSET = 48
EXT_SIZE = 16
#: "tdqcow_close rewrites it at offset sizeof(QCowHeader) + sizeof(uint32_t) = 52"
CKSUM_OFFSET = 52
FLAGS_OFFSET = 60

CRYPT_NONE = 0
CRYPT_AES = 1

#: L2 entry bit 63: the cluster is compressed (spec §1.3).
QCOW_OFLAG_COMPRESSED = 1 << 63


class XenFlags(enum.IntFlag):
    """Bits of the extension's ``flags`` word (spec §2.1)."""

    NONE = 0
    SPARSE_FILE = 0x01
    EXTHDR_L1_BIG_ENDIAN = 0x02


#: The 48-byte header: magic, version, backing_file_offset, backing_file_size, mtime,
#: size, cluster_bits, l2_bits, the C compiler's 2 bytes of padding (written as zero),
#: crypt_method, l1_table_offset.
HEADER = struct.Struct(">IIQIIQBB2xIQ")
#: blktap's extension at file offsets 48-63: xmagic, cksum, min_cluster_alloc, flags.
XEN_EXT = struct.Struct(">IIII")


@dataclass(frozen=True, slots=True)
class QcowHeader:
    """The 48-byte header, as numbers (validation is the opener's job)."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    mtime: int
    size: int
    cluster_bits: int
    l2_bits: int
    crypt_method: int
    l1_table_offset: int

    @classmethod
    def parse(cls, data: bytes) -> QcowHeader:
        """Decode the first 48 bytes; only a short file or a bad magic fails here."""
        if len(data) < HEADER_SIZE:
            raise InvalidImageError(
                f"file is {len(data)} bytes, shorter than the {HEADER_SIZE}-byte QCOW header"
            )
        magic, *fields = HEADER.unpack_from(data)
        if magic != QCOW_MAGIC:
            raise InvalidImageError(
                f"magic 0x{magic:08x} is not QCOW's 0x{QCOW_MAGIC:08x}: not a qcow image"
            )
        return cls(*fields)

    def build(self) -> bytes:
        return HEADER.pack(
            QCOW_MAGIC,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.mtime,
            self.size,
            self.cluster_bits,
            self.l2_bits,
            self.crypt_method,
            self.l1_table_offset,
        )


@dataclass(frozen=True, slots=True)
class XenExtension:
    """blktap's 16-byte extension (present when ``xmagic`` matches)."""

    cksum: int
    min_cluster_alloc: int
    flags: XenFlags

    @classmethod
    def parse(cls, data: bytes) -> XenExtension | None:
        """Decode bytes 48-63 of the file; None when the Xen magic is absent."""
        if len(data) < EXT_OFFSET + EXT_SIZE:
            return None
        xmagic, cksum, min_cluster_alloc, flags = XEN_EXT.unpack_from(data, EXT_OFFSET)
        if xmagic != XEN_MAGIC:
            return None
        # Unknown bits are kept: an image from a later tapdisk must round-trip.
        return cls(cksum=cksum, min_cluster_alloc=min_cluster_alloc, flags=XenFlags(flags))

    def build(self) -> bytes:
        return XEN_EXT.pack(XEN_MAGIC, self.cksum, self.min_cluster_alloc, int(self.flags))

    @property
    def sparse(self) -> bool:
        return bool(self.flags & XenFlags.SPARSE_FILE)

    @property
    def l1_big_endian(self) -> bool:
        return bool(self.flags & XenFlags.EXTHDR_L1_BIG_ENDIAN)
