"""Reading and checking a QCOW v1 image's fixed metadata: header, extension, L1 table.

Everything here runs once per open. Each failure raises an ImageError whose message
names the field at fault (QEMU qcow_open checks the same things, with the same limits).

References: ../shared/spec/blktap.md §1.1, §1.5, §1.7, §2.2, §2.3, §2.6.
"""

from __future__ import annotations

import hashlib
import itertools
import operator
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from formats.engine.checks import MAX_LISTED, Problems
from formats.qcow.geometry import MAX_BACKING_NAME, Geometry, round_up
from formats.qcow.l1 import PIECE_BITS, L1Table, be_array, read_pieces, to_be_bytes
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
from tapnbd.errors import EncryptedImageError, InvalidImageError, UnsupportedImageError

if TYPE_CHECKING:
    from tapnbd.driver import Driver

__all__ = ["MAX_LISTED", "Problems", "QcowMeta", "be_array", "read_meta", "to_be_bytes"]

#: tapdisk reads the headers with one 512-byte (O_DIRECT) read.
HEAD_READ = 512
#: The Xen extension's MD5 is checked for L1 tables up to this size: 8 Mi entries, 16 TiB
#: at tapdisk's geometry, 0.1 s of hashing. A header may claim 2 GiB (3-5 s of MD5).
CKSUM_MAX_BYTES = 64 << 20


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
    backing_name: str | None
    file_size: int
    #: First byte past every fixed structure; L2 tables and data live at or beyond it.
    data_start: int
    #: The L1 table in host order (converted if it was stored little-endian); entries
    #: found bad by a check (``read_meta(problems=...)``) are left out, as zeros.
    l1: L1Table = field(default_factory=lambda: L1Table(0))
    #: An "old tapdisk image": extension present, EXTHDR_L1_BIG_ENDIAN clear, and the
    #: table really is in little-endian (host) order.
    l1_native: bool = False
    #: MD5 checksum of the on-disk L1 table matches the extension's (None: not applicable).
    cksum_ok: bool | None = None
    #: The L2 tables' offsets (the L1 entries in use), sorted: 8 bytes each.
    l2_tables: array[int] = field(default_factory=lambda: array("Q"))

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


def check_version_and_crypt(h: QcowHeader, *, encrypted_ok: bool = False) -> None:
    if h.version != QCOW_VERSION:
        if h.version in (2, 3):
            raise UnsupportedImageError(
                f"version {h.version}: this is a qcow2 image, not QCOW version 1; tapnbd "
                "reads QCOW v1 only (convert it first, e.g. qemu-img convert -O qcow)"
            )
        raise InvalidImageError(f"version {h.version} is unknown (QCOW v1 is version 1)")
    if h.crypt_method == CRYPT_AES and not encrypted_ok:
        raise EncryptedImageError(
            "crypt_method 1: the image is encrypted (AES-CBC); tapnbd holds no keys, so "
            "it can describe it (tapnbd info) but not read it: decrypt it first, e.g. with "
            "qemu-img convert"
        )
    if h.crypt_method not in (CRYPT_NONE, CRYPT_AES):
        raise InvalidImageError(f"crypt_method {h.crypt_method} is unknown (0 none, 1 AES)")


