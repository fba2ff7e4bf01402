"""Where a 4 KiB read's cost goes, raw against optimised qcow, in process (session 20).

The images of ``python -m bench.fastpath`` (64 MiB each, same data, warm). Each case is
timed over the same 20000 seeded random offsets in thread CPU time, 11 interleaved
rounds, median in microseconds per call:

- ``noop``: the loop alone; ``read_at``: the qcow mapping alone (``QcowDriver.read_at``);
- ``take_give``: a pooled buffer taken and given back;
- ``raw_pre`` / ``qcow_pre@host``: take, one ``preadv(RWF_NOWAIT)``, give, on the raw
  file at the guest offsets and on the qcow file at the mapped offsets (the kernel's part);
- ``raw.pread_nowait`` / ``qcow.pread_nowait``: the drivers' fast paths.

    cd /work/main && .venv/bin/python bench/results/2026-12-02-s20-profiles/readcost.py
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench.fastpath import BS, SIZE, _images
from formats import open_image
from formats.qcow.driver import QcowDriver
from formats.raw import RawDriver
from tapnbd import buffers

Case = tuple[Callable[[int, int], object], list[int]]


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="readcost-", dir="/var/tmp") as tmp:
        raw_path, qcow_path = await _images(Path(tmp))
        r = await open_image(str(raw_path), fmt="raw", read_only=True)
        q = await open_image(str(qcow_path), fmt="qcow", read_only=True)
        assert isinstance(r, RawDriver) and isinstance(q, QcowDriver) and q.fast_path
        rng = random.Random(5)
        offsets = [rng.randrange(SIZE // BS) * BS for _ in range(20000)]
        hosts = [q.read_at(o, BS) for o in offsets]
        rfd, qfd = r.fd, q.read_fd()

        def pre(fd: int) -> Callable[[int, int], object]:
            def call(o: int, n: int) -> None:
                buf = buffers.take(n)
                os.preadv(fd, [buf], o, os.RWF_NOWAIT)
                buffers.give(buf)

            return call

        def fast(
            read: Callable[[int, int], bytes | bytearray | None],
        ) -> Callable[[int, int], object]:
            def call(o: int, n: int) -> None:
                got = read(o, n)
                if isinstance(got, bytearray):
                    buffers.give(got)

            return call

        cases: dict[str, Case] = {
            "noop": (lambda o, n: None, offsets),
            "read_at": (q.read_at, offsets),
            "take_give": (lambda o, n: buffers.give(buffers.take(n)), offsets),
            "raw_pre": (pre(rfd), offsets),
            "qcow_pre@host": (pre(qfd), hosts),
            "raw.pread_nowait": (fast(r.pread_nowait), offsets),
            "qcow.pread_nowait": (fast(q.pread_nowait), offsets),
        }

        def timed(fn: Callable[[int, int], object], offs: list[int]) -> float:
            t0 = time.thread_time()
            for o in offs:
                fn(o, BS)
            return (time.thread_time() - t0) / len(offs) * 1e6

        for fn, offs in cases.values():
            timed(fn, offs)
        res: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(11):
            for k, (fn, offs) in cases.items():
                res[k].append(timed(fn, offs))
        for k, v in res.items():
            print(f"{k:18} {statistics.median(v):.3f} us/call")
        await r.close()
        await q.close()


if __name__ == "__main__":
    asyncio.run(main())
