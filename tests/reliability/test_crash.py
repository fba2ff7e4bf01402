"""kill -9 of the server in the middle of a write load, on both qcow layouts (issue 3).

Each round (crash.py) kills ``tapnbd serve`` at a random moment while nbdload writes,
flushes and sends FUA writes, then checks that the image opens, that ``tapnbd check``
finds no corruption, that ``qemu-img convert`` reads it, that every write acknowledged
before the last completed FLUSH is there and every other sector is old or new data,
never garbage, and that tapnbd reads the same bytes as qemu. ``make crash`` runs the
same rounds 50 times per layout, plus kills of ``tapnbd daemon``.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.helpers import need
from tests.reliability.crash import LAYOUTS, crash_round

ROUNDS = 5


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_kill9_during_writes_loses_nothing_flushed(tmp_path: Path, layout: str, seed: int) -> None:
    need("qemu-img", "nbdcopy")
    seeds = random.Random(seed).sample(range(1 << 30), ROUNDS)
    rounds = []
    for i, seed in enumerate(seeds):
        work = tmp_path / str(i)
        work.mkdir()
        r = crash_round(work, layout, seed, size="256M", region=48 << 20, latest=1.0)
        rounds.append(r)
        assert r.ok, f"{r.row()}\n" + "\n".join(r.failures)
    # The rounds really crashed mid-load and really checked something.
    assert all(r.lost + r.acked == r.writes for r in rounds)
    assert sum(r.must for r in rounds) > 0 and sum(r.durable for r in rounds) > 0
