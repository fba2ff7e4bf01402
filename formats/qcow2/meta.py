"""Reading and checking a qcow2 image's fixed metadata at open.

Header, header extensions, backing name, L1 table, refcount table and snapshot table.
Everything here runs once per open, and every refusal names the field at fault. What is
read is bounded by the file's size and by QEMU's own limits (32 MiB of L1 table, 8 MiB
of refcount table, 64 MiB of snapshot table), so any header opens or is refused quickly
and in bounded memory.

References: QEMU docs/interop/qcow2.txt; QEMU block/qcow2.c ``qcow2_do_open``.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from formats.engine.tables import be_array
from formats.qcow2.bitmaps import Bitmap, BitmapsExt, parse_ext, read_directory
from formats.qcow2.layout import (
    AUTOCLEAR_NAMES,
    COMPRESSION_DEFLATE,
    COMPRESSION_ZSTD,
    INCOMPATIBLE_NAMES,
    L1E_RESERVED,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MAX_REFCOUNT_ORDER,
    MAX_REFTABLE_BYTES,
    MAX_SNAPSHOTS,
    MAX_SNAPSHOTS_BYTES,
    MIN_CLUSTER_BITS,
    OFFSET_MASK,
    V2_HEADER_SIZE,
    V3_HEADER_SIZE,
    Autoclear,
    Ext,
    Incompatible,
    Qcow2Header,
    Snapshot,
    parse_ext_header,
    parse_feature_names,
    parse_snapshot,
)
from tapnbd.errors import EncryptedImageError, InvalidImageError, UnsupportedImageError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tapnbd.driver import Driver


@dataclass(slots=True)
class Qcow2Meta:
    """An image's fixed metadata, checked against the file's size."""

    header: Qcow2Header
    file_size: int
    l1: array[int]
    reftable: array[int]
    backing_name: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    snapshots: list[Snapshot] = field(default_factory=list)
    #: Bytes of the snapshot table its entries take (up to the last one's padding).
    snapshots_size: int = 0
    #: Header extensions present, by type (unknown ones are kept as they are).
    extensions: list[int] = field(default_factory=list)
    #: The bitmaps extension, if present and valid (its autoclear bit set), and the
    #: bitmaps its directory lists.
    bitmaps_ext: BitmapsExt | None = None
    bitmaps: list[Bitmap] = field(default_factory=list)
    #: (offset, length) of an encrypted image's crypto header (LUKS), in its clusters.
    crypto_area: tuple[int, int] | None = None
    #: On a writable open, the host clusters (indices) of the metadata above
    #: (``claim_metadata``), to which the driver adds the live bitmaps' bits.
    metadata: set[int] = field(default_factory=set)

    @property
    def cluster_bits(self) -> int:
        return self.header.cluster_bits

    @property
    def cluster_size(self) -> int:
        return 1 << self.header.cluster_bits


def l1_entries_needed(size: int, cluster_bits: int) -> int:
    """L1 entries that map ``size`` bytes: one per L2 table of cluster_size / 8 entries."""
    shift = cluster_bits + cluster_bits - 3
    return (size + (1 << shift) - 1) >> shift


def feature_name(meta_names: dict[tuple[int, int], str], ftype: int, bit: int) -> str:
    known = (INCOMPATIBLE_NAMES if ftype == 0 else AUTOCLEAR_NAMES).get(bit)
    return meta_names.get((ftype, bit)) or known or f"unknown feature bit {bit}"


def check_walkable(meta: Qcow2Meta, path: str) -> None:
    """Refuse, by name, what the tools that count every reference cannot walk (check,
    snapshot, bitmap, amend): they would call its clusters leaks, or free them. An
    external data file holds the data clusters elsewhere, extended L2 entries are 16
    bytes, and an unknown bit may mean anything."""
    bits = meta.header.incompatible_features
    for bit in range(64):
        if bits & (1 << bit) and bit not in (0, 1, 3):  # dirty, corrupt, compression type
            raise UnsupportedImageError(
                f"{path}: incompatible feature '{feature_name(meta.feature_names, 0, bit)}' "
                f"(incompatible_features bit {bit}) is not supported here"
            )
    if Ext.DATA_FILE in meta.extensions:
        raise UnsupportedImageError(
            f"{path}: header extension 'external data file' is not supported here"
        )


def check_features(meta: Qcow2Meta, read_only: bool, *, encrypted_ok: bool = False) -> None:
    """Refuse by name every incompatible feature this driver doesn't implement.

    "If an unknown bit is set in incompatible_features, the image must not be opened"
    (qcow2.txt); the known ones we don't implement are refused the same way.
    """
    h = meta.header
    bits = h.incompatible_features
    if bits & Incompatible.CORRUPT and not read_only:
        raise UnsupportedImageError(
            "incompatible_features has the corrupt bit set: qemu found the metadata "
            "inconsistent; open it read-only, or repair it (qemu-img check -r all)"
        )
    if bits & Incompatible.DIRTY and not read_only:
        raise UnsupportedImageError(
            "incompatible_features has the dirty bit set (lazy refcounts, not closed "
            "cleanly): the refcounts may be wrong; repair them first with "
            "`tapnbd check --repair` or `qemu-img check -r all`, or open it read-only"
        )
    if bits & Incompatible.COMPRESSION or h.compression_type != COMPRESSION_DEFLATE:
        kind = (
            "zstd"
            if h.compression_type == COMPRESSION_ZSTD
            else f"compression_type {h.compression_type}"
        )
        raise UnsupportedImageError(
            f"incompatible feature 'compression type' ({kind}): only deflate-compressed "
            "clusters are supported (convert it: qemu-img convert -O qcow2 -o "
            "compression_type=zlib)"
        )
    for bit in range(64):
        if bits & (1 << bit) and bit not in (0, 1, 3):
            raise UnsupportedImageError(
                f"incompatible feature '{feature_name(meta.feature_names, 0, bit)}' "
                f"(incompatible_features bit {bit}) is not supported"
            )
    if h.crypt_method > 2:
        raise InvalidImageError(f"crypt_method {h.crypt_method} is unknown (0 none, 1 AES, 2 LUKS)")
    if h.crypt_method == 2 and meta.crypto_area is None:
        raise InvalidImageError("crypt_method 2 (LUKS) without a crypto header extension")
    if h.crypt_method and not encrypted_ok:
        raise EncryptedImageError(
            f"crypt_method {h.crypt_method}: the image is encrypted "
            f"({'AES' if h.crypt_method == 1 else 'LUKS'}); tapnbd holds no keys, so it "
            "can describe it (tapnbd info) but not read it: decrypt it first, e.g. with "
            "qemu-img convert"
        )
    if Ext.DATA_FILE in meta.extensions:
        raise UnsupportedImageError("header extension 'external data file' is not supported")
    if not read_only:
        check_refcount_blocks(meta)
        meta.metadata = claim_metadata(meta)


def refcount_block_problem(meta: Qcow2Meta, boff: int) -> str:
    """What is wrong with a refcount block at ``boff`` ('' if nothing): a writer updates
    refcounts there, so a block in the header cluster, the L1 table or the refcount
    table would have the guest's allocations write over them (qemu refuses the same:
    "Refblock offset ... unaligned", and its overlap check)."""
    h, cs = meta.header, meta.cluster_size
    l1_end = h.l1_table_offset + h.l1_size * 8
    rt_end = h.refcount_table_offset + h.refcount_table_clusters * cs
    if boff % cs:
        return f"is not aligned to the cluster size {cs}"
    if boff < cs:
        return "points into the header (the first cluster)"
    if boff + cs > meta.file_size:
        return f"points past the end of the file ({meta.file_size} bytes)"
    if boff < l1_end and h.l1_table_offset < boff + cs:
        return "points into the L1 table"
    if boff < rt_end and h.refcount_table_offset < boff + cs:
        return "points into the refcount table"
    return ""


def check_refcount_blocks(meta: Qcow2Meta) -> None:
    """Refuse, naming the entry, a refcount table entry a writer may not use."""
    for i, e in enumerate(meta.reftable):
        boff = e & OFFSET_MASK
        why = refcount_block_problem(meta, boff) if boff else ""
        if why:
            raise InvalidImageError(f"refcount table entry {i} (0x{e:x}) {why}")


def metadata_areas(meta: Qcow2Meta) -> Iterator[tuple[str, int, int, int]]:
    """(what, entry, offset, length) of each piece of the image's own metadata as read
    at open: the header cluster, the L1 and refcount tables, the refcount blocks, each
    L2 table the L1 table names (once), the snapshot table and each snapshot's L1
    table, the bitmap directory and each bitmap's table, and a LUKS header. ``what``
    names it with ``.format(entry)`` (a string per piece only when one is shown: an
    image may have millions of L2 tables). Lengths are clipped to the file."""
    h, cs, size = meta.header, meta.cluster_size, meta.file_size

    def areas() -> Iterator[tuple[str, int, int, int]]:
        yield "the header", 0, 0, cs
        yield "the L1 table", 0, h.l1_table_offset, h.l1_size * 8
        yield "the refcount table", 0, h.refcount_table_offset, h.refcount_table_clusters * cs
        for i, e in enumerate(meta.reftable):
            if e & OFFSET_MASK:
                yield "refcount table entry {}'s refcount block", i, e & OFFSET_MASK, cs
        # Two L1 entries may name one L2 table: the guest's own aliasing, not a collision.
        first: dict[int, int] = {}
        for i, e in enumerate(meta.l1):
            if e & OFFSET_MASK:
                first.setdefault(e & OFFSET_MASK, i)
        for off, i in first.items():
            yield "L1 entry {}'s L2 table", i, off, cs
        if meta.snapshots:
            yield "the snapshot table", 0, h.snapshots_offset, meta.snapshots_size
        for i, snap in enumerate(meta.snapshots):
            name = _literal(repr(snap.name))
            yield f"snapshot {name}'s L1 table", i, snap.l1_table_offset, snap.l1_size * 8
        if meta.bitmaps_ext is not None:
            ext = meta.bitmaps_ext
            yield "the bitmap directory", 0, ext.directory_offset, ext.directory_size
        for i, bm in enumerate(meta.bitmaps):
            yield f"bitmap {_literal(repr(bm.name))}'s table", i, bm.table_offset, bm.table_size * 8
        if meta.crypto_area is not None:
            yield "the LUKS header", 0, *meta.crypto_area

    for what, entry, off, n in areas():
        n = min(n, size - off)
        if n > 0:
            yield what, entry, off, n


def _literal(text: str) -> str:
    """``text`` inside a ``str.format`` template (a name from the image may hold braces)."""
    return text.replace("{", "{{").replace("}", "}}")


def claim_metadata(meta: Qcow2Meta) -> set[int]:
    """The host clusters (indices) of the image's metadata (``metadata_areas``), each
    checked to hold one piece only: a writer lets no guest data land there, and refuses
    an image whose tables share a cluster, naming both (a write to one would rewrite
    the other: an L2 table on a refcount block turns guest allocations into refcounts).
    qemu refuses the same writes with its overlap check, in its default "cached" mode,
    which does not read the snapshots' L2 tables either. Each cluster is taken once and a
    second claim stops the walk, so the work is bounded by the file's clusters."""
    cb = meta.cluster_bits
    owner: dict[int, int] = {}  # cluster -> which piece (its place in the walk)
    pieces: list[tuple[str, int]] = []
    for what, entry, off, n in metadata_areas(meta):
        piece = len(pieces)
        pieces.append((what, entry))
        for c in range(off >> cb, ((off + n - 1) >> cb) + 1):
            other = owner.setdefault(c, piece)
            if other != piece:
                theirs, their_entry = pieces[other]
                raise InvalidImageError(
                    f"{what.format(entry)} and {theirs.format(their_entry)} share the "
                    f"cluster at 0x{c << cb:x}: a write to one would rewrite the other"
                )
    return set(owner)


