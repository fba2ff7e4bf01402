"""``PYTHONPATH=. python pairs.py`` (from the checkout's root): each tapnbd variant of
``incr8.txt`` and ``incr16.txt`` over the nbdkit cell of its round; medians of the
paired ratios with the sign test's 95 % interval."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from bench.report import median_interval

HERE = Path(__file__).parent
CELL = re.compile(r"(\d+) (\S+)\s+(\d+) MiB/s\s+client ([\d.]+) ms/MiB\s+server ([\d.]+)")


def main() -> None:
    for name in ("incr8.txt", "incr16.txt"):
        rounds: dict[str, dict[str, list[float]]] = {}
        for m in filter(None, map(CELL.match, (HERE / name).read_text().splitlines())):
            rounds.setdefault(m[1], {})[m[2]] = [float(m[i]) for i in (3, 4, 5)]
        for variant in sorted({v for r in rounds.values() for v in r} - {"nk"}):
            for i, what in enumerate(("MiB/s", "fio CPU/MiB", "server CPU/MiB")):
                xs = [r[variant][i] / r["nk"][i] for r in rounds.values()]
                lo, hi = median_interval(xs) or (float("nan"), float("nan"))
                med = statistics.median(xs)
                print(f"{name:10s} {variant:32s} {what:14s} {med:.3f} [{lo:.2f}-{hi:.2f}]")


if __name__ == "__main__":
    main()
