"""Reading and checking a QCOW v1 image's fixed metadata: header, extension, L1 table.

Everything here runs once per open. Each failure raises an ImageError whose message
names the field at fault (QEMU qcow_open checks the same things, with the same limits).

References: ../shared/spec/blktap.md §1.1, §1.5, §1.7, §2.2, §2.3, §2.6.
"""

from __future__ import annotations

import itertools
import sys
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

from formats.qcow.geometry import MAX_BACKING_NAME, Geometry, l1_cksum, round_up
from formats.qcow.layout import (
    CRYPT_AES,
    CRYPT_NONE,
    EXT_OFFSET,
    EXT_SIZE,
    HEADER_SIZE,
    QCOW_VERSION,
    QcowHeader,
    XenExtension,
)
from tapnbd.errors import InvalidImageError, UnsupportedImageError

if TYPE_CHECKING:
    from tapnbd.driver import Driver

#: tapdisk reads the headers with one 512-byte (O_DIRECT) read.
HEAD_READ = 512
_LITTLE = sys.byteorder == "little"


def be_array(data: bytes | bytearray | memoryview) -> array[int]:
    """Big-endian 64-bit entries as a host-order ``array('Q')``."""
    a = array("Q")
    a.frombytes(data)
    if _LITTLE:
        a.byteswap()
    return a


def to_be_bytes(a: array[int]) -> bytes:
    """The inverse of be_array."""
    if not _LITTLE:
        return a.tobytes()
    b = array("Q", a)
    b.byteswap()
    return b.tobytes()


@dataclass(slots=True)
class QcowMeta:
    """An image's fixed metadata, checked against the file's size."""

    header: QcowHeader
    geometry: Geometry
    #: The Xen extension, when bytes 48-63 carry its magic.
    ext: XenExtension | None
    #: Whether tapdisk would honour the extension: "only if backing_file_offset == 0 and
    #: l1_table_offset % 4096 == 0" (spec §2.2).
    ext_applies: bool
    #: The L1 table in host order (converted if it was stored little-endian).
    l1: array[int]
    #: The L1 table's bytes exactly as on disk (what the checksum covers).
    l1_disk: bytes
    #: An "old tapdisk image": extension present, EXTHDR_L1_BIG_ENDIAN clear, and the
    #: table really is in little-endian (host) order.
    l1_native: bool
    #: MD5 checksum of the on-disk L1 table matches the extension's (None: not applicable).
    cksum_ok: bool | None
    backing_name: str | None
    file_size: int
    #: First byte past every fixed structure; L2 tables and data live at or beyond it.
    data_start: int

    @property
    def l1_end(self) -> int:
        return self.header.l1_table_offset + self.geometry.l1_size * 8

    @property
    def optimised(self) -> bool:
        """The extension asks for whole-extent allocation (min_cluster_alloc == l2_size)."""
        return (
            self.ext_applies
            and self.ext is not None
            and self.ext.min_cluster_alloc == self.geometry.l2_size
        )


def check_version_and_crypt(h: QcowHeader) -> None:
    if h.version != QCOW_VERSION:
        if h.version in (2, 3):
            raise UnsupportedImageError(
                f"version {h.version}: this is a qcow2 image, not QCOW version 1; tapnbd "
                "reads QCOW v1 only (convert it first, e.g. qemu-img convert -O qcow)"
            )
        raise InvalidImageError(f"version {h.version} is unknown (QCOW v1 is version 1)")
    if h.crypt_method == CRYPT_AES:
        raise UnsupportedImageError(
            "crypt_method 1: the image is encrypted (AES-CBC); encrypted images are not "
            "supported (decrypt it first, e.g. with qemu-img convert)"
        )
    if h.crypt_method != CRYPT_NONE:
        raise InvalidImageError(f"crypt_method {h.crypt_method} is unknown (0 none, 1 AES)")


def _plausible(l1: array[int], g: Geometry, start: int, file_size: int) -> bool:
    """Every L1 entry is 0 or points at an L2 table that fits in the file."""
    return all(e == 0 or (start <= e and e + g.l2_bytes <= file_size) for e in l1)


