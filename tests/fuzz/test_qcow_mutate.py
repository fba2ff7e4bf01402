"""Mutated qcow images (qemu-img and tapnbd made): refused clearly, or read safely, and
`tapnbd check` reports the damage. `make fuzz` runs many more (QCOW_FUZZ_RUNS)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuzz import qcow_mutate as qm
from tests.fuzz.regressions.qcow import CASES
from tests.helpers import need, run, tapnbd_cmd

#: Mutations in the short budget, spread over the three bases.
BUDGET = 600


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, qm.Base], Path]]:
    need("qemu-img", "qemu-io")
    wd = tmp_path_factory.mktemp("qcow-fuzz")
    yield qm.make_bases(wd), wd


def test_bases_hold_what_was_written(bases: tuple[dict[str, qm.Base], Path]) -> None:
    """The oracle's ground truth: every base reads back its tags and checks clean."""
    found, wd = bases
    assert sorted(found) == ["qemu", "tapnbd-normal", "tapnbd-optimised"]
    stats = qm.Stats()
    for name, base in found.items():
        qm.run_case(qm.Case(name, []), found, wd, stats)
        assert len(base.content) >= 12 and len(base.l2_tables) == 2
    # The regression cases patch fixed offsets of these layouts.
    assert (found["qemu"].l1_offset, found["qemu"].l2_tables) == (48, [0x1000, 0x9000])
    assert found["tapnbd-optimised"].l1_offset == found["tapnbd-normal"].l1_offset == 0x1000
    assert (stats.opened, stats.damaged, stats.changed, stats.check_flagged) == (3, 0, 0, 0)


def test_short_mutation_campaign(bases: tuple[dict[str, qm.Base], Path]) -> None:
    found, wd = bases
    stats = qm.campaign(BUDGET, seed=7, workdir=wd, bases=found)
    assert stats.mutations == BUDGET
    # Both outcomes must occur, or the campaign tests less than it claims.
    assert stats.refused > BUDGET // 10 and stats.opened > BUDGET // 10, stats.summary()
    assert stats.damaged > 0 and stats.eio_reads > 0, stats.summary()


@pytest.mark.parametrize("case", [c for _, c in CASES.values()], ids=list(CASES))
def test_regression_cases(bases: tuple[dict[str, qm.Base], Path], case: qm.Case) -> None:
    found, wd = bases
    qm.run_case(case, found, wd, qm.Stats())


def test_tapnbd_check_command_reports_the_damage(bases: tuple[dict[str, qm.Base], Path]) -> None:
    found, wd = bases
    clean = run(tapnbd_cmd("check", "--json", str(found["qemu"].path)))
    assert json.loads(clean.stdout)["exit-code"] == 0
    for name in ("compressed_bit_on_a_normal_entry", "backing_name_of_nul_bytes"):
        case = CASES[name][1]
        path = wd / f"{name}.qcow"
        qm.apply(found[case.base], case, path)
        proc = run(tapnbd_cmd("check", "--json", str(path)), check=False)
        report = json.loads(proc.stdout)
        assert proc.returncode == report["exit-code"] != 0, report
        assert report["messages"], report
