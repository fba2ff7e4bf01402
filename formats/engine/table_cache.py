"""An LRU of fixed-size metadata tables keyed by file offset (QEMU's qcow2-cache.c).

Lookups are synchronous (``get``) so a hit costs a dict access; a miss is loaded with
``load``, and two requests missing on the same table share one read. A table that the
format says is pinned (it has changes not yet on disk) is never evicted: dropping it
would lose the changes, and reading it again would bring back the old entries.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class TableCache(Generic[T]):
    """Tables of type ``T`` read by ``reader(offset)``; at most ``max_tables`` unpinned."""

    def __init__(
        self,
        reader: Callable[[int], Awaitable[T]],
        max_tables: int,
        pinned: Callable[[int], bool] = lambda _off: False,
    ) -> None:
        self._reader = reader
        self._max = max(16, max_tables)
        self._pinned = pinned
        self._tables: OrderedDict[int, T] = OrderedDict()
        self._loading: dict[int, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        return len(self._tables)

    def __contains__(self, offset: int) -> bool:
        return offset in self._tables

    @property
    def tables(self) -> Mapping[int, T]:
        """The tables in memory by offset, for a hot path's direct ``.get`` (read-only)."""
        return self._tables

    def get(self, offset: int) -> T | None:
        """The table at ``offset`` if it is in memory (no LRU bookkeeping: a hit is free)."""
        return self._tables.get(offset)

    async def load(self, offset: int) -> T:
        """The table at ``offset``, read once however many callers ask at the same time."""
        table = self._tables.get(offset)
        if table is not None:
            return table
        waiting = self._loading.get(offset)
        if waiting is not None:
            return await asyncio.shield(waiting)
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._loading[offset] = fut
        try:
            table = await self._reader(offset)
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: the callers that wait re-raise it themselves
            raise
        finally:
            del self._loading[offset]
        self.put(offset, table)
        if not fut.done():
            fut.set_result(table)
        return table

    def put(self, offset: int, table: T) -> None:
        """Add (or replace) a table as the most recently used, then evict if over budget."""
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        self.trim(keep=offset)

    def drop(self, offset: int) -> None:
        self._tables.pop(offset, None)

    def trim(self, keep: int = -1) -> None:
        """Evict the least recently added unpinned tables beyond the budget."""
        excess = len(self._tables) - self._max
        if excess <= 0:
            return
        oldest = itertools.islice(self._tables, excess + 64)
        victims = [off for off in oldest if off != keep and not self._pinned(off)]
        for victim in victims[:excess]:
            del self._tables[victim]
