"""ConcatDriver: several images back to back, read-only (qemu-img convert's several
sources: "filename [filename2 [...]] output_filename" makes one image of them all).

Each part keeps its own format and chain; the view's block status is each part's,
shifted to where the part starts.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

from tapnbd.driver import Driver, Extent


class ConcatDriver(Driver):
    name = "concat"

    def __init__(self, parts: Sequence[Driver]) -> None:
        self.parts = list(parts)
        #: Where each part starts, and (last) the total size.
        self._starts = [0, *itertools.accumulate(p.size() for p in parts)]

    def size(self) -> int:
        return self._starts[-1]

    def _spans(self, offset: int, length: int) -> list[tuple[Driver, int, int, int]]:
        """(part, offset in it, bytes, offset in the request) of each part the range
        ``offset``+``length`` crosses, in order."""
        out = []
        i = bisect.bisect_right(self._starts, offset) - 1
        pos, end = offset, offset + length
        while pos < end:
            start, stop = self._starts[i], self._starts[i + 1]
            n = min(end, stop) - pos
            if n > 0:
                out.append((self.parts[i], pos - start, n, pos - offset))
            pos += max(n, 0)
            i += 1
        return out

    async def pread(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        spans = self._spans(offset, length)
        if len(spans) == 1:
            part, at, n, _ = spans[0]
            return await part.pread(at, n)
        out = bytearray(length)
        for part, at, n, into in spans:
            out[into : into + n] = await part.pread(at, n)
        return out

    async def extents(self, offset: int, length: int) -> list[Extent]:
        # The first part's runs only: a caller asks again from where they stop.
        part, at, n, _ = self._spans(offset, length)[0]
        if not part.can_extents():
            return [Extent(offset, n)]
        return [
            Extent(e.offset - at + offset, e.length, e.flags) for e in await part.extents(at, n)
        ]

    def can_extents(self) -> bool:
        return True

    def describe(self) -> dict[str, object]:
        return {"format": self.name, "virtual-size": self.size(), "parts": len(self.parts)}

    async def close(self) -> None:
        first: BaseException | None = None
        for part in self.parts:  # every part, whatever one of them raises
            try:
                await part.close()
            except BaseException as e:
                first = first or e
        if first is not None:
            raise first
