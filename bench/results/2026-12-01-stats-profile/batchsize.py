"""``tapnbd`` with Stats.settle wrapped to count batch sizes (requests served at once
per batch); writes batches.txt at exit. A throwaway measurement, run as

    .venv/bin/python batchsize.py serve IMG --format raw --socket S
"""

import atexit
import collections
import sys

from tapnbd import stats
from tapnbd.cli import main

_settle = stats.Stats.settle
sizes: collections.Counter[int] = collections.Counter()


def settle(self: stats.Stats, t0: int) -> None:
    sizes[len(self.inline_reads) + len(self.inline_writes)] += 1
    _settle(self, t0)


def dump() -> None:
    n = sum(sizes.values())
    reqs = sum(k * v for k, v in sizes.items())
    with open("batches.txt", "w") as f:
        print(f"batches {n} requests {reqs} mean {reqs / max(n, 1):.2f}", file=f)
        for k in sorted(sizes):
            print(k, sizes[k], file=f)


stats.Stats.settle = settle  # type: ignore[method-assign]
atexit.register(dump)
sys.argv[0] = "tapnbd"
main()
