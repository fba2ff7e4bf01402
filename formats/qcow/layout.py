"""QCOW version 1 on-disk layout, and blktap's Xen extension header.

Only declarations live here: the two fixed structures, their constants and the L2 entry
masks. Everything is big-endian. The construct structs are parsed uncompiled (image files
are untrusted) and turned straight into frozen dataclasses, so construct's ``Container``
never leaks out of this module.

References: ../shared/spec/blktap.md §1.1 (header), §1.3 (entries), §2.1 (extension);
QEMU block/qcow.c ``QCowHeader``; blktap block-qcow.c ``QCowHeader_ext``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from construct import Const, ConstError, ConstructError, Int8ub, Int32ub, Int64ub, Padding, Struct

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


HEADER = "QCOW v1 header, 48 bytes, big-endian" * Struct(
    "magic" / Const(QCOW_MAGIC, Int32ub),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "mtime" / Int32ub,
    "size" / Int64ub,
    "cluster_bits" / Int8ub,
    "l2_bits" / Int8ub,
    Padding(2) * "implicit compiler padding, written as zero",
    "crypt_method" / Int32ub,
    "l1_table_offset" / Int64ub,
)

XEN_EXT = "blktap's extension at file offsets 48-63" * Struct(
    "xmagic" / Int32ub,
    "cksum" / Int32ub,
    "min_cluster_alloc" / Int32ub,
    "flags" / Int32ub,
)


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
        try:
            c = HEADER.parse(data[:HEADER_SIZE])
        except ConstError:
            magic = int.from_bytes(data[:4], "big")
            raise InvalidImageError(
                f"magic 0x{magic:08x} is not QCOW's 0x{QCOW_MAGIC:08x}: not a qcow image"
            ) from None
        except ConstructError as e:  # pragma: no cover - a fixed-size struct cannot fail otherwise
            raise InvalidImageError(f"unreadable QCOW header: {e}") from None
        return cls(
            version=c.version,
            backing_file_offset=c.backing_file_offset,
            backing_file_size=c.backing_file_size,
            mtime=c.mtime,
            size=c.size,
            cluster_bits=c.cluster_bits,
            l2_bits=c.l2_bits,
            crypt_method=c.crypt_method,
            l1_table_offset=c.l1_table_offset,
        )

    def build(self) -> bytes:
        return bytes(
            HEADER.build(
                {
                    "version": self.version,
                    "backing_file_offset": self.backing_file_offset,
                    "backing_file_size": self.backing_file_size,
                    "mtime": self.mtime,
                    "size": self.size,
                    "cluster_bits": self.cluster_bits,
                    "l2_bits": self.l2_bits,
                    "crypt_method": self.crypt_method,
                    "l1_table_offset": self.l1_table_offset,
                }
            )
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
        c = XEN_EXT.parse(data[EXT_OFFSET : EXT_OFFSET + EXT_SIZE])
        if c.xmagic != XEN_MAGIC:
            return None
        # Unknown bits are kept: an image from a later tapdisk must round-trip.
        return cls(cksum=c.cksum, min_cluster_alloc=c.min_cluster_alloc, flags=XenFlags(c.flags))

    def build(self) -> bytes:
        return bytes(
            XEN_EXT.build(
                {
                    "xmagic": XEN_MAGIC,
                    "cksum": self.cksum,
                    "min_cluster_alloc": self.min_cluster_alloc,
                    "flags": int(self.flags),
                }
            )
        )

    @property
    def sparse(self) -> bool:
        return bool(self.flags & XenFlags.SPARSE_FILE)

    @property
    def l1_big_endian(self) -> bool:
        return bool(self.flags & XenFlags.EXTHDR_L1_BIG_ENDIAN)
