"""The raw driver's slow-write back-off: how long writes leave the loop after a stall.

A buffered write that stalls (dirty throttling, writeback, a journal commit) sends the
next writes to the thread pool. The pool hop costs ten times the CPU of a 4 KiB write,
so one stall in a writeback pass must not cost a second of it; a disk whose every write
stalls must still end up in the pool. A fake clock makes a write as slow as the test
says, so nothing here depends on the machine's disk.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from formats import raw
from formats.raw import FIRST_BACKOFF, SLOW_WRITE, WRITE_BACKOFF, RawDriver

BLOCK = 4096


class FakeClock:
    """time.monotonic for the driver; each pwritev takes ``write_takes`` seconds of it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.write_takes = 0.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[RawDriver, FakeClock]:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * BLOCK))
    clock = FakeClock()
    real_pwritev = os.pwritev

    def timed_pwritev(fd: int, bufs: object, offset: int, flags: int = 0) -> int:
        clock.now += clock.write_takes
        return real_pwritev(fd, bufs, offset, flags)  # type: ignore[arg-type]

    monkeypatch.setattr(raw, "time", clock)
    monkeypatch.setattr(os, "pwritev", timed_pwritev)
    drv = RawDriver(str(path))
    # As on ext4, which refuses RWF_NOWAIT on buffered writes: the timed inline path.
    drv._nowait_write = False
    return drv, clock


def _write(drv: RawDriver, block: int, vectored: bool) -> bool:
    data = bytes([block % 251 + 1]) * BLOCK
    if vectored:
        return drv.pwritev_nowait(block * BLOCK, BLOCK, [memoryview(data)])
    return drv.pwrite_nowait(block * BLOCK, data)


@pytest.mark.parametrize("vectored", [False, True], ids=["pwrite", "pwritev"])
def test_one_stall_costs_a_short_backoff(
    driver: tuple[RawDriver, FakeClock], vectored: bool
) -> None:
    drv, clock = driver
    assert _write(drv, 0, vectored)  # fast: inline, and no back-off
    assert _write(drv, 1, vectored)
    clock.write_takes = 2 * SLOW_WRITE
    assert _write(drv, 2, vectored)  # done inline, but slow
    clock.write_takes = 0.0
    clock.now += FIRST_BACKOFF / 2
    assert not _write(drv, 3, vectored)  # the pool's turn
    clock.now += FIRST_BACKOFF
    assert _write(drv, 4, vectored)  # inline again after FIRST_BACKOFF, not a second
    with open(drv.path, "rb") as f:
        got = f.read(5 * BLOCK)
    want = b"".join(bytes([b + 1]) * BLOCK for b in (0, 1, 2)) + bytes(BLOCK)
    assert got[: 4 * BLOCK] == want  # block 3 was refused, so left to the caller
    assert got[4 * BLOCK :] == bytes([5]) * BLOCK


def _backoff_after_slow_write(drv: RawDriver, clock: FakeClock) -> float:
    """Make one slow inline write; how long the driver then refuses inline writes."""
    clock.write_takes = 2 * SLOW_WRITE
    assert _write(drv, 0, False)
    clock.write_takes = 0.0
    start = clock.now
    step = FIRST_BACKOFF / 4
    while not drv.pwrite_nowait(BLOCK, b"p" * BLOCK):  # probes are fast writes
        clock.now += step
        assert clock.now - start <= 2 * WRITE_BACKOFF, "never inline again"
    return clock.now - start


def test_stalls_in_a_row_double_the_backoff_up_to_the_cap(
    driver: tuple[RawDriver, FakeClock],
) -> None:
    drv, clock = driver
    got = []
    for _ in range(10):
        got.append(_backoff_after_slow_write(drv, clock))
        # The next slow write comes at once, within a back-off of the last one ending.
    want = [min(FIRST_BACKOFF * 2**i, WRITE_BACKOFF) for i in range(10)]
    assert got == pytest.approx(want, abs=FIRST_BACKOFF / 4 + 1e-9)
    assert got[-1] == pytest.approx(WRITE_BACKOFF, abs=FIRST_BACKOFF / 4 + 1e-9)


def test_a_quiet_spell_resets_the_backoff(driver: tuple[RawDriver, FakeClock]) -> None:
    drv, clock = driver
    for _ in range(5):
        _backoff_after_slow_write(drv, clock)
    clock.now += 10 * WRITE_BACKOFF  # fast writes only, for a long while
    assert drv.pwrite_nowait(0, b"q" * BLOCK)
    assert _backoff_after_slow_write(drv, clock) == pytest.approx(
        FIRST_BACKOFF, abs=FIRST_BACKOFF / 4 + 1e-9
    )


def test_async_pwrite_goes_through_the_pool_while_backing_off(
    driver: tuple[RawDriver, FakeClock],
) -> None:
    """During a back-off the async path still writes (in the pool), and the data lands."""
    drv, clock = driver
    clock.write_takes = 2 * SLOW_WRITE
    assert _write(drv, 0, False)
    clock.write_takes = 0.0

    async def main() -> None:
        assert not drv.pwrite_nowait(BLOCK, b"x" * BLOCK)
        await drv.pwrite(BLOCK, b"y" * BLOCK)
        await drv.close()

    asyncio.run(main())
    with open(drv.path, "rb") as f:
        assert f.read(2 * BLOCK)[BLOCK:] == b"y" * BLOCK
