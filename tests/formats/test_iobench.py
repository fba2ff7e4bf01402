"""``tapnbd bench``: qemu-img bench's runs straight to a driver stack. qemu-img bench
is the referee: the same write run on copies of one image leaves the same guest bytes,
and both print the same first line. Where the offsets wrap, qemu-img 7.2 (here) wraps
modulo the whole image and can run past its end; tapnbd wraps as qemu does since 2025
(commit ff2ab634, modulo the image size less the request size), checked on a model.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from tests.formats.qcow_util import need, qemu_img
from tests.helpers import run, tapnbd_cmd

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("qemu-img")


@pytest.mark.parametrize(("fmt", "qemu_fmt"), [("raw", "raw"), ("qcow2", "qcow2"), ("vhd", "vpc")])
@pytest.mark.parametrize(
    "opts",
    [
        ("-c", "600", "-d", "8", "-s", "4k", "-S", "12k"),
        ("-c", "50", "-d", "1", "-s", "64k", "-o", "1M"),
    ],
)
def test_writes_leave_what_qemu_img_bench_leaves(
    tmp_path: Path, fmt: str, qemu_fmt: str, opts: tuple[str, ...]
) -> None:
    ours, ref = tmp_path / f"ours.{fmt}", tmp_path / f"ref.{fmt}"
    qemu_img("create", "-q", "-f", qemu_fmt, ours, str(8 * MiB))
    shutil.copy(ours, ref)
    mine = run(tapnbd_cmd("bench", "-w", "--pattern", "90", "-f", fmt, *opts, str(ours))).stdout
    theirs = qemu_img("bench", "-w", "--pattern=90", "-f", qemu_fmt, *opts, ref)
    assert mine.splitlines()[0] == theirs.splitlines()[0]
    assert mine.splitlines()[1].startswith("Run completed in ")
    qemu_img("compare", "-f", qemu_fmt, "-F", qemu_fmt, ours, ref)
    if fmt == "qcow2":
        qemu_img("check", "-f", "qcow2", ours)


def test_wrapped_writes_land_where_qemus_fixed_rule_puts_them(tmp_path: Path) -> None:
    img = tmp_path / "w.raw"
    img.write_bytes(bytes(MiB))
    size, step, count = 4096, 12288, 200  # 2.4 MiB of steps over a 1 MiB image
    run(
        tapnbd_cmd(
            "bench", "-w", "--pattern", "7", "-c", str(count), "-s", "4k", "-S", "12k", str(img)
        )
    )
    want, pos = bytearray(MiB), 0
    for _ in range(count):
        want[pos : pos + size] = b"\7" * size
        pos = (pos + step) % (MiB - size)
    assert img.read_bytes() == want


def test_a_read_run_changes_nothing_and_quiet_prints_the_time(tmp_path: Path) -> None:
    img = tmp_path / "r.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, str(4 * MiB))
    before = img.read_bytes()
    out = run(tapnbd_cmd("bench", "-q", "-c", "2000", "-d", "16", str(img))).stdout
    assert out.startswith("Run completed in ") and len(out.splitlines()) == 1, out
    assert img.read_bytes() == before


@pytest.mark.parametrize(
    ("opts", "says"),
    [
        (("-o", "4M"), "does not fit"),
        (("-s", "8M"), "does not fit"),
        (("-d", "0"), "the depth and size 1 or more"),
        (("-w", "--pattern", "256"), "pattern 0 to 255"),
    ],
)
def test_refused_by_name(tmp_path: Path, opts: tuple[str, ...], says: str) -> None:
    img = tmp_path / "x.raw"
    img.write_bytes(bytes(4 * MiB))
    r = run(tapnbd_cmd("bench", *opts, str(img)), check=False)
    assert r.returncode == 1 and says in r.stderr, r.stderr


def test_flush_interval_prints_and_writes_what_qemu_img_bench_does(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    for img in (ours, theirs):
        qemu_img("create", "-q", "-f", "raw", img, str(MiB))
    args = ["-w", "-c", "100", "-d", "4", "--pattern", "7", "--flush-interval=10"]
    mine = run(tapnbd_cmd("bench", "-f", "raw", *args, str(ours))).stdout.splitlines()
    qemu = run(["qemu-img", "bench", "-f", "raw", *args, str(theirs)]).stdout.splitlines()
    assert mine[:2] == qemu[:2] and mine[1] == "Sending flush every 10 requests"
    assert ours.read_bytes() == theirs.read_bytes()
    for bad, says in (
        (["-c", "10", "--flush-interval=5"], "for write runs"),
        (["-w", "-c", "10", "--no-drain"], "--no-drain is for"),
    ):
        out = run(tapnbd_cmd("bench", "-f", "raw", *bad, str(ours)), check=False)
        assert out.returncode != 0 and says in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("interval", "drain", "flushes"), [(0, True, 1), (10, True, 10), (30, True, 4), (10, False, 11)]
)
async def test_flush_interval_sends_its_flushes_drained(
    monkeypatch: pytest.MonkeyPatch, interval: int, drain: bool, flushes: int
) -> None:
    """The Backend's FLUSH calls counted, with the writes in flight at each: none when
    drained (qemu-img bench waits for them, unless --no-drain)."""
    from formats import OpenRules
    from formats.iobench import BenchSpec, run_bench
    from tapnbd.backend import Backend

    in_flight, seen = [0], []
    pwrite, flush = Backend.pwrite, Backend.flush

    async def counted_pwrite(self: Backend, *a: object, **k: object) -> None:
        in_flight[0] += 1
        try:
            await asyncio.sleep(0)  # a write that yields, as one to a disk does
            await pwrite(self, *a, **k)  # type: ignore[arg-type]
        finally:
            in_flight[0] -= 1

    async def counted_flush(self: Backend) -> None:
        seen.append(in_flight[0])
        await flush(self)

    monkeypatch.setattr(Backend, "pwrite", counted_pwrite)
    monkeypatch.setattr(Backend, "flush", counted_flush)
    spec = BenchSpec(count=100, depth=4, write=True, flush_interval=interval, drain=drain)
    await run_bench(f"ram:{MiB}", spec, fmt="auto", rules=OpenRules())
    assert len(seen) == flushes
    if drain:
        assert seen == [0] * flushes
    else:  # beside the writes: some were in flight when their FLUSH went out
        assert max(seen) > 0


def test_i_threads_runs_and_native_and_io_uring_are_refused(tmp_path: Path) -> None:
    """-i threads is the engine tapnbd has; -i native (-n) and io_uring are refused by
    name before a byte is written, not timed on threads under their name."""
    img = tmp_path / "a.raw"
    img.write_bytes(bytes(MiB))
    run(tapnbd_cmd("bench", "-q", "-w", "-c", "8", "--pattern", "3", "-i", "threads", str(img)))
    assert img.read_bytes()[: 8 * 4096] == b"\3" * (8 * 4096)
    for opts, says in (
        (("-i", "native"), "no native engine"),
        (("-n", "-t", "none"), "no native engine"),
        (("-i", "io_uring"), "no io_uring engine"),
        (("-i", "bogus"), "invalid aio mode"),
    ):
        r = run(tapnbd_cmd("bench", "-w", "--pattern", "4", *opts, str(img)), check=False)
        assert r.returncode == 1 and says in r.stderr and not r.stdout, (opts, r)
        assert b"\4" not in img.read_bytes()


async def test_run_bench_refuses_another_engine_before_it_opens(tmp_path: Path) -> None:
    from formats import OpenRules
    from formats.iobench import BenchSpec, run_bench
    from tapnbd.errors import ImageError

    spec = BenchSpec(count=1, write=True)
    with pytest.raises(ImageError, match="no io_uring engine"):
        await run_bench(
            str(tmp_path / "absent"), spec, fmt="raw", rules=OpenRules(), aio="io_uring"
        )