async def read_meta(
    child: Driver, problems: Problems | None = None, *, encrypted_ok: bool = False
) -> QcowMeta:
    """Read and check the header, the extension, the backing name and the L1 table.

    Without ``problems`` (an open) the first fault raises ImageError. With it (a check),
    faults of the L1 table are added to it and the bad entries are left out.
    """
    file_size = child.size()
    head = bytes(await child.pread(0, min(HEAD_READ, file_size))) if file_size else b""
    h = QcowHeader.parse(head)
    check_version_and_crypt(h, encrypted_ok=encrypted_ok)
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

    meta = QcowMeta(
        header=h,
        geometry=g,
        ext=ext,
        ext_applies=ext_applies,
        backing_name=backing_name,
        file_size=file_size,
        data_start=data_start,
    )
    native = False
    if ext_applies and ext is not None and not ext.l1_big_endian:
        # "If EXTHDR_L1_BIG_ENDIAN is clear, treat the image as an old tapdisk image"
        # whose L1 is in host (little-endian) order. A conversion cut short by a crash
        # leaves the table big-endian with the flag still clear, so believe the flag only
        # when the little-endian reading is the plausible one.
        be_ok, le_ok = await _plausible_orders(child, meta)
        native = le_ok or not be_ok
    # The checksum is the one pass over the whole claimed table (holes hashed as zeros):
    # past CKSUM_MAX_BYTES it is not checked, and the fast path must verify every extent.
    checked = ext_applies and l1_len <= CKSUM_MAX_BYTES
    md5 = hashlib.md5(usedforsecurity=False) if checked else None
    whole = await _load_l1(child, meta, native, md5, problems)
    meta.l1_native = native and bool(meta.l1.pieces)
    if md5 is not None and ext is not None and whole:
        meta.cksum_ok = int.from_bytes(md5.digest()[:4], "little") == ext.cksum
    return meta


def _entry_problem(meta: QcowMeta, i: int, e: int) -> str:
    """What is wrong with L1 entry ``i`` (an L2 table offset outside the data area)."""
    if e < meta.data_start:
        return (
            f"L1 entry {i} (0x{e:x}) points into the header or L1 table "
            f"(which end at 0x{meta.data_start:x})"
        )
    return f"L1 entry {i} (0x{e:x}) points past the end of the file ({meta.file_size} bytes)"


def _host_order(piece: bytes, native: bool) -> array[int]:
    """A piece's entries: big-endian, or an old tapdisk image's little-endian (x86)."""
    if not native:
        return be_array(piece)
    a = array("Q")
    a.frombytes(piece)
    if sys.byteorder != "little":  # pragma: no cover - tapdisk's images come from x86
        a.byteswap()
    return a


async def _plausible_orders(child: Driver, meta: QcowMeta) -> tuple[bool, bool]:
    """(big-endian, little-endian): does every entry of that reading fit in the file?"""
    be_ok = le_ok = True
    h, g = meta.header, meta.geometry
    lo, hi = meta.data_start, meta.file_size - meta.geometry.l2_bytes
    async for _, piece in read_pieces(child, h.l1_table_offset, g.l1_size):
        be = be_array(piece)
        le = _host_order(piece, True)
        be_ok = be_ok and all(e == 0 or lo <= e <= hi for e in be)
        le_ok = le_ok and all(e == 0 or lo <= e <= hi for e in le)
        if not be_ok and not le_ok:
            break
    return be_ok, le_ok


