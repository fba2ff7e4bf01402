"""WindowFilter: a read-only view of a range of an image (nbdkit's offset filter).

``tapnbd dd``'s ``skip`` and ``count`` select the range; ``convert`` then copies the
view as it copies a whole image, holes and zeros skipped by the view's block status.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from formats.filters import FilterDriver
from tapnbd.driver import Driver, Extent
from tapnbd.errors import ImageError


class WindowFilter(FilterDriver):
    """``length`` bytes of ``child`` from ``offset``, read-only."""

    def __init__(self, child: Driver, offset: int, length: int) -> None:
        super().__init__(child)
        if offset < 0 or length < 0 or offset + length > child.size():
            raise ImageError(
                f"the range {offset}+{length} is not inside the image ({child.size()} bytes)"
            )
        self._offset, self._length = offset, length

    def size(self) -> int:
        return self._length

    def pread(
        self, offset: int, length: int
    ) -> Coroutine[Any, Any, bytes | bytearray | memoryview]:
        return self.child.pread(self._offset + offset, length)

    def pread_nowait(self, offset: int, length: int) -> bytes | bytearray | None:
        return self.child.pread_nowait(self._offset + offset, length)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        lo, hi = self._offset + offset, self._offset + offset + length
        out = []
        for e in await self.child.extents(lo, length):
            start, end = max(e.offset, lo), min(e.offset + e.length, hi)
            if start < end:
                out.append(Extent(start - self._offset, end - start, e.flags))
        return out

    def bitmaps(self) -> list[str]:
        return []  # its offsets are not the child's: none passed through

    def can_write(self) -> bool:
        return False

    def can_trim(self) -> bool:
        return False
