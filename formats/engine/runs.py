"""One run iterator for every walk over a guest range: read, write, zero, block status.

A format supplies ``lookup(pos, end) -> (kind, host, n)``, answered from memory, which
raises ``Miss(offset)`` when a table must be read first, and ``load(offset)`` to read it.
``runs`` loops lookup/miss/load/continue so no caller writes that loop again; a walk that
advances by less than a run (a write that allocates, or waits for another allocator)
asks for one run at a time with ``run_at``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from tapnbd.driver import Driver, Extent, ExtentFlags

# Kinds of run a guest range maps to.
UNALLOC = 0  # no cluster here: the backing file shows through, or zeros
DATA = 1  # a normal cluster at ``host``, written in place
COMPRESSED = 2  # one compressed cluster; ``host`` is its table entry
ZERO = 3  # reads as zeros (qcow2's zero flag); ``host`` is a cluster it still holds, or 0
SHARED = 4  # data at ``host`` that other tables share (a snapshot's): copy before writing

Lookup = Callable[[int, int], tuple[int, int, int]]
Loader = Callable[[int], Awaitable[object]]


class Miss(Exception):
    """The table at ``offset`` must be loaded before the lookup can answer."""

    def __init__(self, offset: int) -> None:
        self.offset = offset


async def run_at(lookup: Lookup, load: Loader, pos: int, end: int) -> tuple[int, int, int]:
    """``(kind, host, n)`` of the run at ``pos``, loading tables until lookup answers."""
    while True:
        try:
            return lookup(pos, end)
        except Miss as miss:
            await load(miss.offset)


async def runs(
    lookup: Lookup, load: Loader, pos: int, end: int
) -> AsyncIterator[tuple[int, int, int]]:
    """``(kind, host, n)`` for consecutive runs covering [pos, end)."""
    while pos < end:
        kind, host, n = await run_at(lookup, load, pos, end)
        yield kind, host, n
        pos += n


def add_extent(out: list[Extent], pos: int, n: int, flags: ExtentFlags) -> None:
    """Append an extent, merged into the last one when the status is the same."""
    if out and out[-1].flags == flags and out[-1].offset + out[-1].length == pos:
        last = out[-1]
        out[-1] = Extent(last.offset, last.length + n, flags)
    else:
        out.append(Extent(pos, n, flags))


async def host_status(child: Driver, out: list[Extent], pos: int, host: int, n: int) -> None:
    """Allocated clusters at ``host``: data, or ZERO where the file holds a hole (never
    written), as the image file reports it."""
    done = 0
    while done < n:
        got = await child.extents(host + done, n - done)
        if not got or got[0].offset != host + done:
            add_extent(out, pos + done, n - done, ExtentFlags.DATA)
            return
        for e in got:
            m = min(e.length, n - done)
            flags = ExtentFlags.ZERO if e.flags & ExtentFlags.ZERO else ExtentFlags.DATA
            add_extent(out, pos + done, m, flags)
            done += m
            if done >= n:
                return
