"""The benchmark harness in quick mode, so that it cannot rot (figures here mean nothing)."""

from __future__ import annotations

import collections
import csv
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import fio, report, servers
from tests.helpers import need


def fio_cells(tmp_path: Path, *args: str) -> tuple[set[tuple[str, str]], str]:
    """Run ``python -m bench fio --quick ARGS``; the (target, job) cells with a figure,
    and fio.md."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "fio",
            "--quick",
            *args,
            "--out",
            str(out),
            "--workdir",
            str(work),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader((out / "fio.csv").open()))
    ran = [(r["target"], r["job"], r["run"]) for r in rows]
    assert len(ran) == len(set(ran)), "a cell recorded twice (a warm-up cell counted?)"
    cells = {(r["target"], r["job"]) for r in rows if float(r["value"] or 0) > 0}
    return cells, (out / "fio.md").read_text()


@pytest.mark.slow
def test_fio_quick_runs_tapnbd_and_a_peer(tmp_path: Path) -> None:
    need("fio", "nbdkit")
    cells, md = fio_cells(
        tmp_path,
        *("--runtime", "0.5", "--only", "tapnbd-raw", "--only", "nbdkit-raw"),
        *("--jobs", "randread", "--jobs", "seqwrite"),
    )
    assert cells == {(t, j) for t in ("tapnbd-raw", "nbdkit-raw") for j in ("randread", "seqwrite")}
    assert "tapnbd raw" in md and "nbdkit file" in md and "x ref" in md


@pytest.mark.slow
def test_fio_quick_runs_the_polling_row_one_request_at_a_time(tmp_path: Path) -> None:
    """The tapnbd-raw-poll row serves with --poll-us, and the QD 1 job runs when named."""
    need("fio")
    cells, md = fio_cells(
        tmp_path,
        *("--runtime", "0.5", "--only", "tapnbd-raw-poll", "--jobs", "randread-qd1"),
    )
    assert cells == {("tapnbd-raw-poll", "randread-qd1")}
    assert "rand read 4k QD1" in md and "tapnbd raw, polling" in md


def test_the_polling_row_serves_with_poll_us(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its server is tapnbd serve with --poll-us, and the statistics row's is not: that
    one runs with TAPNBD_STATS=off in its environment instead."""
    commands: list[list[str]] = []
    envs: list[object] = []

    class Spawned(Exception):
        pass

    def spawn(cmd: list[str], env: object = None, **_: object) -> None:
        commands.append(cmd)
        envs.append(env)
        raise Spawned

    monkeypatch.setattr(servers, "spawn", spawn)
    for key in ("tapnbd-poll", "tapnbd-nostats"):
        with pytest.raises(Spawned):
            servers._STARTERS[key](
                tmp_path / "x.raw",
                "raw",
                tmp_path,
                tmp_path / "log",
                1,
                "tcp",
                servers.ServerOptions(),
            )
    poll, nostats = commands
    assert poll[poll.index("--poll-us") + 1] == str(servers.POLL_US)
    assert "--poll-us" not in nostats
    poll_env, nostats_env = envs
    assert poll_env is None
    assert isinstance(nostats_env, dict) and nostats_env["TAPNBD_STATS"] == "off"
    assert nostats_env["PATH"] == os.environ["PATH"]  # added to the environment, not all of it


def test_the_queue_depth_one_job_runs_only_when_named() -> None:
    assert fio.select_jobs(None) == list(fio.JOBS)
    assert [j.key for j in fio.select_jobs(["randread"])] == ["randread"]
    assert [j.key for j in fio.select_jobs(["randread*"])] == ["randread", "randread-qd1"]


@pytest.mark.slow
def test_fio_quick_runs_the_qcow2_rows(tmp_path: Path) -> None:
    """Issue 13's rows: qcow2 full, fresh and overlay, tapnbd beside qemu-nbd."""
    need("fio", "qemu-nbd", "qemu-img")
    cells, md = fio_cells(
        tmp_path,
        *("--runtime", "0.3", "--size", "32", "--only", "*-qcow2-*"),
        *("--jobs", "randread", "--jobs", "randwrite"),
    )
    want = {
        (f"{server}-qcow2-{state}", job)
        for server in ("tapnbd", "qemu-nbd")
        for state in ("full", "fresh", "overlay")
        for job in ("randread", "randwrite")
        if state != "fresh" or job == "randwrite"
    }
    assert cells == want
    assert "qemu-nbd -f qcow2, overlay on raw" in md
    assert "qcow2 (fresh) >= 1.0x qemu-nbd -f qcow2" in md


def test_repetitions_rotate_each_jobs_targets() -> None:
    """No target always runs in the same place within its job (fio.rotated)."""
    jobs, targets = list(fio.JOBS[:2]), list(fio.TARGETS[:3])
    todo = [(j, t) for j in jobs for t in targets]
    firsts = set()
    for rep in range(3):
        cells = fio.rotated(todo, rep)
        assert sorted(cells, key=todo.index) == todo  # the same cells, each once
        assert [j for j, _ in cells] == [j for j, _ in todo]  # jobs stay in order
        firsts.add(cells[0][1].key)
    assert firsts == {t.key for t in targets}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_each_target_runs_in_each_place_and_after_each_other_equally(n: int) -> None:
    """A Williams design: over n rows (2n when n is odd), a Latin square in places, and
    every ordered pair of targets adjacent equally often (fio.williams_row)."""
    rows = [fio.williams_row(n, rep) for rep in range(n if n % 2 == 0 else 2 * n)]
    assert all(sorted(r) == list(range(n)) for r in rows)
    for place in range(n):
        counts = collections.Counter(r[place] for r in rows)
        assert len(set(counts.values())) == 1 and len(counts) == n
    pairs = collections.Counter((a, b) for r in rows for a, b in itertools.pairwise(r))
    assert len(pairs) == n * (n - 1) and len(set(pairs.values())) <= 1


