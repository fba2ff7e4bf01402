"""qemu-img's -p and -r on the long copies: convert, commit, rebase and compare
(formats.pacing), and -U on the commands that only read.

The rate limit's arithmetic is checked on a clock of the test's own, so that no test
waits on the wall clock to see it; one run of the command each for convert and commit
checks the option reaches the copy, by the least time the limit allows.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from formats.commit import commit_image
from formats.pacing import Pace
from formats.qcow.convert import CHUNK as CONVERT_CHUNK
from formats.qcow.convert import convert_image
from formats.rebase import CHUNK as COMMIT_CHUNK
from formats.rebase import rebase_image
from tests.formats.qcow_util import need, qemu_img
from tests.helpers import run, start_server, tapnbd_cmd

MiB = 1 << 20


class FakeTime:
    """A clock that moves only when the code under test sleeps on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def paced(rate: int, t: FakeTime) -> tuple[Pace, list[int], list[int]]:
    """A Pace on ``t``, with the totals it began with and the advances it saw."""
    totals: list[int] = []
    seen: list[int] = []
    return Pace(rate, totals.append, seen.append, t.clock, t.sleep), totals, seen


def tapnbd(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(tapnbd_cmd(*map(str, args)), check=check)


# The arithmetic


async def test_each_request_waits_until_the_bytes_before_it_had_their_time() -> None:
    t = FakeTime()
    pace, _, _ = paced(1000, t)
    pace.begin(2000)
    for _ in range(4):
        await pace.admit(500)
    assert t.slept == [0.5, 0.5, 0.5]  # the first goes at once


async def test_requests_admitted_at_once_queue_one_behind_another() -> None:
    """convert's -m: several requests ask before any has slept."""
    import asyncio

    t = FakeTime()
    asked: list[float] = []

    async def record(seconds: float) -> None:
        asked.append(seconds)  # the clock does not move: all ask at the same moment

    pace = Pace(1000, clock=t.clock, sleep=record)
    pace.begin(0)
    await asyncio.gather(*(pace.admit(250) for _ in range(4)))
    assert asked == [0.25, 0.5, 0.75]


async def test_a_copy_slower_than_the_rate_never_waits() -> None:
    t = FakeTime()
    pace, _, _ = paced(1000, t)
    pace.begin(0)
    for _ in range(3):
        await pace.admit(500)
        t.now += 1.0  # the I/O took longer than the rate asks
    assert t.slept == []


async def test_no_rate_no_wait() -> None:
    t = FakeTime()
    pace, _, _ = paced(0, t)
    pace.begin(0)
    for _ in range(3):
        await pace.admit(1 << 30)
    assert t.slept == []


def test_a_negative_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        Pace(-1)


# Each copy, paced


def _overlay(tmp_path: Path) -> tuple[Path, Path]:
    """A raw base of 16 MiB and a qcow2 overlay holding 6 MiB of its own."""
    base = tmp_path / "base.raw"
    qemu_img("create", "-q", "-f", "raw", base, "16M")
    run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 16M", str(base)])
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 2M 6M", str(top)])
    return base, top


async def test_commit_is_paced_by_the_bytes_it_copies(tmp_path: Path) -> None:
    need("qemu-img", "qemu-io")
    base, top = _overlay(tmp_path)
    t = FakeTime()
    pace, totals, seen = paced(2 * MiB, t)
    copied = await commit_image(str(top), fmt="qcow2", pace=pace)
    assert copied == 6 * MiB and totals == [6 * MiB] and sum(seen) == 6 * MiB
    # Every chunk but the first waits for the one before it: 5 MiB at 2 MiB/s.
    assert sum(t.slept) == pytest.approx((6 * MiB - COMMIT_CHUNK) / (2 * MiB))
    run(["qemu-io", "-f", "raw", "-c", "read -P 1 0 2M", "-c", "read -P 7 2M 6M", str(base)])


async def test_convert_is_paced_by_the_data_it_reads_not_the_holes(tmp_path: Path) -> None:
    need("qemu-img", "qemu-io")
    src = tmp_path / "src.raw"
    with src.open("wb") as f:  # (qemu-img create would allocate the first 4 KiB)
        f.truncate(64 * MiB)
        f.seek(8 * MiB)
        f.write(b"\3" * (8 * MiB))
    t = FakeTime()
    pace, totals, seen = paced(4 * MiB, t)
    dst = tmp_path / "dst.qcow2"
    await convert_image(str(src), str(dst), "qcow2", src_fmt="raw", pace=pace)
    assert totals == [64 * MiB] and sum(seen) == 64 * MiB
    # 8 MiB of data in 2 MiB reads; the 56 MiB hole costs nothing.
    assert sum(t.slept) == pytest.approx((8 * MiB - CONVERT_CHUNK) / (4 * MiB))
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, dst)


