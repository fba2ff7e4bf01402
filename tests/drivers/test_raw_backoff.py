"""The raw driver's slow-write back-off: when and for how long writes leave the loop.

A buffered write that sleeps in the kernel (dirty throttling, writeback, a journal
commit) sends the next writes to the thread pool. A write that was merely preempted
(another process had the CPU) must not: the pool hop costs ten times the CPU of a 4 KiB
write, and a busy machine preempts a write every few tens of milliseconds. The pool
time must stay short for a one-off sleep and grow for a disk whose writes keep
sleeping. A fake clock and a fake voluntary-switch counter make a write as slow, and as
asleep, as the test says, so nothing here depends on the machine's disk or load.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from formats import raw
from formats.raw import FIRST_BACKOFF, PROBE_TIME, SLOW_WRITE, WRITE_BACKOFF, RawDriver

BLOCK = 4096


class FakeThread:
    """time.monotonic and ru_nvcsw for the driver; pwritev takes ``write_takes`` seconds
    of the clock, and sleeps in the kernel (a voluntary switch) when ``sleeps``."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.write_takes = 0.0
        self.sleeps = False
        self.nvcsw = 0
        self.probes = 0  # voluntary_switches calls

    def monotonic(self) -> float:
        return self.now

    def voluntary_switches(self) -> int:
        self.probes += 1
        return self.nvcsw

    def slow(self, *, sleeps: bool) -> None:
        self.write_takes, self.sleeps = 2 * SLOW_WRITE, sleeps

    def fast(self) -> None:
        self.write_takes, self.sleeps = 0.0, False


@pytest.fixture
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[RawDriver, FakeThread]:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * BLOCK))
    thread = FakeThread()
    real_pwritev = os.pwritev

    real_splice = os.splice

    def timed_pwritev(fd: int, bufs: object, offset: int, flags: int = 0) -> int:
        thread.now += thread.write_takes
        thread.nvcsw += thread.sleeps
        return real_pwritev(fd, bufs, offset, flags)  # type: ignore[arg-type]

    def timed_splice(src: int, dst: int, count: int, **kw: int) -> int:
        thread.now += thread.write_takes
        thread.nvcsw += thread.sleeps
        return real_splice(src, dst, count, **kw)

    monkeypatch.setattr(raw, "time", thread)
    monkeypatch.setattr(raw, "voluntary_switches", thread.voluntary_switches)
    monkeypatch.setattr(os, "pwritev", timed_pwritev)
    monkeypatch.setattr(os, "splice", timed_splice)
    drv = RawDriver(str(path))
    # As on ext4, which refuses RWF_NOWAIT on buffered writes: the timed inline path.
    drv._nowait_write = False
    return drv, thread


def _write(drv: RawDriver, block: int, how: str = "pwrite") -> bool:
    data = bytes([block % 251 + 1]) * BLOCK
    if how == "pwritev":
        return drv.pwritev_nowait(block * BLOCK, BLOCK, [memoryview(data)])
    if how == "splice":  # the NBD server's path for big WRITEs (tapnbd.server.splice)
        rd, wr = os.pipe()
        try:
            os.write(wr, data)
            done = drv.pwrite_from_pipe(rd, block * BLOCK, BLOCK)
            left = os.read(rd, BLOCK) if not done else b""
            assert left == (b"" if done else data)  # refused: nothing read from the pipe
            return done
        finally:
            os.close(rd)
            os.close(wr)
    return drv.pwrite_nowait(block * BLOCK, data)


WRITES = ["pwrite", "pwritev", "splice"]


@pytest.mark.parametrize("how", WRITES)
def test_a_write_that_slept_costs_a_short_backoff(
    driver: tuple[RawDriver, FakeThread], how: str
) -> None:
    drv, th = driver
    assert _write(drv, 0, how)  # fast: inline, not even probed
    assert th.probes == 0
    th.slow(sleeps=True)
    assert _write(drv, 1, how)  # slow, unprobed: look closer from now on
    assert _write(drv, 2, how)  # slow, probed, slept: done, then back off
    th.fast()
    th.now += FIRST_BACKOFF / 2
    assert not _write(drv, 3, how)  # the pool's turn
    th.now += FIRST_BACKOFF
    assert _write(drv, 4, how)  # inline again after FIRST_BACKOFF, not a second
    with open(drv.path, "rb") as f:
        got = f.read(5 * BLOCK)
    want = b"".join(bytes([b + 1]) * BLOCK for b in (0, 1, 2)) + bytes(BLOCK)
    assert got[: 4 * BLOCK] == want  # block 3 was refused, so left to the caller
    assert got[4 * BLOCK :] == bytes([5]) * BLOCK