async def _load_l1(
    child: Driver,
    meta: QcowMeta,
    native: bool,
    md5: hashlib._Hash | None,
    problems: Problems | None,
) -> bool:
    """Read the L1 table in pieces into ``meta.l1``, checking every entry; False if it
    stopped early (a check of a table with too many entries).

    Each entry in use must point at its own L2 table inside the file, so a valid table
    has at most (file size - data start) / L2 table size of them: past that, tables must
    overlap and reading stops, which bounds memory by the file, not by the header.
    Entries in use cost 8 bytes in the table and 8 in the sorted list of L2 tables.
    """
    g = meta.geometry
    l1 = meta.l1 = L1Table(g.l1_size)
    room = max(0, meta.file_size - meta.data_start) // g.l2_bytes
    tables = _TableSorter(g.l2_bytes)
    used = 0
    report = problems if problems is not None else Problems(1)
    lo, hi = meta.data_start, meta.file_size - g.l2_bytes
    async for k, piece in read_pieces(child, meta.header.l1_table_offset, g.l1_size, md5):
        entries = _host_order(piece, native)
        base = k << PIECE_BITS
        # In C-speed passes where possible: a piece of 512 entries all in use and in range
        # (the usual case) or all out of range (16 Mi bad entries) is not looped over.
        zeros = entries.count(0)
        if not zeros and lo <= min(entries) and max(entries) <= hi:
            good: Sequence[int] = range(len(entries))
        elif min(entries) > hi or max(entries) < lo:
            good = ()
        else:
            good = [j for j, e in enumerate(entries) if lo <= e <= hi]
        bad = len(entries) - zeros - len(good)
        if bad:
            if problems is None:
                j = next(j for j, e in enumerate(entries) if e and not lo <= e <= hi)
                raise InvalidImageError(_entry_problem(meta, base + j, entries[j]))
            if report.full:
                report.count += bad
            else:
                for j, e in enumerate(entries):
                    if e and not lo <= e <= hi:
                        report.add(_entry_problem(meta, base + j, e))
            kept = array("Q", bytes(8 * len(entries)))
            for j in good:
                kept[j] = entries[j]
            entries = kept
        used += len(good)
        if used > room:
            report.add(
                f"L1 table (l1_size {g.l1_size}): more than {room} entries are in use, more "
                "L2 tables than the file can hold, so some overlap; the rest is not read"
            )
            if problems is None:
                raise InvalidImageError(report.summary())
            meta.l2_tables = tables.sorted()
            return False
        if good:
            l1.pieces[k] = entries
            tables.add(entries if bad == 0 and not zeros else [entries[j] for j in good])
    meta.l2_tables = tables.sorted()
    l2_bytes, t = g.l2_bytes, meta.l2_tables
    if len(t) < 2 or min(map(operator.sub, itertools.islice(t, 1, None), t)) >= l2_bytes:
        return True  # no two tables closer than a table's length (a C-speed pass)
    for a, b in itertools.pairwise(t):
        if b < a + l2_bytes:
            if report.full:  # finding the indices is a scan of the table: only to list
                report.count += 1
                continue
            i = _index_of(l1, a)
            j = _index_of(l1, b, not_index=i)
            report.add(
                f"L1 entries {i} and {j} point to overlapping L2 tables (0x{a:x} and 0x{b:x})"
            )
            if problems is None:
                raise InvalidImageError(report.summary())
    return True


def _index_of(l1: L1Table, entry: int, not_index: int = -1) -> int:
    """The first L1 index holding ``entry`` (other than ``not_index``): for messages."""
    return next(i for i, e in l1.items() if e == entry and i != not_index)


class _TableSorter:
    """L2 table offsets, sorted without a Python int per entry.

    ``sorted()`` of 8 Mi offsets builds 8 Mi int objects (320 MiB). Here offsets go into
    buckets of ``2**16`` table lengths, kept as ``array('Q')``, and each bucket is sorted
    alone: a bucket of tables that do not overlap holds at most 2**16 + 1 of them.
    """

    SPAN_TABLES = 1 << 16

    def __init__(self, l2_bytes: int) -> None:
        self.width = l2_bytes * self.SPAN_TABLES
        self.buckets: dict[int, array[int]] = {}

    def add(self, offsets: Sequence[int]) -> None:
        buckets, width = self.buckets, self.width
        k = min(offsets) // width
        if max(offsets) // width == k:  # the usual case: a piece's tables lie together
            b = buckets.get(k)
            if b is None:
                b = buckets[k] = array("Q")
            b.extend(offsets)
            return
        for e in offsets:
            b = buckets.get(e // width)
            if b is None:
                b = buckets[e // width] = array("Q")
            b.append(e)

    def sorted(self) -> array[int]:
        out = array("Q")
        for k in sorted(self.buckets):
            b = self.buckets.pop(k)
            if len(b) > self.SPAN_TABLES + 1:
                # Overlap for certain; sorting a prefix big enough to show a pair keeps
                # the cost bounded (an image whose entries all name one table).
                b = b[: self.SPAN_TABLES + 2]
            out.extend(sorted(b))
        return out


def metadata_end(meta: QcowMeta) -> int:
    """Where allocation may start in a fresh image: the fixed metadata, page-rounded."""
    return round_up(meta.data_start, 4096)
