"""Metadata writes in ordered stages, made durable together as one flush epoch.

A format records each metadata write it owes the disk under a *stage*; ``flush`` takes
everything recorded so far as one snapshot, and for each stage in order writes its
records and syncs. Whatever must be durable before something else points at it goes in
an earlier stage (for qcow2: new tables and refcounts, then refcount-table entries, then
L2 and L1 entries). Records made while a flush runs belong to the next epoch. If a flush
fails, its records are merged back (newer ones win) and the next flush tries again.

A format whose records point at guest data written before the flush (QCOW v1's L2
entries name data clusters) asks for ``data_first``: the first stage is then synced even
when it has no records of its own, so the data is durable before anything names it.

A record is keyed by its file offset, so recording the same place twice keeps the last
value. Its value is either bytes or a function giving them; functions are called when
the epoch is taken, so a whole table recorded early is written as it is at the flush.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeAlias

Value: TypeAlias = bytes | Callable[[], bytes]
#: ``write(offset, data)`` and ``sync()`` of the file the metadata lives in.
Writer: TypeAlias = Callable[[int, bytes], Awaitable[None]]
Syncer: TypeAlias = Callable[[], Awaitable[None]]


class Journal:
    """Pending metadata writes in ``stages`` ordered groups, for one file."""

    def __init__(
        self, stages: int, write: Writer, sync: Syncer, *, data_first: bool = False
    ) -> None:
        self._data_first = data_first
        self._records: list[dict[int, Value]] = [{} for _ in range(stages)]
        self._write = write
        self._sync = sync
        self._lock = asyncio.Lock()
        #: Tags (table offsets) with records pending or being written.
        self._tags: dict[int, int] = {}
        self._flushing_tags: set[int] = set()

    def record(self, stage: int, offset: int, value: Value, tag: int = -1) -> None:
        """Owe the disk ``value`` at ``offset``; ``tag`` names the table it belongs to."""
        self._records[stage][offset] = value
        if tag >= 0:
            self._tags[tag] = self._tags.get(tag, 0) + 1

    def has(self, stage: int, offset: int) -> bool:
        return offset in self._records[stage]

    def busy(self, tag: int) -> bool:
        """Does the table ``tag`` have changes not yet durable? (Such tables are pinned.)"""
        return tag in self._tags or tag in self._flushing_tags

    @property
    def pending(self) -> bool:
        return any(self._records) or self._lock.locked()

    @property
    def tables(self) -> int:
        """Tables (tags) with records not yet written, for a write-back threshold."""
        return len(self._tags)

    @property
    def size(self) -> int:
        return sum(len(r) for r in self._records)

    async def flush(self) -> bool:
        """Write every stage of the current epoch, syncing after each non-empty one.

        Returns False when there was nothing to write (the caller may still sync data).
        """
        async with self._lock:
            if not any(self._records):
                return False
            taken, self._records = self._records, [{} for _ in self._records]
            tags, self._tags = self._tags, {}
            self._flushing_tags = set(tags)
            try:
                # Snapshot first: later changes in memory belong to the next epoch.
                snap = [
                    {off: v() if callable(v) else v for off, v in recs.items()} for recs in taken
                ]
                for stage, writes in enumerate(snap):
                    if not writes:
                        if stage == 0 and self._data_first:
                            await self._sync()
                        continue
                    for off, data in _coalesce(writes):
                        await self._write(off, data)
                    await self._sync()
            except BaseException:
                for stage, recs in enumerate(taken):
                    for off, v in recs.items():
                        self._records[stage].setdefault(off, v)
                for tag, n in tags.items():
                    self._tags[tag] = self._tags.get(tag, 0) + n
                raise
            finally:
                self._flushing_tags = set()
            return True


def _coalesce(recs: dict[int, bytes]) -> list[tuple[int, bytes]]:
    """Records as writes, adjacent ones joined (dirty entries of one table are one write)."""
    out: list[tuple[int, bytearray]] = []
    for off in sorted(recs):
        data = recs[off]
        if out and out[-1][0] + len(out[-1][1]) == off:
            out[-1][1].extend(data)
        else:
            out.append((off, bytearray(data)))
    return [(off, bytes(buf)) for off, buf in out]
