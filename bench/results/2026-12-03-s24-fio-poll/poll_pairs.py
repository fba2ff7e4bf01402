"""Each repetition's ratios of this run's fio.csv, paired by repetition:
``python3 poll_pairs.py`` in this directory."""

from __future__ import annotations

import csv
import statistics as st

v: dict[tuple[str, str, str], float] = {}
for r in csv.DictReader(open("fio.csv")):
    if r["value"]:
        v[(r["run"], r["job"], r["target"])] = float(r["value"])
jobs = ["seqread", "seqwrite", "randread", "randwrite", "randread-qd1"]
runs = sorted({k[0] for k in v}, key=int)
print("per-repetition ratios, median [min-max]; medians of each row")
for a, b in [
    ("tapnbd-raw-poll", "tapnbd-raw"),
    ("tapnbd-raw-poll", "nbdkit-raw"),
    ("tapnbd-raw", "nbdkit-raw"),
]:
    for j in jobs:
        rs = [v[(r, j, a)] / v[(r, j, b)] for r in runs if (r, j, a) in v and (r, j, b) in v]
        each = " ".join(f"{x:.2f}" for x in rs)
        print(
            f"{a:16} / {b:11} {j:13} n={len(rs)} median {st.median(rs):.2f} "
            f"[{min(rs):.2f}-{max(rs):.2f}]  {each}"
        )
for t in ["tapnbd-raw", "tapnbd-raw-poll", "nbdkit-raw"]:
    meds = [f"{j}={st.median([v[(r, j, t)] for r in runs if (r, j, t) in v]):.0f}" for j in jobs]
    print(t, " ".join(meds))
