"""Bonnie's Tap raw row through ``tapnbd serve`` + nbdfuse + loop by hand (the peers'
path) instead of ``tapnbd attach --via fuse``, against nbdkit file, rounds alternating.

    cd /work/main && .venv/bin/python bench/results/2026-12-02-s21-bonnie-serve/run.py

Session 22: ``run.py OUT ROUNDS`` writes elsewhere, and the server's tree is
PYTHONPATH's, so a patched worktree can be measured the same way.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from rich.console import Console

from bench import bonnie
from bench.report import machine, machine_markdown

OUT = Path(__file__).resolve().parent


def main(out: Path = OUT, rounds: int = 4) -> None:
    out.mkdir(exist_ok=True)
    cfg = bonnie.BonnieConfig()
    cfg.attach = "nbdfuse"
    cfg.repeat = rounds
    cfg.rows = bonnie.select(bonnie.ROWS, ["tap-raw", "nbdkit-file"])
    with tempfile.TemporaryDirectory(prefix="bonnie-serve-", dir="/var/tmp") as work:
        r = bonnie.run_bonnie(cfg, Path(work), Console(stderr=True))
    for path in bonnie.write_outputs(r, out, machine_markdown(machine())):
        print("wrote", path)


if __name__ == "__main__":
    if len(sys.argv) == 3:
        main(Path(sys.argv[1]), int(sys.argv[2]))
    else:
        main()
