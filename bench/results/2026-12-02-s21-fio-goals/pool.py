"""Per-repetition goal ratios pooled over several fio goal runs, with bootstrap intervals."""

from __future__ import annotations

import csv
import random
import statistics as st
import sys
from collections import defaultdict

PAIRS = [
    ("tapnbd raw / nbdkit", "tapnbd-raw", "nbdkit-raw"),
    ("statistics on / off", "tapnbd-raw", "tapnbd-raw-nostats"),
    ("qcow opt / raw", "tapnbd-qcow-opt-full", "tapnbd-raw"),
]
JOBS = ["seqread", "seqwrite", "randread", "randwrite"]

ratios: dict[tuple[str, str], list[float]] = defaultdict(list)
for d in sys.argv[1:]:
    v: dict[tuple[str, str, str], float] = {}
    with open(f"{d}/fio.csv") as f:
        for r in csv.DictReader(f):
            if r["value"]:
                v[(r["run"], r["job"], r["target"])] = float(r["value"])
    runs = sorted({k[0] for k in v}, key=int)
    for name, a, b in PAIRS:
        for j in JOBS:
            for run in runs:
                if (run, j, a) in v and (run, j, b) in v:
                    ratios[(name, j)].append(v[(run, j, a)] / v[(run, j, b)])
rng = random.Random(1)
for (name, j), xs in ratios.items():
    boots = sorted(st.median(rng.choices(xs, k=len(xs))) for _ in range(2000))
    print(
        f"{name:22} {j:9} n={len(xs):2} median {st.median(xs):.3f} "
        f"[{boots[50]:.3f}-{boots[1949]:.3f}]  share>=thr "
        f"{sum(x >= (0.95 if 'qcow' in name else 0.98 if 'stat' in name else 1.0) for x in xs) / len(xs):.2f}"
    )
