"""Medians of clients.sh's output, per job count and variant, and each over ``tap``.

    python3 poll_medians.py run4.txt
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict


def main(path: str) -> None:
    cells: defaultdict[tuple[int, str], list[float]] = defaultdict(list)
    with open(path) as f:
        for line in f:
            fields = line.split()
            cells[(int(fields[0]), fields[2])].append(float(fields[3]))
    for (jobs, variant), xs in sorted(cells.items()):
        med = statistics.median(xs)
        tap = statistics.median(cells[(jobs, "tap")])
        rounds = " ".join(str(int(x)) for x in xs)
        print(f"jobs {jobs} {variant:20s} median {med:7.0f}  x tap {med / tap:.2f}  [{rounds}]")


if __name__ == "__main__":
    main(sys.argv[1])
