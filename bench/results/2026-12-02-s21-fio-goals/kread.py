"""Kernel part of a random 4 KiB read over 1 GiB images: raw offsets vs qcow mapped offsets."""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench.proc import warm
from formats import open_image
from tapnbd import buffers

RAW, QCOW = sys.argv[1], sys.argv[2]
BS = 4096


async def main() -> None:
    q = await open_image(QCOW, fmt="qcow", read_only=True)
    size = q.size()
    rng = random.Random(5)
    offs = [rng.randrange(size // BS) * BS for _ in range(200000)]
    hosts = [q.read_at(o, BS) for o in offs]
    rfd = os.open(RAW, os.O_RDONLY)
    qfd = q.read_fd()
    for p in (RAW, QCOW):
        warm(Path(p))

    misses = [0]

    def timed(fd: int, xs: list[int]) -> float:
        t0 = time.thread_time()
        for o in xs:
            buf = buffers.take(BS)
            try:
                os.preadv(fd, [buf], o, os.RWF_NOWAIT)
            except BlockingIOError:
                misses[0] += 1
            buffers.give(buf)
        return (time.thread_time() - t0) / len(xs) * 1e6

    res: dict[str, list[float]] = {"raw": [], "qcow": []}
    for _ in range(7):
        res["raw"].append(timed(rfd, offs))
        res["qcow"].append(timed(qfd, hosts))
    for k, v in res.items():
        print("misses", misses[0])
        print(f"{k:5} {statistics.median(v):.3f} us/read  {[round(x, 2) for x in v]}")
    await q.close()


asyncio.run(main())
