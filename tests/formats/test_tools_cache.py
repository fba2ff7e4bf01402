"""convert -t/-T, commit -t, bench -t and rebase -t/-T (qemu-img's cache modes for what
they write and read)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from formats.commit import commit_image
from formats.direct import DirectFile
from formats.qcow.convert import CopyTuning, convert_image
from tests.helpers import qemu_io, run, tapnbd_cmd


def direct_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths opened as DirectFiles (past the page cache) from now on, in order."""
    opened: list[str] = []
    real_init = DirectFile.__init__

    def init(self: DirectFile, path: str, **kw: object) -> None:
        opened.append(path)
        real_init(self, path, **kw)

    monkeypatch.setattr(DirectFile, "__init__", init)
    return opened


@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
async def test_none_reads_and_writes_past_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out_fmt: str
) -> None:
    seed = random.SystemRandom().randrange(1 << 30)
    print("seed", seed)
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(seed).randbytes(3 << 20) + bytes(1 << 20))
    reads: list[int] = []
    writes: list[int] = []
    real_read, real_write = DirectFile._read_blocks, DirectFile._write_blocks

    def read_blocks(self: DirectFile, view: memoryview, a: int) -> None:
        reads.append(a)
        real_read(self, view, a)

    def write_blocks(self: DirectFile, offset: int, data: memoryview, fua: bool) -> None:
        writes.append(offset)
        real_write(self, offset, data, fua)

    monkeypatch.setattr(DirectFile, "_read_blocks", read_blocks)
    monkeypatch.setattr(DirectFile, "_write_blocks", write_blocks)
    dst = tmp_path / f"dst.{out_fmt}"
    tuning = CopyTuning(cache="none", src_cache="none")
    await convert_image(str(src), str(dst), out_fmt, src_fmt="raw", tuning=tuning)
    assert reads and writes  # both ends went through DirectFile
    run(["qemu-img", "compare", "-f", "raw", "-F", out_fmt, str(src), str(dst)])


@pytest.mark.parametrize(("cache", "syncs"), [("unsafe", False), ("writeback", True)])
async def test_unsafe_never_syncs_the_files_metadata_flushes_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str, syncs: bool
) -> None:
    """qemu's cache=unsafe sets no-flush on every node: the qcow2 target's own flushes of
    its metadata do nothing either (they cost a convert of 1 GiB a whole second), and
    the image still reads back the same. writeback syncs at the end."""
    import os

    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(4).randbytes(4 << 20))
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    dst = tmp_path / "dst.qcow2"
    await convert_image(str(src), str(dst), "qcow2", src_fmt="raw", tuning=CopyTuning(cache=cache))
    assert bool(synced) == syncs, synced
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(dst)])


def test_the_cli_takes_t_and_T(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(1).randbytes(1 << 20))
    for t in ("writeback", "writethrough", "unsafe", "none", "directsync"):
        dst = tmp_path / f"{t}.qcow2"
        run(tapnbd_cmd("convert", "-q", "-f", "raw", "-O", "qcow2", "-t", t, "-T", t,
                       str(src), str(dst)))  # fmt: skip
        run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(dst)])
    out = run(tapnbd_cmd("convert", "-t", "bogus", str(src), str(tmp_path / "x")), check=False)
    assert out.returncode == 1 and "--cache 'bogus'" in out.stderr


def test_commit_t_none_writes_the_base_past_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    with base.open("wb") as f:
        f.truncate(4 << 20)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top)])
    qemu_io(top, "write -P 9 1000 70000", fmt="qcow2")
    opened = direct_opens(monkeypatch)
    asyncio.run(commit_image(str(top), fmt="qcow2", cache="none"))
    assert opened == [str(base)]
    qemu_io(base, "read -P 9 1000 70000", "read -P 0 0 1000")


@pytest.mark.parametrize("cache", ["none", "directsync"])
async def test_bench_t_runs_past_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str
) -> None:
    from formats import OpenRules
    from formats.iobench import BenchSpec, run_bench

    img = tmp_path / "a.raw"
    img.write_bytes(bytes(1 << 20))
    writes: list[int] = []
    real_write = DirectFile._write_blocks

    def write_blocks(self: DirectFile, offset: int, data: memoryview, fua: bool) -> None:
        writes.append(offset)
        real_write(self, offset, data, fua)

    monkeypatch.setattr(DirectFile, "_write_blocks", write_blocks)
    spec = BenchSpec(count=64, depth=4, size=4096, step=None, offset=0, write=True, pattern=7)
    await run_bench(str(img), spec, fmt="raw", rules=OpenRules(), cache=cache)
    assert len(writes) == 64
    assert img.read_bytes()[: 64 * 4096] == b"\7" * (64 * 4096)


def _rebase_chain(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """base.raw <- top.qcow2, a new.qcow2 that differs from base, and top's guest
    contents as a raw file read by qemu-img (what the rebased image must still read)."""
    rnd = random.Random(3)
    base, new, top = tmp_path / "base.raw", tmp_path / "new.qcow2", tmp_path / "top.qcow2"
    base.write_bytes(rnd.randbytes(3 << 20) + bytes(1 << 20))
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(new), "4M"])
    qemu_io(new, "write -P 5 512k 2M", fmt="qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(top)])
    qemu_io(top, "write -P 9 1000 70000", "write -P 0 3M 64k", fmt="qcow2")
    before = tmp_path / "before.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(top), str(before)])
    return base, new, top, before


@pytest.mark.parametrize(("cache", "src_cache"), [("none", "writeback"), ("writeback", "none")])
def test_rebase_t_opens_the_image_and_T_the_new_backing_past_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str, src_cache: str
) -> None:
    from formats.rebase import rebase_image

    base, new, top, before = _rebase_chain(tmp_path)
    opened = direct_opens(monkeypatch)
    asyncio.run(
        rebase_image(
            str(top), "new.qcow2", backing_format="qcow2", fmt="qcow2", cache=cache,
            src_cache=src_cache,
        )
    )  # fmt: skip
    # -t: the image, and its old backing file read through it (QEMU's inheritance);
    # -T: the new backing file alone.
    want = [str(top), str(base)] if cache == "none" else [str(new)]
    assert sorted(opened) == sorted(want)
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(before), str(top)])
    run(["qemu-img", "check", "-q", "-f", "qcow2", str(top)])


def test_rebase_cli_takes_t_and_T_and_keeps_what_the_image_reads(tmp_path: Path) -> None:
    for t in ("writeback", "writethrough", "unsafe", "none", "directsync"):
        d = tmp_path / t
        d.mkdir()
        _base, _new, top, before = _rebase_chain(d)
        run(tapnbd_cmd("rebase", "-f", "qcow2", "-t", t, "-T", t, "-b", "new.qcow2",
                       "-F", "qcow2", str(top)))  # fmt: skip
        run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(before), str(top)])
        run(["qemu-img", "check", "-q", "-f", "qcow2", str(top)])
    _base, _new, top, _before = _rebase_chain(tmp_path)
    for flag in ("-t", "-T"):
        out = run(tapnbd_cmd("rebase", flag, "bogus", "-b", "new.qcow2", str(top)), check=False)
        assert out.returncode == 1 and "--cache 'bogus'" in out.stderr
        info = run(["qemu-img", "info", "--output=json", "-f", "qcow2", str(top)]).stdout
        assert '"backing-filename": "base.raw"' in info  # refused before any change
