"""What a backing file shows through an image's holes: data, and block status.

A backing file may be shorter than the image: past its end the image reads as zeros
(QEMU does the same), and block status says HOLE|ZERO there.
"""

from __future__ import annotations

from formats.engine.runs import add_extent
from tapnbd.driver import Driver, Extent, ExtentFlags

HOLE_ZERO = ExtentFlags.HOLE | ExtentFlags.ZERO


async def read_backing(backing: Driver, pos: int, n: int) -> bytes | bytearray | memoryview:
    """Backing data for [pos, pos + n), zeros past the backing file's end."""
    bsize = backing.size()
    if pos >= bsize:
        return bytes(n)
    m = min(n, bsize - pos)
    data = await backing.pread(pos, m)
    if m < n:
        return bytes(data) + bytes(n - m)
    return data


async def backing_status(backing: Driver, out: list[Extent], pos: int, n: int) -> None:
    """Append the status of [pos, pos + n) as the backing file reports it."""
    m = max(0, min(n, backing.size() - pos))
    done = 0
    while done < m:
        if not backing.can_extents():
            add_extent(out, pos + done, m - done, ExtentFlags.DATA)
            break
        got = await backing.extents(pos + done, m - done)
        if not got or got[0].offset != pos + done:
            add_extent(out, pos + done, m - done, ExtentFlags.DATA)
            break
        for e in got:
            k = min(e.length, m - done)
            add_extent(out, pos + done, k, e.flags)
            done += k
            if done >= m:
                break
    if m < n:
        add_extent(out, pos + m, n - m, HOLE_ZERO)
