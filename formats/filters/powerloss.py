"""PowerLossRecorder: what a power cut may leave of a file, for crash-consistency tests.

A kill -9 leaves the page cache behind, so the next reader sees every completed write
whatever the flushes did. A power cut keeps only what a FLUSH made durable, plus any
subset of the later writes, in any order, torn at sector granularity (the model of
CrashMonkey and ALICE). This filter sits between a format and its file (the qcow
driver's child RawDriver; any driver over a file, qcow2 or VHD alike) and records, in
order:

- each write when it is issued (a write in flight may already be partly on the disk),
  trims and zeroing as writes of zeros, and the file growing (``grow``: a sparse
  extension is file-system metadata, durable only after a sync like any write);
- each write's completion (a FUA write is durable from then on);
- each flush: it covers the writes completed before it started, once it completes.

``mark(label)`` puts the caller's own events (a guest write acknowledged, a guest
FLUSH done) in the same timeline, so a checker knows what had been promised at each
crash point. ``states`` then picks crash states, and ``materialise`` writes one to a
file: the base content, every durable write, and the chosen subset of the others.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from formats.filters import FilterDriver
from tapnbd.driver import Driver

#: Torn writes are torn at this granularity (sector writes are atomic on real disks).
SECTOR = 512


@dataclass(frozen=True, slots=True)
class FileWrite:
    """One change to the file: ``data`` at ``offset`` (None: zeros), or the file growing."""

    offset: int
    length: int
    data: bytes | None
    fua: bool = False
    #: The file grew to ``offset + length`` (no content: a hole reads as zeros).
    grow: bool = False


@dataclass(frozen=True, slots=True)
class Event:
    """An entry of the timeline: ``kind`` is issue, done, flush or mark."""

    kind: str
    write: int = -1  # issue/done: the write's index
    covered: tuple[int, ...] = ()  # flush: the writes it made durable
    label: object = None  # mark: the caller's label


@dataclass(frozen=True)
class CrashState:
    """A file as a power cut at ``point`` (a timeline index) may leave it.

    ``kept``: the writes persisted beyond the durable ones; ``torn``: of those, the ones
    of which only some sectors (indices into the write) reached the disk.
    """

    point: int
    kept: frozenset[int]
    torn: dict[int, frozenset[int]] = field(default_factory=dict)
    how: str = ""


class PowerLossRecorder(FilterDriver):
    """Passes everything to ``child`` and records writes and flushes (see the module).

    Every call that changes the file is overridden here, the fast paths included, so
    none reaches the child unrecorded; the rest (extents, capabilities) pass through.
    ``base`` is the file's content when recording starts.
    """

    def __init__(self, child: Driver, base: bytes) -> None:
        super().__init__(child)
        self.base = base
        self.writes: list[FileWrite] = []
        self.events: list[Event] = []
        #: Writes not yet durable, and which of those have completed.
        self._pending: set[int] = set()
        self._done: set[int] = set()

    # Recording.

    def mark(self, label: object) -> None:
        self.events.append(Event("mark", label=label))

    def _issue(self, w: FileWrite) -> int:
        i = len(self.writes)
        self.writes.append(w)
        self._pending.add(i)
        self.events.append(Event("issue", i))
        return i

    def _complete(self, i: int) -> None:
        self.events.append(Event("done", i))
        if self.writes[i].fua:
            self._pending.discard(i)
        else:
            self._done.add(i)

    # What changes the file.

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        i = self._issue(FileWrite(offset, len(data), bytes(data), fua))
        await self.child.pwrite(offset, data, fua)
        self._complete(i)

    def pwrite_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        if not self.child.pwrite_nowait(offset, data):
            return False
        self._complete(self._issue(FileWrite(offset, len(data), bytes(data))))
        return True

    def grow(self, length: int, *, allocate: bool = False) -> None:
        grow = getattr(self.child, "grow", None)
        if grow is None:
            raise OSError(errno.ENOSPC, "the file under the recorder cannot grow")
        size = self.child.size()
        grow(length, allocate=allocate)
        if length > size:
            self._complete(self._issue(FileWrite(size, length - size, None, grow=True)))

    async def flush(self) -> None:
        covered = tuple(sorted(self._done))
        await self.child.flush()
        self.events.append(Event("flush", covered=covered))
        self._pending.difference_update(covered)
        self._done.difference_update(covered)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        i = self._issue(FileWrite(offset, length, None, fua))
        await self.child.trim(offset, length, fua)
        self._complete(i)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        i = self._issue(FileWrite(offset, length, None, fua))
        await self.child.zero(offset, length, may_trim=may_trim, fua=fua, fast=fast)
        self._complete(i)

    # Crash states.

    def durable(self, point: int) -> tuple[set[int], list[int]]:
        """(durable writes, writes that may or may not be on disk) at ``point``."""
        durable: set[int] = set()
        issued: list[int] = []
        for ev in self.events[:point]:
            if ev.kind == "issue":
                issued.append(ev.write)
            elif ev.kind == "done" and self.writes[ev.write].fua:
                durable.add(ev.write)
            elif ev.kind == "flush":
                durable.update(ev.covered)
        return durable, [i for i in issued if i not in durable]

    def crash_points(self) -> list[int]:
        """Timeline indices worth cutting at: before each flush completes (the most
        writes in doubt), after each write is issued, and the very end."""
        points = {len(self.events)}
        for n, ev in enumerate(self.events):
            if ev.kind in ("flush", "done"):
                points.add(n)
        return sorted(points)

    def states(self, rng: random.Random, count: int) -> Iterator[CrashState]:
        """``count`` crash states: at each sampled point, nothing or everything in doubt
        persisted, one write alone, the newest few alone, or a random subset (some
        writes torn)."""
        points = self.crash_points()
        flushes = [n for n, ev in enumerate(self.events) if ev.kind == "flush"]
        for k in range(count):
            # Half the states cut just before a flush completes: the riskiest moment.
            point = rng.choice(flushes) if flushes and k % 2 == 0 else rng.choice(points)
            _, doubt = self.durable(point)
            mode = k % 6
            kept: set[int] = set()
            torn: dict[int, frozenset[int]] = {}
            if mode == 0 or not doubt:
                how = "durable only"
            elif mode == 1:
                kept, how = set(doubt), "everything"
            elif mode == 2:
                kept, how = {rng.choice(doubt)}, "one write"
            elif mode == 3:
                # The newest writes overtook the older ones (a pointer before its target).
                n = rng.randint(1, 3)
                kept, how = set(doubt[-n:]), f"newest {n}"
            else:
                p = rng.choice((0.1, 0.5, 0.9))
                kept = {i for i in doubt if rng.random() < p}
                for i in kept:
                    n = len(_pieces(self.writes[i]))
                    if n > 1 and rng.random() < 0.3:
                        torn[i] = frozenset(s for s in range(n) if rng.random() < 0.5)
                how = f"subset p={p}, {len(torn)} torn"
            yield CrashState(point, frozenset(kept), torn, how)

    def materialise(self, state: CrashState) -> bytearray:
        """The file's content in ``state``."""
        durable, _ = self.durable(state.point)
        img = bytearray(self.base)
        for i in sorted(durable | state.kept):
            w = self.writes[i]
            if w.grow:
                end = w.offset + w.length
                if end > len(img):
                    img.extend(bytes(end - len(img)))
                continue
            sectors = state.torn.get(i)
            if sectors is None:
                _apply(img, w.offset, w.length, w.data)
                continue
            for s, (a, n) in enumerate(_pieces(w)):
                if s in sectors:
                    _apply(img, w.offset + a, n, None if w.data is None else w.data[a : a + n])
        return img


def _pieces(w: FileWrite) -> list[tuple[int, int]]:
    """(offset into the write, length) of its parts in each sector of the file."""
    out: list[tuple[int, int]] = []
    pos, end = w.offset, w.offset + w.length
    while pos < end:
        n = min(end, (pos // SECTOR + 1) * SECTOR) - pos
        out.append((pos - w.offset, n))
        pos += n
    return out


def _apply(img: bytearray, offset: int, length: int, data: bytes | None) -> None:
    end = offset + length
    if end > len(img):
        img.extend(bytes(end - len(img)))
    img[offset:end] = bytes(length) if data is None else data
