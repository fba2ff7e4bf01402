"""Pure helpers for QCOW v1 address arithmetic (spec §1.2, §1.3, §2.3).

No I/O here. Names follow QEMU's block/qcow.c and dissect's qcow2.py.

References: ../shared/spec/blktap.md §1.2-1.3, §2.3-2.4.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from formats.qcow.layout import QcowHeader
from tapnbd.errors import InvalidImageError

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 16
# QEMU qcow_open: "L2 table size must be between 512 and 64k" (l2_bits counts 8-byte entries)
MIN_L2_BITS = 9 - 3
MAX_L2_BITS = 16 - 3
#: QEMU qcow_open refuses l1_size > INT_MAX / sizeof(uint64_t) ("Image too large").
MAX_L1_SIZE = 0x7FFFFFFF // 8
#: "Backing file name too long" past this (QEMU qcow_open).
MAX_BACKING_NAME = 1023


def round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def l1_size_for(size: int, cluster_bits: int, l2_bits: int) -> int:
    """Entries in the L1 table: ``(size + (1 << shift) - 1) >> shift`` (spec §1.2)."""
    shift = cluster_bits + l2_bits
    return (size + (1 << shift) - 1) >> shift


def default_bits(cluster_size: int | None, backing: bool) -> tuple[int, int]:
    """(cluster_bits, l2_bits) for a new image.

    Without a choice: 512 B clusters and 4096-entry L2 tables with a backing file, 4 KiB
    and 512 otherwise, as both blktap and QEMU create them (spec §1.6). With a chosen
    cluster size the L2 table is made at least one cluster long, so that an extent's data
    clusters (which follow the table directly, spec §2.4) stay cluster-aligned.
    """
    if cluster_size is None:
        return (9, 12) if backing else (12, 9)
    cb = cluster_size.bit_length() - 1
    if cluster_size != 1 << cb or not MIN_CLUSTER_BITS <= cb <= MAX_CLUSTER_BITS:
        raise InvalidImageError(
            f"cluster size {cluster_size} must be a power of two from 512 to 65536"
        )
    return cb, max(12 if cb == 9 else 9, cb - 3)


def l1_cksum(l1_bytes: bytes) -> int:
    """The extension's ``cksum``: MD5 of the L1 table as it sits on disk (spec §2.3).

    "The first 4 bytes of the digest are copied into a host uint32_t, and that value is
    stored with cpu_to_be32." tapdisk ran on little-endian x86, so the value is the first
    four digest bytes read little-endian; stored big-endian they appear reversed on disk.
    """
    digest = hashlib.md5(l1_bytes, usedforsecurity=False).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass(frozen=True, slots=True)
class Geometry:
    """Sizes derived from a validated header."""

    size: int
    cluster_bits: int
    l2_bits: int
    l1_size: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_size(self) -> int:
        """Entries per L2 table."""
        return 1 << self.l2_bits

    @property
    def l2_bytes(self) -> int:
        return 8 << self.l2_bits

    @property
    def shift(self) -> int:
        """log2 of the virtual bytes one L1 entry covers."""
        return self.cluster_bits + self.l2_bits

    @property
    def l2_alloc(self) -> int:
        """File space an L2 table takes: its size rounded up to a cluster."""
        return round_up(self.l2_bytes, self.cluster_size)

    @property
    def extent_bytes(self) -> int:
        """An allocation-optimised extent: the L2 table followed by all its clusters.

        The data starts at ``l2_offset + l2_size * 8`` with no rounding (spec §2.4, the
        fast path), then pads to the next cluster for the next allocation.
        """
        return round_up(self.l2_bytes + (self.l2_size << self.cluster_bits), self.cluster_size)

    @property
    def cluster_offset_mask(self) -> int:
        """Mask of a compressed entry's byte offset: ``(1 << (63 - cluster_bits)) - 1``."""
        return (1 << (63 - self.cluster_bits)) - 1

    @classmethod
    def from_header(cls, h: QcowHeader) -> Geometry:
        """Check the header's geometry fields; every message names its field."""
        if h.size <= 1:
            # QEMU: "Image size is too small (must be at least 2 bytes)"
            raise InvalidImageError(f"size {h.size} is too small (must be at least 2 bytes)")
        if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
            raise InvalidImageError(
                f"cluster_bits {h.cluster_bits} is out of range: clusters must be 512 B to 64 KiB"
            )
        if not MIN_L2_BITS <= h.l2_bits <= MAX_L2_BITS:
            raise InvalidImageError(
                f"l2_bits {h.l2_bits} is out of range: L2 tables must be 512 B to 64 KiB"
            )
        shift = h.cluster_bits + h.l2_bits
        if h.size > (1 << 64) - 1 - (1 << shift):
            raise InvalidImageError(f"size {h.size} is absurd (image too large)")
        l1_size = l1_size_for(h.size, h.cluster_bits, h.l2_bits)
        if l1_size > MAX_L1_SIZE:
            raise InvalidImageError(
                f"size {h.size} needs an L1 table of {l1_size} entries; "
                f"at most {MAX_L1_SIZE} are supported (image too large)"
            )
        return cls(h.size, h.cluster_bits, h.l2_bits, l1_size)


def compressed_location(entry: int, g: Geometry) -> tuple[int, int]:
    """(byte offset, compressed length) of a compressed L2 entry (spec §1.3)."""
    return entry & g.cluster_offset_mask, (entry >> (63 - g.cluster_bits)) & (g.cluster_size - 1)
