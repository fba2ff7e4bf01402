"""Simulated power loss under the qcow driver (powerloss.py): a kill -9 leaves the page
cache behind, so only this sees flush ordering. Each layout records two seeded
workloads (4 KiB and 1 KiB clusters) and checks 150 crash states of each; ``make
crash`` checks thousands."""

from __future__ import annotations

from pathlib import Path

import pytest

from formats.filters.powerloss import SECTOR, CrashState, PowerLossRecorder
from formats.ram import RamDriver
from tapnbd.driver import Driver
from tests.helpers import need
from tests.reliability import powerloss
from tests.reliability.powerloss import LAYOUTS, check_states, record

STATES = 150


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
async def test_power_loss_keeps_what_was_flushed(tmp_path: Path, layout: str, seed: int) -> None:
    need("qemu-img")
    for s in (seed, seed + 1):
        work = tmp_path / str(s)
        work.mkdir()
        rec = await record(work / "image.qcow", layout, s)
        v = await check_states(rec, work, STATES, qemu_every=10, seed=s)
        assert not v.failures, f"seed {s}:\n" + "\n".join(v.failures[:10])
        # It really checked something: promises to keep, and qemu as a second reader.
        assert v.states == STATES and v.promised > 0 and v.qemu_checked > 0
        assert any(e.kind == "flush" for e in rec.recorder.events)


async def test_a_disk_that_ignores_flush_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The harness can fail: with flushes lost, promised writes are missing."""
    made: list[PowerLossRecorder] = []

    class Lying(PowerLossRecorder):
        def __init__(self, child: Driver, base: bytes) -> None:
            super().__init__(child, base)
            made.append(self)

        async def flush(self) -> None:
            await self.child.flush()  # the file syncs, but no barrier is recorded

    monkeypatch.setattr(powerloss, "PowerLossRecorder", Lying)
    rec = await record(tmp_path / "image.qcow", "normal", 7, count=60)
    assert made and not any(e.kind == "flush" for e in rec.recorder.events)
    v = await check_states(rec, tmp_path, 30, seed=7)
    assert any("bad sectors" in f for f in v.failures), v.failures


async def test_recorder_states() -> None:
    """Durable writes are always there, FUA ones from completion; a torn write keeps
    only its chosen sectors; growth counts as a write."""
    rec = PowerLossRecorder(RamDriver(1 << 20), bytes(2 * SECTOR))
    await rec.pwrite(0, b"a" * SECTOR)
    await rec.flush()
    after_flush = len(rec.events)
    await rec.pwrite(0, b"b" * SECTOR)  # in doubt
    await rec.pwrite(SECTOR, b"c" * SECTOR, fua=True)  # durable once done
    await rec.pwrite(2 * SECTOR - 100, b"d" * 200)  # two sectors of the file: tearable
    durable, doubt = rec.durable(len(rec.events))
    assert durable == {0, 2} and doubt == [1, 3]

    img = rec.materialise(CrashState(len(rec.events), frozenset()))
    assert img == b"a" * SECTOR + b"c" * SECTOR
    img = rec.materialise(CrashState(len(rec.events), frozenset({1, 3}), {3: frozenset({1})}))
    assert img == b"b" * SECTOR + b"c" * SECTOR + b"d" * 100  # the second piece only
    # Before the flush completed, "a" was in doubt too.
    assert rec.materialise(CrashState(after_flush - 1, frozenset())) == bytes(2 * SECTOR)