async def read_meta(child: Driver, bad_l1: list[str] | None = None) -> Qcow2Meta:
    """Read and check the header, its extensions, the L1 and refcount tables.

    With ``bad_l1``, bad L1 entries are listed there and left out instead of refused.
    """
    file_size = child.size()
    head_len = min(file_size, 1 << MIN_CLUSTER_BITS)
    head = bytes(await child.pread(0, head_len)) if head_len else b""
    h = Qcow2Header.parse(head)
    if h.version not in (2, 3):
        raise UnsupportedImageError(f"version {h.version} is not a qcow2 version (2 or 3)")
    cb = h.cluster_bits
    if not MIN_CLUSTER_BITS <= cb <= MAX_CLUSTER_BITS:
        raise InvalidImageError(
            f"cluster_bits {cb} out of range (cluster size must be 512 B to 2 MiB: "
            f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})"
        )
    cs = 1 << cb
    if h.version >= 3:
        if h.header_length < V3_HEADER_SIZE or h.header_length % 8:
            raise InvalidImageError(
                f"header_length {h.header_length} must be at least {V3_HEADER_SIZE} and a "
                "multiple of 8"
            )
        if h.header_length > cs:
            raise InvalidImageError(
                f"header_length {h.header_length} is larger than the cluster size {cs}"
            )
        if h.refcount_order > MAX_REFCOUNT_ORDER:
            raise InvalidImageError(
                f"refcount_order {h.refcount_order} is larger than {MAX_REFCOUNT_ORDER}"
            )
    # The first cluster holds the header, its extensions and the backing name.
    if file_size > head_len:
        head = bytes(await child.pread(0, min(file_size, cs)))
    meta = Qcow2Meta(h, file_size, array("Q"), array("Q"))
    _read_extensions(meta, head, cs)
    _read_backing_name(meta, head, cs)
    max_size = (MAX_L1_BYTES // 8) << (cb + cb - 3)
    if h.size > max_size:
        raise InvalidImageError(
            f"size {h.size} is too large for cluster size {cs} (at most {max_size}: the L1 "
            f"table would exceed {MAX_L1_BYTES} bytes)"
        )

    # L1 table.
    need = l1_entries_needed(h.size, cb)
    if h.l1_size < need:
        raise InvalidImageError(
            f"l1_size {h.l1_size} is too small for size {h.size} (needs {need} entries)"
        )
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise InvalidImageError(
            f"l1_size {h.l1_size} is too large (at most {MAX_L1_BYTES // 8} entries)"
        )
    _check_area(
        "l1_table_offset", h.l1_table_offset, h.l1_size * 8, cs, file_size, allow_empty=True
    )
    # Reading is bounded by the file: the area was checked to lie inside it.
    if h.l1_size:
        meta.l1 = be_array(await child.pread(h.l1_table_offset, h.l1_size * 8))

    # Refcount table.
    rt_bytes = h.refcount_table_clusters * cs
    if rt_bytes > MAX_REFTABLE_BYTES:
        raise InvalidImageError(
            f"refcount_table_clusters {h.refcount_table_clusters} is too large "
            f"(at most {MAX_REFTABLE_BYTES} bytes of table)"
        )
    if h.refcount_table_clusters == 0:
        raise InvalidImageError("refcount_table_clusters is 0: the image has no refcount table")
    _check_area("refcount_table_offset", h.refcount_table_offset, rt_bytes, cs, file_size)
    meta.reftable = be_array(await child.pread(h.refcount_table_offset, rt_bytes))
    _check_overlap(
        "l1_table_offset", h.l1_table_offset, h.l1_size * 8,
        "refcount_table_offset", h.refcount_table_offset, rt_bytes,
    )  # fmt: skip

    # Snapshot table.
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise InvalidImageError(
            f"nb_snapshots {h.nb_snapshots} is too large (at most {MAX_SNAPSHOTS})"
        )
    if h.nb_snapshots:
        if h.snapshots_offset % cs or h.snapshots_offset < cs or h.snapshots_offset >= file_size:
            raise InvalidImageError(
                f"snapshots_offset 0x{h.snapshots_offset:x} is not a cluster-aligned offset "
                f"inside the file ({file_size} bytes) past the header"
            )
        n = min(file_size - h.snapshots_offset, MAX_SNAPSHOTS_BYTES)
        data = bytes(await child.pread(h.snapshots_offset, n))
        pos = 0
        for _ in range(h.nb_snapshots):
            snap, pos = parse_snapshot(data, pos)
            meta.snapshots.append(snap)
        meta.snapshots_size = pos
    _check_l1_entries(meta, bad_l1)
    if meta.bitmaps_ext is not None:
        meta.bitmaps = await read_directory(child, meta.bitmaps_ext, h.size, cs)
    return meta


def _check_area(
    name: str, off: int, n: int, cs: int, file_size: int, allow_empty: bool = False
) -> None:
    """A metadata area: cluster-aligned, past the header cluster, inside the file."""
    if allow_empty and n == 0:
        return
    if off % cs:
        raise InvalidImageError(f"{name} 0x{off:x} is not aligned to the cluster size {cs}")
    if off < cs:
        raise InvalidImageError(f"{name} 0x{off:x} overlaps the header (the first cluster)")
    if off + n > file_size:
        raise InvalidImageError(
            f"{name} 0x{off:x} (+{n} bytes) runs past the end of the file ({file_size} bytes)"
        )


def _check_overlap(a: str, aoff: int, alen: int, b: str, boff: int, blen: int) -> None:
    if alen and blen and aoff < boff + blen and boff < aoff + alen:
        raise InvalidImageError(f"{a} 0x{aoff:x} and {b} 0x{boff:x}: the tables overlap")


def header_extensions(h: Qcow2Header, head: bytes, cs: int) -> Iterator[tuple[int, bytes]]:
    """(type, data) of each header extension: they follow the header, up to the end of
    the first cluster (or the backing name)."""
    pos = h.header_length if h.version >= 3 else V2_HEADER_SIZE
    end = min(len(head), cs)
    if h.backing_file_offset and h.backing_file_offset < end:
        end = h.backing_file_offset
    while pos + 8 <= end:
        ext_type, length = parse_ext_header(head[pos : pos + 8])
        if ext_type == Ext.END:
            return
        data_at = pos + 8
        if data_at + length > end:
            raise InvalidImageError(
                f"header extension 0x{ext_type:08x} (length {length}) at offset {pos} runs "
                "past the end of the header cluster"
            )
        yield ext_type, head[data_at : data_at + length]
        pos = data_at + length + (-length % 8)


def _read_extensions(meta: Qcow2Meta, head: bytes, cs: int) -> None:
    for ext_type, data in header_extensions(meta.header, head, cs):
        meta.extensions.append(ext_type)
        if ext_type == Ext.BACKING_FORMAT:
            meta.backing_format = data.decode("ascii", "replace")
        elif ext_type == Ext.FEATURE_TABLE:
            meta.feature_names = parse_feature_names(data)
        elif ext_type == Ext.CRYPTO:
            if len(data) < 16:
                raise InvalidImageError(f"crypto header extension: length {len(data)}, not 16")
            off, n = struct.unpack_from(">QQ", data)
            _check_area("crypto header offset", off, n, cs, meta.file_size)
            meta.crypto_area = (off, n)
        elif ext_type == Ext.BITMAPS and meta.header.autoclear_features & Autoclear.BITMAPS:
            # Without its autoclear bit the extension is stale: ignored, as qemu does.
            meta.bitmaps_ext = parse_ext(data, cs, meta.file_size)


def _read_backing_name(meta: Qcow2Meta, head: bytes, cs: int) -> None:
    h = meta.header
    if not h.backing_file_offset:
        return
    off, n = h.backing_file_offset, h.backing_file_size
    if n > MAX_BACKING_NAME:
        raise InvalidImageError(f"backing_file_size {n} is too long (at most {MAX_BACKING_NAME})")
    if off + n > cs or off + n > len(head):
        raise InvalidImageError(
            f"backing_file_offset 0x{off:x} (+{n} bytes) lies outside the header cluster"
        )
    if off < (h.header_length if h.version >= 3 else V2_HEADER_SIZE):
        raise InvalidImageError(f"backing_file_offset 0x{off:x} overlaps the header")
    if n:
        meta.backing_name = head[off : off + n].decode("utf-8", "surrogateescape")


def _check_l1_entries(meta: Qcow2Meta, bad: list[str] | None = None) -> None:
    """Every L2 table named by the L1 table is cluster-aligned and inside the file.

    With ``bad`` (``info`` on a damaged image), a bad entry is described there and left
    out (it reads as a hole) instead of refusing the image.
    """
    h, cs = meta.header, meta.cluster_size
    rt_end = h.refcount_table_offset + h.refcount_table_clusters * cs
    l1_end = h.l1_table_offset + h.l1_size * 8
    for i, e in enumerate(meta.l1):
        if not e:
            continue
        off = e & OFFSET_MASK
        why = ""
        if e & L1E_RESERVED:
            why = "has reserved bits set"
        elif off % cs:
            why = f"L2 table offset not aligned to the cluster size {cs}"
        elif off < cs:
            why = "points into the header (the first cluster)"
        elif off + cs > meta.file_size:
            why = f"points past the end of the file ({meta.file_size} bytes)"
        elif off < l1_end and h.l1_table_offset < off + cs:
            why = "points into the L1 table"
        elif off < rt_end and h.refcount_table_offset < off + cs:
            why = "points into the refcount table"
        if not why:
            continue
        message = (
            f"L1 entry {i} (0x{e:x}) {why}" if why[0] != "L" else f"L1 entry {i} (0x{e:x}): {why}"
        )
        if bad is None:
            raise InvalidImageError(message)
        bad.append(message)
        meta.l1[i] = 0
