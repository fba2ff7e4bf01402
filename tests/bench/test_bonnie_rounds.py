"""bonnie --repeat: rounds in alternating order, medians, and a ratio per round."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from bench import bonnie
from bench.bonnie import BonnieConfig, BonnieResult, BonnieRow, BonnieRun
from bench.proc import BenchError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from bench.ui import UI

ROWS = bonnie.select(bonnie.ROWS, ["tap-raw", "loop", "nbdkit-file"])


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The rows run_bonnie runs, in order; each result's read figure is its place."""
    ran: list[str] = []

    def fake_row(row: BonnieRow, cfg: BonnieConfig, *_: object) -> BonnieResult:
        ran.append(row.key)
        return BonnieResult(row.key, values={"read": float(len(ran))})

    @contextmanager
    def no_daemon(state_dir: Path) -> Iterator[Path]:
        yield state_dir

    monkeypatch.setattr(bonnie, "row_unavailable", lambda *_: None)
    monkeypatch.setattr(bonnie, "_run_row", fake_row)
    monkeypatch.setattr(bonnie, "tapnbd_daemon", no_daemon)
    return ran


def test_rounds_alternate_the_order_of_the_rows(tmp_path: Path, ran: list[str]) -> None:
    r = bonnie.run_bonnie(BonnieConfig(rows=ROWS, repeat=3, warm_up=False), tmp_path)
    keys = ["tap-raw", "loop", "nbdkit-file"]
    assert ran == keys + keys[::-1] + keys
    assert [res.rep for res in r.results] == [0] * 3 + [1] * 3 + [2] * 3
    # tap-raw ran 1st, 6th and 7th: its median is 6; nbdkit-file 3rd, 4th and 9th.
    assert r.value("tap-raw", "read") == 6.0
    assert r.value("tap-raw", "read", rep=1) == 6.0
    assert r.ratios("tap-raw", "nbdkit-file", "read") == [1 / 3, 6 / 4, 7 / 9]


def test_a_warm_up_row_runs_first_and_is_not_measured(tmp_path: Path, ran: list[str]) -> None:
    r = bonnie.run_bonnie(BonnieConfig(rows=ROWS, repeat=2), tmp_path)
    keys = ["tap-raw", "loop", "nbdkit-file"]
    assert ran == ["tap-raw", *keys, *keys[::-1]]
    assert [(res.row, res.rep) for res in r.results] == [(k, 0) for k in keys] + [
        (k, 1) for k in keys[::-1]
    ]
    # tap-raw's measured rows ran 2nd and 7th; the warm-up (1st) counts for nothing.
    assert r.value("tap-raw", "read") == 4.5
    assert any("warm-up row of Tap raw" in note for note in r.notes)
    assert not BonnieConfig.quick_config().warm_up  # a smoke run stays short


def test_a_failed_warm_up_is_logged_and_the_rounds_still_run(
    tmp_path: Path, ran: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    row_ok = bonnie._run_row  # the fixture's fake

    def fail_first(
        row: BonnieRow, cfg: BonnieConfig, work: Path, state: Path | None, ui: UI
    ) -> BonnieResult:
        if not ran:  # the warm-up
            ran.append(f"{row.key} failed")
            raise BenchError("mkfs.ext4 failed")
        return row_ok(row, cfg, work, state, ui)

    monkeypatch.setattr(bonnie, "_run_row", fail_first)
    r = bonnie.run_bonnie(BonnieConfig(rows=ROWS, repeat=1), tmp_path)
    assert ran == ["tap-raw failed", "tap-raw", "loop", "nbdkit-file"]
    assert [res.row for res in r.results] == ["tap-raw", "loop", "nbdkit-file"]
    assert not any(res.error for res in r.results)


def _run(values: list[tuple[str, int, float | None]], repeat: int) -> BonnieRun:
    results = [BonnieResult(key, values={"read": v}, rep=rep) for key, rep, v in values]
    return BonnieRun(BonnieConfig(rows=ROWS, repeat=repeat), results, {}, [])


def test_medians_skip_untimed_rounds_and_failed_rows() -> None:
    r = _run([("loop", 0, None), ("loop", 1, 10.0), ("loop", 2, 30.0)], repeat=3)
    r.results.append(BonnieResult("loop", values={"read": 1e9}, rep=2, error="umount"))
    assert r.value("loop", "read") == 20.0  # "+++++" and the failed row are left out
    assert r.value("loop", "read", rep=0) is None
    assert r.value("tap-raw", "read") is None


def test_targets_and_summary_show_each_round() -> None:
    r = _run(
        [
            ("tap-raw", 0, 2.0),
            ("nbdkit-file", 0, 4.0),
            ("tap-raw", 1, 3.0),
            ("nbdkit-file", 1, 2.0),
        ],
        repeat=2,
    )
    t = bonnie.targets_table(r)
    assert t.headers[-1] == "each round"
    line = next(row for row in t.rows if row[0] == "Tap raw >= 1.0x nbdkit file, block read")
    assert line[1:] == ["0.83", "no", "0.50 1.50"]  # medians 2.5 / 3.0
    summary = {s["row"]: s for s in bonnie.summary_rows(r)}
    assert summary["tap-raw"]["read_kps"] == 2.5
    assert "medians of 2 rounds" in bonnie.summary_table(r).title
    assert [row[1] for row in bonnie.full_table(r).rows] == ["1", "1", "2", "2"]