@pytest.mark.parametrize("how", WRITES)
def test_preempted_writes_stay_inline(driver: tuple[RawDriver, FakeThread], how: str) -> None:
    """Slow without sleeping is another process on the CPU: the pool would not help."""
    drv, th = driver
    for block in range(50):
        if block % 5 == 0:
            th.slow(sleeps=False)
        else:
            th.fast()
        assert _write(drv, block, how)
        th.now += 0.001
    assert th.probes > 0  # it looked


def test_probing_stops_after_a_quiet_spell(driver: tuple[RawDriver, FakeThread]) -> None:
    drv, th = driver
    th.slow(sleeps=False)
    assert _write(drv, 0)
    th.fast()
    assert _write(drv, 1)
    probes = th.probes
    assert probes == 1  # the count before the write (after it only if slow)
    th.now += PROBE_TIME
    assert _write(drv, 2)
    assert th.probes == probes  # no getrusage on a quiet machine


def _backoff_after_sleep(drv: RawDriver, th: FakeThread) -> float:
    """Make one write that sleeps; how long the driver then refuses inline writes."""
    th.slow(sleeps=True)
    assert _write(drv, 0)
    th.fast()
    start = th.now
    step = FIRST_BACKOFF / 4
    while not drv.pwrite_nowait(BLOCK, b"p" * BLOCK):  # probes are fast writes
        th.now += step
        assert th.now - start <= 2 * WRITE_BACKOFF, "never inline again"
    return th.now - start


def test_sleeps_in_a_row_double_the_backoff_up_to_the_cap(
    driver: tuple[RawDriver, FakeThread],
) -> None:
    drv, th = driver
    th.slow(sleeps=False)
    assert _write(drv, 0)  # opens the probe window
    got = []
    for _ in range(10):
        # Each sleep comes as the last back-off ends: within a back-off of it.
        got.append(_backoff_after_sleep(drv, th))
    want = [min(FIRST_BACKOFF * 2**i, WRITE_BACKOFF) for i in range(10)]
    assert got == pytest.approx(want, abs=FIRST_BACKOFF / 4 + 1e-9)
    assert got[-1] == pytest.approx(WRITE_BACKOFF, abs=FIRST_BACKOFF / 4 + 1e-9)


def test_a_quiet_spell_resets_the_backoff(driver: tuple[RawDriver, FakeThread]) -> None:
    drv, th = driver
    th.slow(sleeps=False)
    assert _write(drv, 0)
    for _ in range(5):
        _backoff_after_sleep(drv, th)
    th.now += 0.5 * PROBE_TIME  # fast writes only, for a while (still probing)
    assert drv.pwrite_nowait(0, b"q" * BLOCK)
    assert _backoff_after_sleep(drv, th) == pytest.approx(
        FIRST_BACKOFF, abs=FIRST_BACKOFF / 4 + 1e-9
    )


def test_async_pwrite_goes_through_the_pool_while_backing_off(
    driver: tuple[RawDriver, FakeThread],
) -> None:
    """During a back-off the async path still writes (in the pool), and the data lands."""
    drv, th = driver
    th.slow(sleeps=True)
    assert _write(drv, 0)
    assert _write(drv, 0)
    th.fast()

    async def main() -> None:
        assert not drv.pwrite_nowait(BLOCK, b"x" * BLOCK)
        await drv.pwrite(BLOCK, b"y" * BLOCK)
        await drv.close()

    asyncio.run(main())
    with open(drv.path, "rb") as f:
        assert f.read(2 * BLOCK)[BLOCK:] == b"y" * BLOCK


def test_voluntary_switches_counts_this_threads_sleeps() -> None:
    """The real counter: a sleep in the kernel is a voluntary switch of the caller."""
    before = raw.voluntary_switches()
    time.sleep(0.001)
    assert raw.voluntary_switches() > before
