"""How much file a new image needs: the sums behind ``tapnbd measure``.

``required`` is the file a converted copy of the source needs (metadata plus the
clusters or blocks that hold data); ``fully-allocated`` is the file once every byte of
the disk has been written. For qcow2 and raw the sums are qemu-img measure's
(block/qcow2.c ``qcow2_measure``), so the figures match it to the byte; for QCOW v1
and VHD they follow the layouts ``tapnbd create`` and the drivers write, and are upper
bounds (the tests fill images and check the file stays within them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from formats.imagemap import MapEntry
from tapnbd.errors import ImageError

SECTOR = 512


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclass(frozen=True, slots=True)
class Measure:
    required: int
    fully_allocated: int
    #: qcow2 output from a qcow2 v3 source: room for its persistent bitmaps, whole.
    bitmaps: int | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.bitmaps is not None:
            out["bitmaps"] = self.bitmaps
        out["required"] = self.required
        out["fully-allocated"] = self.fully_allocated
        return out

    def human(self) -> str:
        lines = [f"required size: {self.required}", f"fully allocated size: {self.fully_allocated}"]
        if self.bitmaps is not None:
            lines.append(f"bitmaps size: {self.bitmaps}")
        return "\n".join(lines)


def data_runs(entries: Iterable[MapEntry]) -> list[tuple[int, int]]:
    """(start, length) of the runs a copy must write: data, not known to be zero.

    qemu-img measure's test: a run that reads as zeros is skipped, one that is
    allocated data is counted.
    """
    return [(e.start, e.length) for e in entries if not e.zero and e.data and e.present]


def units_touched(runs: Iterable[tuple[int, int]], unit: int) -> int:
    """How many ``unit``-sized aligned pieces the runs touch (each counted once)."""
    count, last = 0, -1
    for start, length in runs:
        first, end = start // unit, (start + length - 1) // unit
        first = max(first, last + 1)
        if first <= end:
            count += end - first + 1
            last = end
    return count


# qcow2 (qemu's qcow2_calc_prealloc_size and qcow2_refcount_metadata_size).


def _refcount_metadata(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Refcount table and blocks covering ``clusters`` and themselves: a fixed point."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cluster_size


def qcow2_full_size(size: int, cluster_size: int, refcount_bits: int = 16) -> int:
    """The file of a fully allocated qcow2 image: header, L1, L2, refcounts, data."""
    aligned = round_up(size, cluster_size)
    meta = cluster_size  # the header cluster
    nl2e = round_up(aligned // cluster_size, cluster_size // 8)
    meta += nl2e * 8
    nl1e = round_up(nl2e * 8 // cluster_size, cluster_size // 8)
    meta += nl1e * 8
    order = refcount_bits.bit_length() - 1
    meta += _refcount_metadata((meta + aligned) // cluster_size, cluster_size, order)
    return meta + aligned


def measure_qcow2(
    size: int,
    runs: list[tuple[int, int]] | None,
    *,
    cluster_size: int = 65536,
    refcount_bits: int = 16,
    preallocation: str = "off",
    bitmaps: list[tuple[int, int]] | None = None,
) -> Measure:
    """qemu's qcow2_measure: ``runs`` None measures an empty image of ``size`` bytes.

    ``bitmaps``: the source's persistent bitmaps (name length, granularity bits), for
    a qcow2 v3 source; as qemu, each is counted fully allocated, with its table and
    its directory entry.
    """
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 << 20:
        raise ImageError(f"cluster_size {cluster_size} must be a power of two, 512 to 2M")
    if refcount_bits & (refcount_bits - 1) or not 1 <= refcount_bits <= 64:
        raise ImageError(f"refcount_bits {refcount_bits} must be a power of two up to 64")
    if preallocation not in ("off", "metadata", "falloc", "full"):
        raise ImageError(f"preallocation {preallocation!r}: use off, metadata, falloc or full")
    vsize = round_up(size, cluster_size) if runs is not None else round_up(size, SECTOR)
    data = 0
    if preallocation in ("falloc", "full"):
        data = vsize
    elif runs is not None:
        data = units_touched(runs, cluster_size) * cluster_size
    full = qcow2_full_size(vsize, cluster_size, refcount_bits)
    return Measure(full - vsize + data, full, _bitmaps_size(size, bitmaps, cluster_size))


def _bitmaps_size(size: int, bitmaps: list[tuple[int, int]] | None, cs: int) -> int | None:
    from formats.qcow2.bitmaps import ENTRY, bitmap_bytes

    if bitmaps is None:
        return None
    total = directory = 0
    for name_len, gbits in bitmaps:
        clusters = -(-bitmap_bytes(size, gbits) // cs)
        total += clusters * cs + round_up(clusters * 8, cs)
        directory += round_up(ENTRY.size + name_len, 8)
    return total + round_up(directory, cs)


def measure_raw(size: int) -> Measure:
    n = round_up(size, SECTOR)
    return Measure(n, n)


# QCOW v1, as tapnbd create and convert lay it out (optimised: whole extents).


def measure_qcow(
    size: int, runs: list[tuple[int, int]] | None, cluster_size: int | None
) -> Measure:
    from formats.qcow.geometry import Geometry, default_bits
    from formats.qcow.layout import EXT_OFFSET, EXT_SIZE

    cb, l2b = default_bits(cluster_size, False)
    l1_size = -(-size // (1 << (cb + l2b)))
    g = Geometry(size, cb, l2b, l1_size)
    l1_off = round_up(EXT_OFFSET + EXT_SIZE, 4096)
    # The first extent starts where the L1 table's page ends, on a cluster boundary.
    base = round_up(round_up(l1_off + l1_size * 8, 4096), g.cluster_size)
    slots = units_touched(runs, 1 << g.shift) if runs is not None else 0
    return Measure(base + slots * g.extent_bytes, base + l1_size * g.extent_bytes)


# VHD (dynamic), as tapnbd create and the driver lay it out.


def measure_vhd(
    size: int, runs: list[tuple[int, int]] | None, block_size: int | None, subformat: str
) -> Measure:
    from formats.vhd.layout import DEFAULT_BLOCK_SIZE, bitmap_bytes

    size = round_up(size, SECTOR)
    if subformat == "fixed":
        return Measure(size + SECTOR, size + SECTOR)
    if subformat != "dynamic":
        raise ImageError(f"subformat {subformat!r}: use dynamic or fixed")
    bs = block_size or DEFAULT_BLOCK_SIZE
    bm = bitmap_bytes(bs)
    entries = -(-size // bs)
    head = SECTOR + 1024 + round_up(entries * 4, SECTOR)  # footer copy, header, BAT

    def file_with(blocks: int) -> int:
        if not blocks:
            return head + SECTOR
        # Block data starts on a 4 KiB boundary, its bitmap just before (VhdDriver).
        first = head + (-(head + bm) % 4096) + bm + bs
        return first + (blocks - 1) * round_up(bm + bs, 4096) + SECTOR  # + the footer

    blocks = units_touched(runs, bs) if runs is not None else 0
    return Measure(file_with(blocks), file_with(entries))
