"""What a disk may hold after errors or a crash, from an ``nbdload`` journal.

The writes to one sector are ordered (nbdload never has two overlapping writes in
flight), so a sector's history is a list of generations. Which of them it may show:

- live, after errors (``crashed=False``): the last write that succeeded, or any later
  one that failed (a failed write may or may not have landed); zeros if none succeeded;
- after the server was killed (``crashed=True``): the last *durable* write, or any
  later one, acknowledged or not. Durable means acknowledged before a FLUSH that then
  completed was sent, or acknowledged with FUA (NBD spec: "the server MUST NOT send a
  reply to NBD_CMD_FLUSH until it has completed all writes it has acknowledged").

Never an older generation, a sector stamped for another place, a torn sector or
garbage. A sector no write touched must read as zeros.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.reliability.nbdload import MAGIC, SECTOR, STAMP, stamp

ZERO_SECTOR = bytes(SECTOR)
CHUNK = 1 << 20


@dataclass
class Write:
    gen: int
    offset: int
    length: int
    fua: bool
    status: str  # ok | err | lost | pending
    errno: str | None


@dataclass
class Journal:
    size: int
    writes: list[Write]
    acks: list[int]
    flush_cuts: list[int]
    errors: dict[str, int]
    flush_errors: list[str]
    dead: str
    hang: bool

    @classmethod
    def from_json(cls, obj: Any) -> Journal:
        return cls(
            obj["size"],
            [Write(*w) for w in obj["writes"]],
            obj["acks"],
            obj["flush_cuts"],
            obj["errors"],
            obj["flush_errors"],
            obj["dead"],
            obj["hang"],
        )

    def count(self, status: str) -> int:
        return sum(1 for w in self.writes if w.status == status)

    def durable(self) -> set[int]:
        cut = max(self.flush_cuts, default=0)
        done = set(self.acks[:cut])
        done.update(w.gen for w in self.writes if w.fua and w.status == "ok")
        return done


@dataclass
class Verdict:
    """What a verification saw; ``failures`` lists the first few wrong sectors."""

    sectors: int = 0  # sectors that some write touched
    must: int = 0  # of which had exactly one possible content
    newer: int = 0  # showed a write later than the one guaranteed
    failures: list[str] = field(default_factory=list)
    failure_count: int = 0

    def fail(self, message: str) -> None:
        self.failure_count += 1
        if len(self.failures) < 10:
            self.failures.append(message)


def possible(journal: Journal, *, crashed: bool) -> dict[int, tuple[int, ...]]:
    """For each touched sector, the generations it may show (0: zeros); first is the base.

    The base is the last durable write (crashed) or the last one that succeeded (live);
    every later write to the sector may have landed. Walking the writes in order, a base
    write starts its sectors' lists again and any other write extends them.
    """
    durable = journal.durable() if crashed else set()
    out: dict[int, tuple[int, ...]] = {}
    for w in journal.writes:
        first = w.offset // SECTOR
        sectors = range(first, first + w.length // SECTOR)
        if (w.gen in durable) if crashed else (w.status == "ok"):
            out.update(dict.fromkeys(sectors, (w.gen,)))
        else:
            for s in sectors:
                out[s] = (*out.get(s, (0,)), w.gen)
    return out


def _read_chunks(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        offset = 0
        while chunk := f.read(CHUNK):
            yield offset, chunk
            offset += len(chunk)


def verify(path: Path, journal: Journal, *, crashed: bool) -> Verdict:
    """Check a raw copy of the disk (``qemu-img convert`` or ``nbdcopy`` output)."""
    allowed = possible(journal, crashed=crashed)
    v = Verdict(sectors=len(allowed))
    size = os.path.getsize(path)
    if size != journal.size:
        v.fail(f"{path}: {size} bytes, the disk has {journal.size}")
        return v
    touched = sorted(allowed)
    t = 0  # index into touched: sectors are visited in order
    zero_chunk = bytes(CHUNK)
    for offset, chunk in _read_chunks(path):
        first, n = offset // SECTOR, len(chunk) // SECTOR
        if t >= len(touched) or touched[t] >= first + n:
            if chunk != zero_chunk[: len(chunk)]:
                where = offset + next(i for i, b in enumerate(chunk) if b)
                v.fail(f"byte {where} is not zero, and no write touched it")
            continue
        for i in range(n):
            s = first + i
            data = chunk[i * SECTOR : (i + 1) * SECTOR]
            if t < len(touched) and touched[t] == s:
                t += 1
                gens = allowed[s]
                # Most sectors show their base: one comparison settles them.
                if data == (stamp(s, gens[0]) if gens[0] else ZERO_SECTOR):
                    if len(gens) == 1:
                        v.must += 1
                else:
                    _check_sector(v, s, data, gens)
            elif data != ZERO_SECTOR:
                v.fail(f"sector {s} is not zero, and no write touched it")
    return v


def _check_sector(v: Verdict, s: int, data: bytes, gens: tuple[int, ...]) -> None:
    if len(gens) == 1:
        v.must += 1
    if data == ZERO_SECTOR:
        gen = 0
    else:
        magic, sector, gen = STAMP.unpack_from(data)
        if magic != MAGIC or data != stamp(sector, gen):
            v.fail(f"sector {s}: garbage (first bytes {data[:16].hex()}), expected gen {gens}")
            return
        if sector != s & 0xFFFFFFFF:
            v.fail(f"sector {s}: holds sector {sector}'s data (gen {gen})")
            return
    if gen not in gens:
        v.fail(f"sector {s}: gen {gen}, expected one of {gens}")
    elif gen != gens[0]:
        v.newer += 1
