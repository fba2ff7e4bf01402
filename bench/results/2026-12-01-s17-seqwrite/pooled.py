"""``PYTHONPATH=. python pooled.py`` (from the checkout's root, this directory's files):
tapnbd raw / nbdkit file on seq write 1M QD8, paired cell by cell within each round or
repetition, for every set of this session, and pooled: MiB/s, and client (fio) and
server CPU per MiB. Medians with the sign test's 95 % interval."""

from __future__ import annotations

import collections
import csv
import re
import statistics
from pathlib import Path

from bench.report import median_interval

HERE = Path(__file__).parent
Pair = tuple[float, float, float]  # tapnbd / nbdkit: MiB/s, client, server CPU per MiB
LINE = re.compile(r"(\d+) (\S+)\s+(\d+) MiB/s\s+client ([\d.]+) ms/MiB\s+server ([\d.]+)")


def from_cpm(name: str, variant: str) -> list[Pair]:
    rounds: dict[int, dict[str, tuple[float, ...]]] = collections.defaultdict(dict)
    for line in (HERE / name).read_text().splitlines():
        if m := LINE.match(line):
            rounds[int(m[1])][m[2]] = (float(m[3]), float(m[4]), float(m[5]))
    out = []
    for r in rounds.values():
        a, b = r[variant], r["nk"]
        out.append((a[0] / b[0], a[1] / b[1], a[2] / b[2]))
    return out


def from_bench(name: str) -> list[Pair]:
    reps: dict[str, dict[str, tuple[float, ...]]] = collections.defaultdict(dict)
    with (HERE / name / "fio.csv").open() as f:
        for row in csv.DictReader(f):
            v = float(row["value"])
            cpu = (float(row["client_cpu_pct"]) / v, float(row["server_cpu_pct"]) / v)
            reps[row["run"]][row["target"]] = (v, *cpu)
    out = []
    for r in reps.values():
        a, b = r["tapnbd-raw"], r["nbdkit-raw"]
        out.append((a[0] / b[0], a[1] / b[1], a[2] / b[2]))
    return out


def show(label: str, pairs: list[Pair]) -> None:
    for i, what in enumerate(("MiB/s", "client CPU/MiB", "server CPU/MiB")):
        xs = [p[i] for p in pairs]
        ci = median_interval(xs)
        span = f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else "-"
        print(f"{label:22s} {what:15s} n={len(xs):2d}  {statistics.median(xs):.3f}  [{span}]")


def main() -> None:
    sets = {
        "cpm1.txt (splice on)": from_cpm("cpm1.txt", "tap:TAPNBD_SPLICE=1"),
        "cpm3.txt": from_cpm("cpm3.txt", "tap:"),
        "cpm4.txt": from_cpm("cpm4.txt", "tap:"),
        "bench-8": from_bench("bench-8"),
        "bench (20 reps)": from_bench("bench"),
    }
    pooled: list[Pair] = []
    for label, pairs in sets.items():
        show(label, pairs)
        pooled += pairs
    show("all", pooled)


if __name__ == "__main__":
    main()
