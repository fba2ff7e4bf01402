"""Summarise interleaved `bench ring` runs: DIR/CFG-N/ring.csv, per job, config and path.

Usage: python absum.py DIR [CONFIGS]   (CONFIGS: the run-name prefixes in order, e.g. ACB)
"""

import collections
import csv
import glob
import os
import statistics
import sys


def main() -> None:
    base = sys.argv[1]
    order = sys.argv[2] if len(sys.argv) > 2 else "ACB"
    rows: dict[tuple[str, str, str], list[tuple[float, float, float, str]]] = (
        collections.defaultdict(list)
    )
    jobs: list[str] = []
    for f in sorted(glob.glob(base + "/*-*/ring.csv")):
        cfg = os.path.basename(os.path.dirname(f)).split("-")[0]
        for r in csv.DictReader(open(f)):
            if r["error"]:
                continue
            if r["job"] not in jobs:
                jobs.append(r["job"])
            iops = float(r["iops"])
            server = float(r["server_cpu_pct"]) / 100 / iops * 1e6
            client = float(r["client_cpu_pct"]) / 100 / iops * 1e6
            rows[(cfg, r["job"], r["path"])].append(
                (float(r["value"]), server, client, r["ratio_to_nbd"])
            )
    for job in jobs:
        print("==", job)
        for cfg in order:
            for path in ("nbd", "ring"):
                v = rows.get((cfg, job, path), [])
                if not v:
                    continue
                line = (
                    f"  {cfg} {path:4} value {' '.join(f'{x[0]:.0f}' for x in v):28}"
                    f" median {statistics.median(x[0] for x in v):8.0f}"
                    f"  server us/io median {statistics.median(x[1] for x in v):6.1f}"
                    f"  client us/io {statistics.median(x[2] for x in v):6.1f}"
                )
                if path == "ring":
                    line += f"  ratios {' '.join(x[3][:4] for x in v)}"
                print(line)


if __name__ == "__main__":
    main()
