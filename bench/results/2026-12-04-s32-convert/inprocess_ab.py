#!/usr/bin/env python3
"""The copy alone, without start-up: A/B of two tapnbd checkouts.

    inprocess_ab.py TREE_A TREE_B ROUNDS SRC SRC_FMT OUT_FMT CACHE

Each round starts one fresh process per tree (in turn first), which imports tapnbd from
that tree, then times one ``convert_image`` (getrusage of the process around the call:
user, sys, minor faults). Medians per tree, and the per-round ratios B/A.
"""

from __future__ import annotations

import statistics
import subprocess
import sys

CHILD = """
import asyncio, os, resource, sys, time
from formats.qcow.convert import CopyTuning, convert_image
src, fmt, out, cache, dst = sys.argv[1:6]
if os.path.exists(dst):
    os.unlink(dst)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
asyncio.run(convert_image(src, dst, out, src_fmt=fmt, tuning=CopyTuning(cache=cache)))
t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
os.unlink(dst)
print(t1 - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt)
"""


def main() -> None:
    a, b, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    src, fmt, out, cache = sys.argv[4:8]
    res: dict[str, list[tuple[float, ...]]] = {a: [], b: []}
    for r in range(rounds):
        for tree in (a, b) if r % 2 == 0 else (b, a):
            dst = f"{src}.ab-out.{out}"
            got = subprocess.run(
                [sys.executable, "-c", CHILD, src, fmt, out, cache, dst],
                env={"PYTHONPATH": tree, "PATH": "/usr/bin:/bin"},
                cwd="/",  # never a checkout: it would come before PYTHONPATH
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            res[tree].append(tuple(float(x) for x in got.split()))
    med = statistics.median
    for tree, runs in res.items():
        print(
            f"{tree:24} wall {med(x[0] for x in runs):.3f} user {med(x[1] for x in runs):.3f} "
            f"sys {med(x[2] for x in runs):.3f} cpu {med(x[1] + x[2] for x in runs):.3f} "
            f"minflt {med(x[3] for x in runs):.0f}"
        )
    for name, i in (("user", 1), ("cpu", None)):
        ratios = [
            (y[1] + y[2]) / (x[1] + x[2]) if i is None else y[i] / x[i]
            for x, y in zip(res[a], res[b], strict=True)
        ]
        print(f"{name} B/A per round:", " ".join(f"{q:.2f}" for q in ratios))


if __name__ == "__main__":
    main()
