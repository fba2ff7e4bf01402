"""A write load for reliability tests: a real NBD client (libnbd), stamped sectors, a journal.

Run under the system interpreter (libnbd's Python bindings are Debian's)::

    /usr/bin/python3 tests/reliability/nbdload.py URI [--seed N] [--duration S] ...

It keeps ``--qd`` writes in flight, sends a FLUSH every few writes (and some writes with
FUA), and prints one JSON journal on exit: every write (its generation, offset, length,
FUA flag and outcome), the order of acknowledgements, and for each completed FLUSH how
many writes had been acknowledged when it was sent. ``model.py`` turns that into what
each sector may hold after an error, or after the server was killed.

Every 512-byte sector a write covers holds 32 copies of the 16-byte stamp
(``MAGIC``, sector number, generation): a sector read back names the write that put it
there, so data from the wrong place, a torn sector or garbage cannot pass for good data.
Two writes in flight never overlap, so the writes to one sector are ordered.

The load stops after ``--duration`` seconds or ``--count`` writes, or when the connection
dies (the server was killed): commands then in flight are journalled as "lost". A
command that takes longer than ``--hang`` seconds ends the run with ``"hang": true``.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time
from typing import Any

try:
    import nbd
except ImportError:  # model.py imports the stamps under the venv's interpreter
    nbd = None

SECTOR = 512
MAGIC = 0x5441504E  # "TAPN"
STAMP = struct.Struct("<IIQ")


def stamp(sector: int, gen: int) -> bytes:
    return STAMP.pack(MAGIC, sector & 0xFFFFFFFF, gen) * (SECTOR // STAMP.size)


def payload(offset: int, length: int, gen: int) -> bytes:
    first = offset // SECTOR
    return b"".join(stamp(s, gen) for s in range(first, first + length // SECTOR))


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.h = nbd.NBD()
        self.h.connect_uri(args.uri)
        self.size = self.h.get_size()
        self.region = min(args.region or self.size, self.size) // SECTOR * SECTOR
        self.frontier = min(args.start, self.region)
        self.gen = args.gen_base
        #: [gen, offset, length, fua, status, errno]; status ok|err|lost|pending.
        self.writes: list[list[Any]] = []
        self.acks: list[int] = []
        self.flush_cuts: list[int] = []  # acks[:cut] were durable when a flush completed
        self.flush_errors: list[str] = []
        self.errors: dict[str, int] = {}
        # cookie -> ("w", index into writes, buffer) or ("f", cut, None)
        self.inflight: dict[int, tuple[str, int, bytes | None]] = {}
        self.since_flush = 0
        self.dead = ""
        self.hang = False
        self.started: dict[int, float] = {}

    def overlaps(self, offset: int, length: int) -> bool:
        for kind, i, _ in self.inflight.values():
            if kind == "w":
                _, o, n = self.writes[i][:3]
                if offset < o + n and o < offset + length:
                    return True
        return False

    def pick(self) -> tuple[int, int]:
        """Half the writes extend a frontier (allocating), half rewrite behind it."""
        length = self.rng.randint(1, self.args.max_len // SECTOR) * SECTOR
        frontier = self.frontier
        if frontier < self.region and (frontier == 0 or self.rng.random() < 0.5):
            offset = frontier
        else:
            offset = self.rng.randrange(0, max(frontier, SECTOR), SECTOR)
        length = min(length, self.region - offset)
        if offset == frontier:
            self.frontier = offset + length
        return offset, length

    def issue_write(self) -> None:
        for _ in range(8):
            offset, length = self.pick()
            if not self.overlaps(offset, length):
                break
        else:
            return
        self.gen += 1
        fua = self.rng.random() < self.args.fua
        buf = payload(offset, length, self.gen)
        flags = nbd.CMD_FLAG_FUA if fua else 0
        index = len(self.writes)
        self.writes.append([self.gen, offset, length, fua, "pending", None])
        cookie = self.h.aio_pwrite(buf, offset, flags=flags)
        self.inflight[cookie] = ("w", index, buf)
        self.started[cookie] = time.monotonic()
        self.since_flush += 1

    def issue_flush(self) -> None:
        cookie = self.h.aio_flush()
        self.inflight[cookie] = ("f", len(self.acks), None)
        self.started[cookie] = time.monotonic()
        self.since_flush = 0

    def retire(self, cookie: int, error: nbd.Error | None) -> None:
        kind, i, _ = self.inflight.pop(cookie)
        self.started.pop(cookie, None)
        name = None if error is None else (error.errno or str(error.errnum))
        if name is not None:
            self.errors[name] = self.errors.get(name, 0) + 1
        if kind == "w":
            w = self.writes[i]
            if error is None:
                w[4] = "ok"
                self.acks.append(w[0])
            else:
                w[4], w[5] = "err", name
        elif error is None:
            self.flush_cuts.append(i)
        else:
            self.flush_errors.append(str(name))

    def reap(self) -> None:
        for cookie in list(self.inflight):
            try:
                done = self.h.aio_command_completed(cookie)
            except nbd.Error as e:
                if self.h.aio_is_dead() or self.h.aio_is_closed():
                    raise
                self.retire(cookie, e)
                continue
            if done:
                self.retire(cookie, None)

    def run(self) -> None:
        a = self.args
        deadline = time.monotonic() + a.duration
        flush_every = self.rng.randint(a.flush_every // 2 + 1, a.flush_every)
        try:
            while True:
                now = time.monotonic()
                stopping = now >= deadline or (a.count and len(self.writes) >= a.count)
                if stopping and not self.inflight:
                    break
                while not stopping and len(self.inflight) < a.qd:
                    if self.since_flush >= flush_every:
                        self.issue_flush()
                        flush_every = self.rng.randint(a.flush_every // 2 + 1, a.flush_every)
                    else:
                        self.issue_write()
                    stopping = a.count and len(self.writes) >= a.count
                self.h.poll(100)
                self.reap()
                oldest = min(self.started.values(), default=now)
                if time.monotonic() - oldest > a.hang:
                    self.hang = True
                    break
            if a.final_flush and not self.hang:
                cut = len(self.acks)
                try:
                    self.h.flush()
                    self.flush_cuts.append(cut)
                except nbd.Error as e:
                    if self.h.aio_is_dead() or self.h.aio_is_closed():
                        raise
                    self.flush_errors.append(str(e.errno or e.errnum))
            if not self.hang:
                self.h.shutdown()
        except nbd.Error as e:
            self.dead = str(e)
        for kind, i, _ in self.inflight.values():
            if kind == "w":
                self.writes[i][4] = "lost"

    def journal(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "writes": self.writes,
            "acks": self.acks,
            "flush_cuts": self.flush_cuts,
            "flush_errors": self.flush_errors,
            "errors": self.errors,
            "dead": self.dead,
            "hang": self.hang,
        }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("uri")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--count", type=int, default=0, help="stop after this many writes")
    p.add_argument("--qd", type=int, default=16)
    p.add_argument("--max-len", type=int, default=64 * 1024)
    p.add_argument("--region", type=int, default=0, help="write only below this offset")
    p.add_argument("--start", type=int, default=0, help="where the allocating frontier starts")
    p.add_argument("--gen-base", type=int, default=0, help="generations continue from here")
    p.add_argument("--flush-every", type=int, default=64)
    p.add_argument("--fua", type=float, default=0.05, help="fraction of writes with FUA")
    p.add_argument("--hang", type=float, default=20.0)
    p.add_argument("--final-flush", action="store_true")
    load = Load(p.parse_args())
    load.run()
    json.dump(load.journal(), sys.stdout)
    print()


if __name__ == "__main__":
    main()
