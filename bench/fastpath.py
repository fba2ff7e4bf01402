"""The cost of one 4 KiB read at ``Backend.try_pread`` level: qcow optimised against raw.

This is the per-request Python a random 4 KiB read pays before the socket (issue 15,
item 2). Both images are 64 MiB, every cluster written with the same bytes and warm in
the page cache; the reads are at seeded random 4 KiB-aligned offsets, the same for both.
Rounds alternate raw and qcow, so drift on a loaded machine hits both alike, and each
round is timed in this thread's CPU time (user and system), which other processes on a
busy machine disturb far less than the wall clock; the figure is the median over rounds,
in microseconds per call.

    python -m bench.fastpath [--rounds 21] [--calls 20000] [--seed N]

Not part of ``python -m bench``: a micro-benchmark to read a code change by.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from formats import OpenRules, open_image
from formats.qcow.create import create_qcow
from tapnbd.backend import Backend
from tapnbd.driver import Driver

MiB = 1 << 20
SIZE = 64 * MiB
BS = 4096


async def _images(work: Path) -> tuple[Path, Path]:
    data = random.Random(1).randbytes(MiB)
    raw, qcow = work / "raw.img", work / "opt.qcow"
    with raw.open("wb") as f:
        for _ in range(SIZE // MiB):
            f.write(data)
    await create_qcow(str(qcow), SIZE, optimise=True, rules=OpenRules())
    d = await open_image(str(qcow), fmt="qcow")
    try:
        for pos in range(0, SIZE, MiB):
            await d.pwrite(pos, data)
    finally:
        await d.close()  # a clean close: the checksum matches, the fast path is on
    return raw, qcow


def _time(backend: Backend, offsets: list[int]) -> float:
    """Microseconds per try_pread call, of calls answered at once.

    A call may fall back (the page was evicted under memory pressure: EAGAIN); more
    than 1 % of them spoils the round.
    """
    try_pread = backend.try_pread
    missed = 0
    t0 = time.thread_time()
    batch = backend.stats.begin()  # one batch, as a connection counts what it serves at once
    for off in offsets:
        if try_pread(off, BS) is None:
            missed += 1
    backend.stats.settle(batch)
    spent = time.thread_time() - t0
    if missed * 100 > len(offsets):
        raise SystemExit(f"{missed} of {len(offsets)} reads fell back to the async path")
    return spent / len(offsets) * 1e6


async def _main(rounds: int, calls: int, seed: int) -> None:
    print(f"seed {seed}, {rounds} rounds of {calls} calls, python {sys.version.split()[0]}")
    rng = random.Random(seed)
    offsets = [rng.randrange(SIZE // BS) * BS for _ in range(calls)]
    with tempfile.TemporaryDirectory(prefix="fastpath-") as tmp:
        raw_path, qcow_path = await _images(Path(tmp))
        drivers: dict[str, Driver] = {
            "raw": await open_image(str(raw_path), fmt="raw", read_only=True),
            "qcow": await open_image(str(qcow_path), fmt="qcow", read_only=True),
        }
        try:
            if not getattr(drivers["qcow"], "fast_path", False):
                raise SystemExit("the qcow image did not open with the fast path on")
            backends = {name: Backend(d, read_only=True) for name, d in drivers.items()}
            for b in backends.values():  # warm: page cache, buffers, specialisation
                _time(b, offsets[: calls // 10])
            times: dict[str, list[float]] = {name: [] for name in backends}
            for _ in range(rounds):
                for name, b in backends.items():
                    times[name].append(_time(b, offsets))
        finally:
            for d in drivers.values():
                await d.close()
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:5} {med[name]:.3f} us/call (min {min(t):.3f}, max {max(t):.3f})")
    print(
        f"qcow - raw: {med['qcow'] - med['raw']:+.3f} us; raw/qcow {med['raw'] / med['qcow']:.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    a = ap.parse_args(argv)
    asyncio.run(_main(a.rounds, a.calls, a.seed))


if __name__ == "__main__":
    main()
