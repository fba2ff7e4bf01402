"""WindowFilter: a range of an image seen as a whole image (nbdkit's offset filter).

``tapnbd dd``'s ``skip`` and ``count`` select a read-only range, which ``convert`` copies
as it copies a whole image, holes and zeros skipped by the view's block status.
``serve -o OFFSET`` serves the image from OFFSET on, writable (qemu-nbd -o).

Every call that names an offset is moved by the window's start; the child's offsets
never reach a caller (its bitmaps are not offered, and the fast paths that hand out
the child's file offsets, ``read_at`` and ``pwrite_from_pipe``, keep Driver's "no").
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from formats.filters import FilterDriver
from tapnbd.driver import Driver, Extent
from tapnbd.errors import ImageError, TapnbdError


def from_offset(driver: Driver, offset: int, image: str) -> Driver:
    """``image`` (opened as ``driver``) from byte ``offset`` on, writable, as qemu-nbd -o
    serves it: a raw layer over the image as the guest sees it, so over any format."""
    if not offset:
        return driver
    size = driver.size()
    if offset > size:
        raise TapnbdError(f"{image}: --offset {offset} is past the image's end ({size} bytes)")
    return WindowFilter(driver, offset, size - offset, writable=True)


class WindowFilter(FilterDriver):
    """``length`` bytes of ``child`` from ``offset``, read-only unless ``writable``."""

    def __init__(self, child: Driver, offset: int, length: int, *, writable: bool = False) -> None:
        super().__init__(child)
        if offset < 0 or length < 0 or offset + length > child.size():
            raise ImageError(
                f"the range {offset}+{length} is not inside the image ({child.size()} bytes)"
            )
        self._offset, self._length = offset, length
        self._writable = writable

    def size(self) -> int:
        return self._length

    def pread(
        self, offset: int, length: int
    ) -> Coroutine[Any, Any, bytes | bytearray | memoryview]:
        return self.child.pread(self._offset + offset, length)

    def pread_nowait(self, offset: int, length: int) -> bytes | bytearray | None:
        return self.child.pread_nowait(self._offset + offset, length)

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        await self.child.pwrite(self._offset + offset, data, fua)

    def pwrite_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        return self.child.pwrite_nowait(self._offset + offset, data)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.child.trim(self._offset + offset, length, fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        await self.child.zero(self._offset + offset, length, may_trim=may_trim, fua=fua, fast=fast)

    async def cache(self, offset: int, length: int) -> None:
        await self.child.cache(self._offset + offset, length)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return self._moved(await self.child.extents(self._offset + offset, length), offset, length)

    async def allocation_depth(self, offset: int, length: int) -> list[Extent]:
        got = await self.child.allocation_depth(self._offset + offset, length)
        return self._moved(got, offset, length)

    def _moved(self, got: list[Extent], offset: int, length: int) -> list[Extent]:
        """The child's runs for [offset, offset + length) of the window, clipped to it
        and in the window's offsets."""
        lo, hi = self._offset + offset, self._offset + offset + length
        out = []
        for e in got:
            start, end = max(e.offset, lo), min(e.offset + e.length, hi)
            if start < end:
                out.append(Extent(start - self._offset, end - start, e.flags))
        return out

    def bitmaps(self) -> list[str]:
        return []  # its offsets are not the child's: none passed through

    def can_write(self) -> bool:
        return self._writable and self.child.can_write()

    def can_trim(self) -> bool:
        return self._writable and self.child.can_trim()

    def can_fast_zero(self) -> bool:
        return self._writable and self.child.can_fast_zero()