async def read_meta(child: Driver) -> QcowMeta:
    """Read and check the header, the extension, the backing name and the L1 table."""
    file_size = child.size()
    head = bytes(await child.pread(0, min(HEAD_READ, file_size))) if file_size else b""
    h = QcowHeader.parse(head)
    check_version_and_crypt(h)
    g = Geometry.from_header(h)

    # The extension counts only where tapdisk looked for it (spec §2.2).
    ext = XenExtension.parse(head)
    ext_applies = ext is not None and h.backing_file_offset == 0 and h.l1_table_offset % 4096 == 0
    fixed_end = EXT_OFFSET + EXT_SIZE if ext_applies else HEADER_SIZE

    l1_off, l1_len = h.l1_table_offset, g.l1_size * 8
    if l1_off < fixed_end:
        raise InvalidImageError(
            f"l1_table_offset 0x{l1_off:x} overlaps the header (bytes 0-{fixed_end - 1})"
        )
    if l1_off >= file_size:
        raise InvalidImageError(
            f"l1_table_offset 0x{l1_off:x} lies past the end of the file ({file_size} bytes)"
        )
    if l1_off + l1_len > file_size:
        raise InvalidImageError(
            f"L1 table (l1_size {g.l1_size} entries at l1_table_offset 0x{l1_off:x}) runs past "
            f"the end of the file ({file_size} bytes): the file is truncated"
        )
    data_start = l1_off + l1_len

    backing_name: str | None = None
    if h.backing_file_offset:
        off, n = h.backing_file_offset, h.backing_file_size
        if n > MAX_BACKING_NAME:
            raise InvalidImageError(
                f"backing_file_size {n} is too long (at most {MAX_BACKING_NAME} bytes)"
            )
        if off < HEADER_SIZE:
            raise InvalidImageError(f"backing_file_offset 0x{off:x} overlaps the header")
        if off + n > file_size:
            raise InvalidImageError(
                f"backing_file_offset 0x{off:x} (+{n} bytes) lies past the end of the file "
                f"({file_size} bytes)"
            )
        if off < l1_off + l1_len and l1_off < off + n:
            raise InvalidImageError(
                f"backing_file_offset 0x{off:x} (+{n} bytes) overlaps the L1 table"
            )
        if n:
            raw = bytes(await child.pread(off, n))
            backing_name = raw.decode("utf-8", "surrogateescape")
        data_start = max(data_start, off + n)

    l1_disk = bytes(await child.pread(l1_off, l1_len))
    l1 = be_array(l1_disk)
    l1_native = False
    if ext_applies and ext is not None and not ext.l1_big_endian:
        # "If EXTHDR_L1_BIG_ENDIAN is clear, treat the image as an old tapdisk image"
        # whose L1 is in host (little-endian) order. A conversion cut short by a crash
        # leaves the table big-endian with the flag still clear, so believe the flag only
        # when the little-endian reading is the plausible one.
        native = array("Q")
        native.frombytes(l1_disk)
        if not _LITTLE:  # pragma: no cover - tapdisk's images come from x86
            native.byteswap()
        if _plausible(native, g, data_start, file_size) or not _plausible(
            l1, g, data_start, file_size
        ):
            l1, l1_native = native, any(native)

    cksum_ok = None
    if ext_applies and ext is not None:
        cksum_ok = l1_cksum(l1_disk) == ext.cksum
    return QcowMeta(
        header=h,
        geometry=g,
        ext=ext,
        ext_applies=ext_applies,
        l1=l1,
        l1_disk=l1_disk,
        l1_native=l1_native,
        cksum_ok=cksum_ok,
        backing_name=backing_name,
        file_size=file_size,
        data_start=data_start,
    )


def l1_problems(meta: QcowMeta) -> list[str]:
    """Every L1 entry that points outside the file, into metadata, or at a shared table."""
    g, l1 = meta.geometry, meta.l1
    problems: list[str] = []
    seen: list[tuple[int, int]] = []
    for i, e in enumerate(l1):
        if not e:
            continue
        if e < meta.data_start:
            problems.append(
                f"L1 entry {i} (0x{e:x}) points into the header or L1 table "
                f"(which end at 0x{meta.data_start:x})"
            )
        elif e + g.l2_bytes > meta.file_size:
            problems.append(
                f"L1 entry {i} (0x{e:x}) points past the end of the file ({meta.file_size} bytes)"
            )
        else:
            seen.append((e, i))
    seen.sort()
    for (a, i), (b, j) in itertools.pairwise(seen):
        if b < a + g.l2_bytes:
            problems.append(
                f"L1 entries {i} and {j} point to overlapping L2 tables (0x{a:x} and 0x{b:x})"
            )
    return problems


def metadata_end(meta: QcowMeta) -> int:
    """Where allocation may start in a fresh image: the fixed metadata, page-rounded."""
    return round_up(meta.data_start, 4096)