def test_a_write_job_warms_each_shared_image_with_one_unmeasured_cell() -> None:
    """fio.with_warm_ups: before the first write cell of a job on each shared full image,
    one unmeasured cell of the same target; read jobs and fresh images get none."""
    by_key = {t.key: t for t in fio.TARGETS}
    jobs = {j.key: j for j in fio.JOBS}
    keys = ["tapnbd-qcow-opt-full", "tapnbd-raw", "nbdkit-raw", "tapnbd-qcow-opt-fresh"]
    todo = [(jobs[j], by_key[k]) for j in ("seqread", "seqwrite", "randwrite") for k in keys]
    got = [(j.key, t.key, m) for j, t, m in fio.with_warm_ups(todo)]
    assert [(j, k) for j, k, m in got if m] == [(j.key, t.key) for j, t in todo]
    assert [(j, k) for j, k, m in got if not m] == [
        ("seqwrite", "tapnbd-qcow-opt-full"),
        ("seqwrite", "tapnbd-raw"),
        ("randwrite", "tapnbd-qcow-opt-full"),
        ("randwrite", "tapnbd-raw"),
    ]
    for i, (j, k, m) in enumerate(got):  # each warm-up comes right before its own cell
        if not m:
            assert got[i + 1] == (j, k, True)


def test_full_images_are_warm_for_reads_and_dropped_for_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fio._image_for readies a shared image for the cell's job (bench.proc.ready_for)."""
    image = tmp_path / "fio-random.raw"
    image.write_bytes(b"\x01" * 4096)
    readied: list[tuple[Path, bool]] = []
    monkeypatch.setattr(fio, "ready_for", lambda p, writes: readied.append((p, writes)))
    raw = next(t for t in fio.TARGETS if t.key == "tapnbd-raw")
    for job in fio.JOBS:
        with fio._image_for(raw, job, fio.FioConfig(), tmp_path, {raw.layout: image}) as got:
            assert got == image
    assert readied == [(image, job.writes) for job in fio.JOBS]
    assert [w for _, w in readied] == [False, True, False, True]


def test_repetitions_table_pairs_cells_of_the_same_repetition() -> None:
    """Issue 15's ratios per repetition: a repetition missing either side is left out,
    and the median is of the paired ratios, not a ratio of medians."""
    keys = ("tapnbd-raw", "nbdkit-raw", "tapnbd-raw-nostats", "tapnbd-qcow-opt-full")
    cfg = fio.FioConfig(
        repeat=3,
        targets=[t for t in fio.TARGETS if t.key in keys],
        jobs=[j for j in fio.JOBS if j.key == "seqwrite"],
    )
    values: dict[str, list[float | None]] = {
        "tapnbd-raw": [100.0, 200.0, 300.0],
        "nbdkit-raw": [None, 400.0, 50.0],  # repetition 0 failed
        "tapnbd-raw-nostats": [100.0, 100.0, 100.0],
        "tapnbd-qcow-opt-full": [50.0, 200.0, 600.0],
    }
    cells = [
        fio.FioCell(key, "seqwrite", rep, value=v)
        for key, vs in values.items()
        for rep, v in enumerate(vs)
    ]
    run = fio.FioRun(cfg, cells, {}, [])
    assert run.per_repetition("tapnbd-raw", "nbdkit-raw", "seqwrite") == [0.5, 6.0]
    rows = {row[0]: row[2:] for row in fio.repetitions_table(run).rows}
    assert rows["tapnbd raw / nbdkit file"] == ["0.50 6.00", "3.25", ""]
    assert rows["statistics on / off"] == ["1.00 2.00 3.00", "2.00", ""]
    assert rows["qcow optimised (full) / tapnbd raw"] == ["0.50 1.00 2.00", "1.00", ""]
    cfg.repeat = 1
    assert fio.repetitions_table(run).rows == []


def test_repetitions_table_gives_the_medians_interval_from_six_repetitions() -> None:
    keys = ("tapnbd-raw", "nbdkit-raw")
    cfg = fio.FioConfig(
        repeat=10,
        targets=[t for t in fio.TARGETS if t.key in keys],
        jobs=[j for j in fio.JOBS if j.key == "seqwrite"],
    )
    ratios = [0.7, 1.3, 0.9, 1.1, 0.95, 1.05, 0.8, 1.2, 1.0, 1.02]
    cells = [fio.FioCell("nbdkit-raw", "seqwrite", rep, value=100.0) for rep in range(10)]
    cells += [
        fio.FioCell("tapnbd-raw", "seqwrite", rep, value=100 * x) for rep, x in enumerate(ratios)
    ]
    (row,) = fio.repetitions_table(fio.FioRun(cfg, cells, {}, [])).rows
    # Ten values: the 2nd smallest and the 2nd largest (coverage 97.9 %; the 3rd
    # would cover 89 %).
    assert row[3:] == ["1.01", "0.80-1.20"]


@pytest.mark.parametrize(("n", "k"), [(5, 0), (6, 1), (8, 1), (9, 2), (10, 2), (20, 6), (52, 19)])
def test_median_interval_is_the_sign_tests(n: int, k: int) -> None:
    """k-th smallest to k-th largest, for the largest k covering at least 95 %, checked
    against the binomial sums written out."""
    xs = [float(i) for i in range(n)][::-1]  # given in any order
    got = report.median_interval(xs)
    if k == 0:
        assert got is None
        return
    assert got == (float(k - 1), float(n - k))

    def cover(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / (1 << n)

    assert cover(k) >= 0.95 > cover(k + 1)
