#!/usr/bin/env python3
"""Start-up A/B: ``startup_ab.py TREE_A TREE_B ROUNDS TINY_RAW`` runs ``tapnbd convert -q
-t unsafe -f raw -O raw TINY_RAW`` with each checkout in turn (alternating which goes
first; the first round is a warm-up) and prints the medians of user+sys CPU in ms."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys


def main() -> None:
    trees, rounds, tiny = sys.argv[1:3], int(sys.argv[3]), sys.argv[4]
    res: dict[str, list[float]] = {t: [] for t in trees}
    dst = tiny + ".startup-out"
    for i in range(rounds + 1):
        for tree in trees if i % 2 == 0 else trees[::-1]:
            if os.path.exists(dst):
                os.unlink(dst)
            cmd = [sys.executable, "-m", "tapnbd", "convert", "-q", "-t", "unsafe"]
            p = subprocess.Popen(
                [*cmd, "-f", "raw", "-O", "raw", tiny, dst],
                env={"PYTHONPATH": tree, "PATH": "/usr/bin:/bin"},
                cwd="/",  # never a checkout: python -m puts it before PYTHONPATH
            )
            _pid, status, ru = os.wait4(p.pid, 0)
            assert status == 0, tree
            if i:
                res[tree].append((ru.ru_utime + ru.ru_stime) * 1000)
    os.unlink(dst)
    for tree, ms in res.items():
        q1 = statistics.quantiles(ms)[0]
        print(
            f"{tree:24} median {statistics.median(ms):6.1f} ms  mean {statistics.mean(ms):6.1f}"
            f"  min {min(ms):6.1f}  q1 {q1:6.1f}"
        )


if __name__ == "__main__":
    main()
