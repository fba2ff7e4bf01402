"""Which ranges of an overlay are its own, and which show its backing file through.

``rebase`` copies what the old backing file showed through, and ``commit`` copies what
the overlay holds itself (QEMU: bdrv_is_allocated_above). Every format with a backing
file (QCOW v1, qcow2, VHD) answers block status for an unallocated run by asking its
backing file, and for nothing else: so the ranges a stand-in backing file is asked
about are exactly those the image does not hold. The stand-in is put in place for the
one pass and the real backing file is put back before anything is read.
"""

from __future__ import annotations

from tapnbd.driver import Driver, Extent, ExtentFlags


class _Asked(Driver):
    """A backing file that reads as a hole and records the ranges it is asked about."""

    name = "unallocated-marker"

    def __init__(self, size: int) -> None:
        self._size = size
        self.asked: list[tuple[int, int]] = []

    def size(self) -> int:
        return self._size

    async def pread(self, offset: int, length: int) -> bytes:
        raise AssertionError("the stand-in backing file is never read")

    async def extents(self, offset: int, length: int) -> list[Extent]:
        if self.asked and self.asked[-1][0] + self.asked[-1][1] == offset:
            start, n = self.asked.pop()
            self.asked.append((start, n + length))
        else:
            self.asked.append((offset, length))
        return [Extent(offset, length, ExtentFlags.HOLE | ExtentFlags.ZERO)]


async def unallocated_ranges(image: Driver, above: Driver | None = None) -> list[tuple[int, int]]:
    """(offset, length) runs of ``image`` that come from below ``above``.

    ``above`` is the image in the chain whose backing file counts as "below" (default
    ``image`` itself: its own backing file). A run in an image between the two counts
    as allocated, as in QEMU's bdrv_is_allocated_above.
    """
    holder = above if above is not None else image
    real = getattr(holder, "backing", None)
    if real is None:
        return []
    marker = _Asked(max(image.size(), real.size()))
    holder.backing = marker  # type: ignore[attr-defined]
    # QCOW v1 asks the backing file only if it said it can answer; the marker can.
    had = getattr(holder, "_backing_extents", None)
    if had is not None:
        holder._backing_extents = True  # type: ignore[attr-defined]
    try:
        pos, size = 0, image.size()
        while pos < size:
            got = await image.extents(pos, size - pos)
            if not got:
                raise OSError(f"no block status at offset {pos}")
            pos = got[-1].offset + got[-1].length
    finally:
        holder.backing = real  # type: ignore[attr-defined]
        if had is not None:
            holder._backing_extents = had  # type: ignore[attr-defined]
    return marker.asked


def complement(runs: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The runs of [0, size) not in ``runs`` (sorted, apart)."""
    out: list[tuple[int, int]] = []
    pos = 0
    for start, n in runs:
        if start > pos:
            out.append((pos, start - pos))
        pos = max(pos, start + n)
    if pos < size:
        out.append((pos, size - pos))
    return out
