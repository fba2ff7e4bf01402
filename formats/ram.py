"""ram: a sparse in-memory disk (blktap's ram driver; nbdkit's memory plugin).

Served as ``tapnbd serve ram:1G``. Pages that were never written, or were trimmed or
zeroed whole, take no memory and report HOLE|ZERO. Every operation completes without
suspending, so requests on a ram disk never leave the event loop.
"""

from __future__ import annotations

from tapnbd.driver import Driver, Extent, ExtentFlags, FuaMode

PAGE = 64 * 1024


class RamDriver(Driver):
    """A sparse RAM disk of a fixed size."""

    name = "ram"

    def __init__(self, size: int) -> None:
        self._size = size
        self.pages: dict[int, bytearray] = {}

    def size(self) -> int:
        return self._size

    def _runs(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(page number, offset in page, count) for each page the range touches."""
        out = []
        while length:
            n, off = divmod(offset, PAGE)
            count = min(length, PAGE - off)
            out.append((n, off, count))
            offset += count
            length -= count
        return out

    async def pread(self, offset: int, length: int) -> bytes | bytearray:
        return self.pread_nowait(offset, length)

    def pread_nowait(self, offset: int, length: int) -> bytes | bytearray:
        runs = self._runs(offset, length)
        if len(runs) == 1:
            n, off, count = runs[0]
            page = self.pages.get(n)
            return bytes(count) if page is None else page[off : off + count]
        buf = bytearray(length)
        pos = 0
        for n, off, count in runs:
            page = self.pages.get(n)
            if page is not None:
                buf[pos : pos + count] = page[off : off + count]
            pos += count
        return buf

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self.pwrite_nowait(offset, data)

    def pwrite_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        pos = 0
        for n, off, count in self._runs(offset, len(data)):
            page = self.pages.get(n)
            if page is None:
                page = self.pages[n] = bytearray(PAGE)
            page[off : off + count] = data[pos : pos + count]
            pos += count
        return True

    async def flush(self) -> None:
        """Nothing to do: memory is as durable as a ram disk gets."""

    def can_fua(self) -> FuaMode:
        return FuaMode.NATIVE

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.zero(offset, length, may_trim=True, fua=fua, fast=False)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        for n, off, count in self._runs(offset, length):
            if count == PAGE:
                self.pages.pop(n, None)
            elif (page := self.pages.get(n)) is not None:
                page[off : off + count] = bytes(count)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for n, off, count in self._runs(offset, length):
            flags = ExtentFlags.DATA if n in self.pages else ExtentFlags.HOLE | ExtentFlags.ZERO
            start = n * PAGE + off
            if out and out[-1].flags == flags:
                last = out.pop()
                out.append(Extent(last.offset, last.length + count, flags))
            else:
                out.append(Extent(start, count, flags))
        return out

    async def cache(self, offset: int, length: int) -> None:
        """Already in memory."""
