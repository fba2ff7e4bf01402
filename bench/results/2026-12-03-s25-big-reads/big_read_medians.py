"""Medians of clients.sh's cells, grouped by the leading fields, each over nbdkit's.

    python3 big_read_medians.py threads.txt
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict


def main(path: str) -> None:
    cells: defaultdict[tuple[str, ...], defaultdict[str, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    with open(path) as f:
        for line in f:
            fields = line.split()
            # ... ROUND VARIANT IOPS, after the pattern's own fields
            cells[tuple(fields[:-3])][fields[-2]].append(float(fields[-1]))
    for group, variants in cells.items():
        nk = statistics.median(variants["nk"]) if "nk" in variants else 0.0
        out = []
        for name, xs in variants.items():
            med = statistics.median(xs)
            ratio = f"{med / nk:.2f}" if nk else "-"
            out.append(f"{name} {med:.0f} ({ratio})")
        print(" ".join(group) + ":  " + ";  ".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