async def test_rebase_reports_the_range_it_compares(tmp_path: Path) -> None:
    need("qemu-img", "qemu-io")
    _, top = _overlay(tmp_path)
    pace, totals, seen = paced(0, FakeTime())
    await rebase_image(str(top), "", fmt="qcow2", pace=pace)
    # What the overlay does not hold itself: 16 MiB less its 6.
    assert totals == [10 * MiB] and sum(seen) == 10 * MiB
    run(["qemu-io", "-f", "qcow2", "-c", "read -P 1 0 2M", "-c", "read -P 1 8M 8M", str(top)])


# The commands


def test_commit_r_takes_at_least_the_time_its_rate_allows(tmp_path: Path) -> None:
    need("qemu-img", "qemu-io")
    base, top = _overlay(tmp_path)
    t0 = time.monotonic()
    tapnbd("commit", "-q", "-f", "qcow2", "-r", "2M", top)
    # 6 MiB at 2 MiB/s, the first chunk free: 2.5 s at least (about 0.4 s without -r).
    assert time.monotonic() - t0 >= (6 * MiB - COMMIT_CHUNK) / (2 * MiB)
    run(["qemu-io", "-f", "raw", "-c", "read -P 7 2M 6M", str(base)])


def test_convert_r_takes_at_least_the_time_its_rate_allows(tmp_path: Path) -> None:
    need("qemu-img", "qemu-io")
    _, top = _overlay(tmp_path)
    dst = tmp_path / "flat.raw"
    t0 = time.monotonic()
    tapnbd("convert", "-q", "-f", "qcow2", "-O", "raw", "-r", "8M", top, dst)
    # 16 MiB of data at 8 MiB/s, the first 2 MiB read free: 1.75 s at least.
    assert time.monotonic() - t0 >= (16 * MiB - CONVERT_CHUNK) / (8 * MiB)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", top, dst)


def _bar(d: Path, cmd: tuple[str, ...], quiet: bool) -> str:
    """stderr of ``cmd`` on a new overlay in ``d`` ({top}, {base}), with -q or not."""
    d.mkdir()
    base, top = _overlay(d)
    args = [a.format(top=top, base=base) for a in cmd]
    return tapnbd(args[0], *(["-q"] if quiet else []), *args[1:]).stderr


@pytest.mark.parametrize(
    ("cmd", "full"),
    [
        (("commit", "-p", "-f", "qcow2", "{top}"), "6.0/6.0 MiB"),
        (("rebase", "-p", "-f", "qcow2", "-b", "", "{top}"), "10.0/10.0 MiB"),
        (("compare", "-p", "-f", "qcow2", "-F", "qcow2", "{top}", "{top}"), "16.0/16.0 MiB"),
    ],
    ids=["commit", "rebase", "compare"],
)
def test_p_draws_a_bar_that_ends_full_and_q_silences_it(
    tmp_path: Path, cmd: tuple[str, ...], full: str
) -> None:
    need("qemu-img", "qemu-io")
    shown = _bar(tmp_path / "shown", cmd, quiet=False)
    assert full in shown, shown
    assert "MiB" not in _bar(tmp_path / "quiet", cmd, quiet=True)


def test_the_reading_commands_take_qemu_imgs_U_on_an_image_in_use(tmp_path: Path) -> None:
    """A served image holds its lock; info, map, compare and check refuse it as
    qemu-img does, and read it with -U. check's repair writes, so it refuses -U."""
    need("qemu-img", "qemu-io")
    base, top = _overlay(tmp_path)
    server = start_server([str(top), "--format", "qcow2"], tmp_path / "serve.log")
    try:
        for cmd in (["info"], ["map"], ["check"], ["compare", "-F", "qcow2", top]):
            r = tapnbd(*cmd, "-f", "qcow2", top, check=False)
            assert r.returncode != 0 and 'shared "write" lock' in r.stderr, (cmd, r.stderr)
        extra = ["-U"]
        info = json.loads(tapnbd("info", *extra, "--output=json", "-f", "qcow2", top).stdout)
        assert info["virtual-size"] == 16 * MiB
        got = tapnbd("map", *extra, "--output=json", "-f", "qcow2", top).stdout
        assert json.loads(got)[0]["start"] == 0
        r = tapnbd("compare", *extra, "-f", "qcow2", "-F", "qcow2", top, top)
        assert r.stdout.strip() == "Images are identical."
        tapnbd("check", *extra, "-f", "qcow2", top)
        r = tapnbd("check", "-U", "-r", "all", top, check=False)
        assert r.returncode == 1 and "-U" in r.stderr, r.stderr
        # qemu-img, the referee, reads it the same way with -U.
        assert json.loads(qemu_img("info", "-U", "--output=json", top))["virtual-size"] == 16 * MiB
    finally:
        assert server.stop() == 0
    assert base.exists()
