"""``tapnbd convert``'s qemu-img tuning options: -S (how big a block of zeros must be to
become a hole; 0 for a fully allocated image), --target-is-zero (with -n: the target's
zero runs are not written) and -m (requests in flight). qemu-img map and compare are the
referees; the depth is watched inside the copy, where it can be seen."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from formats.qcow.convert import _copy
from formats.ram import RamDriver
from tapnbd.backend import Backend
from tests.formats.qcow_util import need, qemu_img
from tests.formats.qcow_util import tapnbd_out as tapnbd

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("qemu-img", "qemu-io")


def source(tmp_path: Path) -> Path:
    """8 MiB raw: 4 KiB of data at 1 MiB, then 60 KiB of zeros written out (not a
    hole), and holes elsewhere."""
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"\x5a" * 4096 + bytes(60 << 10))
    return src


def data_bytes(img: Path, fmt: str) -> int:
    """Bytes qemu-img map calls data (a raw file's holes are found with SEEK_DATA)."""
    extents = json.loads(qemu_img("map", "--output=json", "-f", fmt, img))
    return sum(e["length"] for e in extents if e["data"])


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_sparse_size_zero_allocates_every_byte(tmp_path: Path, fmt: str) -> None:
    src = source(tmp_path)
    dst = tmp_path / f"out.{fmt}"
    tapnbd("convert", "-q", "-O", fmt, "-S", "0", src, dst)
    assert data_bytes(dst, fmt) == 8 * MiB
    qemu_img("compare", "-f", "raw", "-F", fmt, src, dst)
    tapnbd("convert", "-q", "-O", fmt, src, dst)  # the default leaves the holes
    assert data_bytes(dst, fmt) < MiB


def test_sparse_size_sets_the_zero_granularity(tmp_path: Path) -> None:
    src = source(tmp_path)
    dst = tmp_path / "out.raw"
    tapnbd("convert", "-q", "-O", "raw", "-S", "4k", src, dst)
    assert data_bytes(dst, "raw") == 4096  # the written-out zeros became a hole
    qemu_img("compare", "-f", "raw", "-F", "raw", src, dst)
    tapnbd("convert", "-q", "-O", "raw", src, dst)  # 64 KiB blocks: written as data
    assert data_bytes(dst, "raw") == 64 << 10


def test_target_is_zero_writes_no_zeros(tmp_path: Path) -> None:
    src = source(tmp_path)
    dst = tmp_path / "dst.raw"
    dst.write_bytes(b"\xee" * (8 * MiB))
    # The admin's promise is trusted, as qemu-img trusts it: the old bytes show where
    # the source has zeros, which is what proves nothing zeroed them.
    tapnbd("convert", "-q", "-n", "--target-is-zero", "-O", "raw", src, dst)
    got = dst.read_bytes()
    assert got[MiB : MiB + 4096] == b"\x5a" * 4096 and got[:4096] == b"\xee" * 4096
    tapnbd("convert", "-q", "-n", "-O", "raw", src, dst)  # without it, zeros are written
    qemu_img("compare", "-f", "raw", "-F", "raw", src, dst)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["-S", "1000"], "multiple of 512"),
        (["-S", "32M"], "multiple of 512"),
        (["-m", "0"], "1 to 16"),
        (["-m", "17"], "1 to 16"),
        (["--target-is-zero"], "is for -n"),
    ],
)
def test_bad_values_are_refused(tmp_path: Path, args: list[str], says: str) -> None:
    src = source(tmp_path)
    out = tapnbd("convert", "-q", "-O", "raw", *args, src, tmp_path / "o.raw", check=False)
    assert says in out and not (tmp_path / "o.raw").exists(), out


class _Watched(RamDriver):
    """A RAM disk that counts the reads in flight at once."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.now = self.most = 0

    async def pread(self, offset: int, length: int) -> bytes | bytearray:
        self.now += 1
        self.most = max(self.most, self.now)
        await asyncio.sleep(0)  # a read that yields, as a file read off the loop does
        try:
            return await super().pread(offset, length)
        finally:
            self.now -= 1


@pytest.mark.parametrize("depth", [1, 3, 16])
async def test_depth_is_the_number_of_requests_in_flight(depth: int) -> None:
    src = _Watched(64 * MiB)
    await src.pwrite(0, b"\x01" * (64 * MiB))
    dst = Backend(RamDriver(64 * MiB))
    stats = await _copy(Backend(src, read_only=True), dst, 64 * MiB, None, depth=depth)
    assert stats.written == 64 * MiB and src.most == depth
    assert bytes(await dst.pread(0, 64 * MiB)) == b"\x01" * (64 * MiB)
