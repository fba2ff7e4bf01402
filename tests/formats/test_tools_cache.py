"""convert -t/-T and commit -t (qemu-img's cache modes for what they write and read)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from formats.commit import commit_image
from formats.direct import DirectFile
from formats.qcow.convert import CopyTuning, convert_image
from tests.helpers import qemu_io, run, tapnbd_cmd


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
    opened: list[str] = []
    real_init = DirectFile.__init__

    def init(self: DirectFile, path: str, **kw: object) -> None:
        opened.append(path)
        real_init(self, path, **kw)

    monkeypatch.setattr(DirectFile, "__init__", init)
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
