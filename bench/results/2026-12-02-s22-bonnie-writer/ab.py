"""Bonnie's Tap raw row with big WRITEs copied inline (main) and by one writer thread
(``../2026-12-02-s22-bonnie-write/bigwrite.diff``), against nbdkit file, the three cells
in rotated order each round. The server's tree is PYTHONPATH's, with the diff applied;
``BIGPOOL`` picks the variant per cell (0: inline, as main).

    PYTHONPATH=/work/wt-pool python ab.py OUT ROUNDS
"""

from __future__ import annotations

import csv
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from rich.console import Console

from bench import bonnie
from bench.ui import UI

#: (label, row key, BIGPOOL)
CELLS = [
    ("inline", "tap-raw", "0"),
    ("writer", "tap-raw", "262144"),
    ("nbdkit", "nbdkit-file", "0"),
]


def main(out: Path, rounds: int) -> None:
    out.mkdir(exist_ok=True)
    cfg = bonnie.BonnieConfig()
    cfg.attach = "nbdfuse"
    rows = {r.key: r for r in bonnie.ROWS}
    got: list[dict[str, object]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bonnie-ab-", dir="/var/tmp") as work,
        UI("bonnie", 3 * rounds, Console(stderr=True)) as ui,
    ):
        for rep in range(rounds):
            for label, key, big in CELLS[rep % 3 :] + CELLS[: rep % 3]:
                os.environ["BIGPOOL"], os.environ["BIGW"] = big, "1"
                r = bonnie._run_row(rows[key], cfg, Path(work), None, ui)
                got.append(
                    {
                        "round": rep + 1,
                        "cell": label,
                        "write_kps": r.values.get("write"),
                        "read_kps": r.values.get("read"),
                        "error": r.error,
                    }
                )
                print(got[-1], flush=True)
                ui.advance()
    with open(out / "ab.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(got[0]))
        w.writeheader()
        w.writerows(got)
    by: dict[tuple[int, str], float] = {}
    for g in got:
        if isinstance(g["write_kps"], float):
            by[(int(str(g["round"])), str(g["cell"]))] = g["write_kps"]
    for cell in ("inline", "writer"):
        ratios = [
            by[(rep, cell)] / by[(rep, "nbdkit")]
            for rep in range(1, rounds + 1)
            if (rep, cell) in by and (rep, "nbdkit") in by
        ]
        if ratios:
            each = " ".join(f"{x:.2f}" for x in ratios)
            print(f"{cell} / nbdkit, block write: median {statistics.median(ratios):.2f} ({each})")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
