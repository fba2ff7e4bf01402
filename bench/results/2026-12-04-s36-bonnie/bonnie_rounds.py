"""Tap raw / nbdkit file per round, block columns, over Bonnie result directories:

    python3 bonnie_rounds.py DIR... (each with a bonnie.csv)
"""

from __future__ import annotations

import csv
import statistics
import sys

COLUMNS = ("write", "read")


def main(dirs: list[str]) -> None:
    pooled: dict[str, list[float]] = {c: [] for c in COLUMNS}
    for d in dirs:
        with open(d + "/bonnie.csv") as f:
            rows = list(csv.DictReader(f))
        by_round: dict[int, dict[str, dict[str, str]]] = {}
        for r in rows:
            by_round.setdefault(int(r["round"]), {})[r["row"]] = r
        ratios: dict[str, list[float]] = {c: [] for c in COLUMNS}
        for k in sorted(by_round):
            tap, nbdkit = by_round[k].get("tap-raw"), by_round[k].get("nbdkit-file")
            if tap is None or nbdkit is None:
                continue
            for c in COLUMNS:
                ratios[c].append(float(tap[c + "_kps"]) / float(nbdkit[c + "_kps"]))
        for c in COLUMNS:
            pooled[c] += ratios[c]
        print(d, {c: (len(v), round(statistics.median(v), 3)) for c, v in ratios.items()})
    for c, v in pooled.items():
        at_least = sum(x >= 1.0 for x in v)
        print("pooled", c, len(v), round(statistics.median(v), 3), "at>=1.0:", at_least)


if __name__ == "__main__":
    main(sys.argv[1:])
