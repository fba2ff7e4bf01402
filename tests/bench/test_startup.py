"""The start-up benchmark: commands interleaved, ratios per round against the baseline."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import startup
from tests.helpers import need


def test_ratio_is_per_round_against_the_baseline() -> None:
    run = startup.StartupRun(
        startup.StartupConfig(rounds=3),
        [startup.BASELINE, "x"],
        {startup.BASELINE: [1.0, 2.0, 1.0], "x": [1.5, 3.0, 3.0]},
    )
    assert run.ratios("x") == [1.5, 1.5, 3.0]
    row = startup.table(run).rows[1]
    # Median of the per-round ratios (1.5), not median(x)/median(baseline) (3.0/1.0).
    assert row[0] == "x" and row[3] == "1.50" and row[4] == "1.50"


def test_quick_run_times_every_command_each_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need("qemu-img")
    order: list[str] = []
    real = startup._time

    def timed(cmd: list[str]) -> float:
        order.append(" ".join(cmd[-2:]))
        return real(cmd)

    monkeypatch.setattr(startup, "_time", timed)
    cfg = startup.StartupConfig(rounds=2, warmup=1, image_size="16M")
    run = startup.run_startup(cfg, tmp_path)
    n = len(run.names)
    assert {startup.BASELINE, "tapnbd --version", "tapnbd info qcow2"} <= set(run.names)
    assert all(len(t) == 2 and min(t) > 0 for t in run.times.values())
    # Three rounds (one warm-up), each a rotation of the last.
    rounds = [order[i * n : (i + 1) * n] for i in range(3)]
    assert rounds[1] == rounds[0][1:] + rounds[0][:1] and rounds[2] != rounds[1]
    paths = startup.write_outputs(run, tmp_path / "out", "python -m bench startup", "")
    assert "tapnbd info vpc" in paths[0].read_text()
    assert len(paths[1].read_text().splitlines()) == 1 + 2 * n


def test_a_bench_error_ends_the_command_with_code_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from bench.__main__ import app
    from bench.proc import BenchError

    def fail(cfg: startup.StartupConfig, work: Path) -> startup.StartupRun:
        assert work == tmp_path / "work"  # the scratch directory the command was given
        raise BenchError("qemu-img is needed to make the images")

    monkeypatch.setattr(startup, "run_startup", fail)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["startup", "--out", str(out), "--workdir", str(tmp_path / "work")]
    )
    assert result.exit_code == 2
    assert "bench: qemu-img is needed" in result.output
    assert not out.exists()  # nothing written for a run that did not happen
