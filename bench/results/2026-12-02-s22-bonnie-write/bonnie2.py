"""Bonnie, Tap raw (``tapnbd serve`` + nbdfuse + loop by hand) against nbdkit file, for
ROUNDS rounds in alternating order, into OUT. The server's tree is PYTHONPATH's, so a
patched worktree (``trace.diff``, ``bigwrite.diff``) can be measured:

    PYTHONPATH=/work/wt python3 bonnie2.py OUT ROUNDS
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from rich.console import Console

from bench import bonnie
from bench.report import machine, machine_markdown


def main(out: Path, rounds: int) -> None:
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
    main(Path(sys.argv[1]), int(sys.argv[2]))
