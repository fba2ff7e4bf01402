"""``tapnbd convert``'s qemu-img tuning options: -S (how big a block of zeros must be to
become a hole; 0 for a fully allocated image), --target-is-zero (with -n: the target's
zero runs are not written), -m (requests in flight), --salvage (past read errors,
what cannot be read written as zeros) and -C (the kernel copies the data runs between
two raw files). qemu-img map and compare are the referees; the depth and what was
offloaded are watched inside the copy, where they can be seen."""

from __future__ import annotations

import asyncio
import errno
import json
import random
import shutil
import tempfile
from pathlib import Path

import pytest

from formats.pacing import Pace
from formats.qcow.convert import CopyTuning, _copy
from formats.ram import RamDriver
from tapnbd.backend import Backend
from tests.formats.qcow_util import data_bytes, need, qemu_img, qemu_io
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
    tuning = CopyTuning(depth=depth)
    stats = await _copy(Backend(src, read_only=True), dst, 64 * MiB, Pace(), tuning=tuning)
    assert stats.written == 64 * MiB and src.most == depth
    assert bytes(await dst.pread(0, 64 * MiB)) == b"\x01" * (64 * MiB)


async def test_read_buffers_are_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each chunk's read buffer goes back to the pool once written: a copy allocates
    about as many as it has chunks in flight, not one per chunk (each a memset and page
    faults)."""
    from formats.raw import RawDriver
    from tapnbd import buffers

    path = tmp_path / "src.raw"
    path.write_bytes(random.Random(5).randbytes(32 * MiB))
    made: list[int] = []
    real = buffers._aligned

    def counted(length: int) -> buffers.PooledBuffer:
        made.append(length)
        return real(length)

    monkeypatch.setattr(buffers, "_free", {})
    monkeypatch.setattr(buffers, "_held", 0)  # (its count of the bytes in _free)
    monkeypatch.setattr(buffers, "_aligned", counted)
    src = RawDriver(str(path), read_only=True)
    dst = Backend(RamDriver(32 * MiB))
    try:
        await _copy(Backend(src, read_only=True), dst, 32 * MiB, Pace(), tuning=CopyTuning())
    finally:
        await src.close()
    assert bytes(await dst.pread(0, 32 * MiB)) == path.read_bytes()
    assert 1 <= len(made) <= CopyTuning().depth + 1, made


def damaged_qcow2(tmp_path: Path) -> tuple[Path, Path]:
    """A qcow2 image with data at 0 and at 1 MiB, whose second L2 entry is made to point
    past the end of the file: reading its cluster fails (EIO), the rest reads. And the
    raw image of what salvage must give: that cluster as zeros."""
    img = tmp_path / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 0x11 0 64k", "write -P 0x22 1M 64k", fmt="qcow2")
    want = tmp_path / "want.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", img, want)
    data = bytearray(img.read_bytes())
    l1_off = int.from_bytes(data[40:48], "big")
    l2_off = int.from_bytes(data[l1_off : l1_off + 8], "big") & ((1 << 56) - 512)
    entry = l2_off + 8 * 16  # guest cluster 16: 1 MiB
    data[entry : entry + 8] = ((1 << 63) | (len(data) + (64 << 20))).to_bytes(8, "big")
    img.write_bytes(data)
    with open(want, "r+b") as f:
        f.seek(MiB)
        f.write(bytes(64 << 10))
    return img, want


def test_salvage_writes_what_cannot_be_read_as_zeros(tmp_path: Path) -> None:
    img, want = damaged_qcow2(tmp_path)
    out = tmp_path / "out.raw"
    failed = tapnbd("convert", "-q", "-f", "qcow2", "-O", "raw", img, out, check=False)
    assert "entry 16 points outside the image file" in failed, failed
    said = tapnbd("convert", "-f", "qcow2", "-O", "raw", "--salvage", img, out)
    assert f"error reading {MiB}..{MiB + (64 << 10)}" in said, said
    assert "65536 bytes of it written as zeros" in said, said
    qemu_img("compare", "-f", "raw", "-F", "raw", want, out)
    quiet = tapnbd("convert", "-q", "-f", "qcow2", "-O", "raw", "--salvage", img, out)
    assert "error reading" not in quiet


class _BadSectors(RamDriver):
    """A RAM disk whose sectors in ``bad`` fail to read."""

    def __init__(self, size: int, bad: set[int]) -> None:
        super().__init__(size)
        self.bad = bad

    async def pread(self, offset: int, length: int) -> bytes | bytearray:
        if any(s in self.bad for s in range(offset // 512, (offset + length + 511) // 512)):
            raise OSError(errno.EIO, "bad sector")
        return await super().pread(offset, length)


async def test_salvage_loses_only_the_unreadable_sectors(seed: int) -> None:
    rng = random.Random(seed)
    size = 8 * MiB
    src = _BadSectors(size, set(rng.sample(range(size // 512), 20)))
    await src.pwrite(0, rng.randbytes(size))
    expect = bytearray(await RamDriver.pread(src, 0, size))
    for s in src.bad:
        expect[s * 512 : (s + 1) * 512] = bytes(512)
    said: list[str] = []
    dst = Backend(RamDriver(size))
    tuning = CopyTuning(salvage=said.append)
    await _copy(Backend(src, read_only=True), dst, size, Pace(), tuning=tuning)
    assert bytes(await dst.pread(0, size)) == bytes(expect)
    assert sum(int(m.split("; ")[1].split()[0]) for m in said) == 512 * len(src.bad)


def test_several_sources_are_copied_back_to_back_as_qemu_img_does(tmp_path: Path) -> None:
    a, b = tmp_path / "a.raw", tmp_path / "b.qcow2"
    with open(a, "wb") as f:  # 1 MiB: 64 KiB of data at 256 KiB
        f.truncate(MiB)
        f.seek(256 << 10)
        f.write(b"\xaa" * (64 << 10))
    qemu_img("create", "-q", "-f", "qcow2", b, "2M")  # 2 MiB: 128 KiB of data at 1 MiB
    qemu_io(b, "write -P 0xbb 1M 128k", fmt="qcow2")
    for fmt in ("raw", "qcow2"):
        ours, theirs = tmp_path / f"ours.{fmt}", tmp_path / f"theirs.{fmt}"
        tapnbd("convert", "-q", "-O", fmt, a, b, ours)
        qemu_img("convert", "-O", fmt, a, b, theirs)
        qemu_img("compare", "-f", fmt, "-F", fmt, ours, theirs)
        assert json.loads(qemu_img("info", "--output=json", ours))["virtual-size"] == 3 * MiB
        # Each part's holes stay holes, shifted to where the part starts (qemu's raw
        # output also allocates its first 4 KiB, for alignment probing: not compared).
        assert data_bytes(ours, fmt) == (64 << 10) + (128 << 10)


def test_several_sources_refusals(tmp_path: Path) -> None:
    a = source(tmp_path)
    out = tapnbd("convert", "-q", "-O", "raw", "-l", "s1", a, a, tmp_path / "o.raw", check=False)
    assert "several sources" in out, out
    other = tmp_path / "other.raw"
    other.write_bytes(bytes(4096))
    onto = tapnbd("convert", "-q", "-O", "raw", other, a, a, check=False)
    assert "is the source image" in onto, onto
    alone = tapnbd("convert", "-q", "-O", "raw", a, check=False)
    assert "then the destination" in alone, alone


async def test_a_read_across_the_parts_is_each_parts_bytes(seed: int) -> None:
    """ConcatDriver alone: reads anywhere, across one or several parts, against the
    parts' bytes laid end to end."""
    from formats.filters.concat import ConcatDriver

    rng = random.Random(seed)
    parts, whole = [], b""
    for size in (4096, 512, 3 * 4096, 1024):
        part = RamDriver(size)
        data = rng.randbytes(size)
        await part.pwrite(0, data)
        parts.append(part)
        whole += data
    view = ConcatDriver(parts)
    assert view.size() == len(whole)
    for _ in range(200):
        off = rng.randrange(len(whole))
        n = rng.randrange(1, len(whole) - off + 1)
        assert bytes(await view.pread(off, n)) == whole[off : off + n], (off, n)
    await view.close()


# -C: copy offloading


@pytest.mark.parametrize(("fmt", "offloaded"), [("raw", True), ("qcow2", False)])
async def test_copy_offloading_copies_the_data_runs_in_the_kernel(
    tmp_path: Path, fmt: str, offloaded: bool
) -> None:
    """raw to raw: every data run by copy_file_range, holes left; to qcow2 the usual
    copy (qemu-img falls back too). Either way the same disk, by qemu-img compare."""
    from formats.qcow.convert import convert_image

    src = source(tmp_path)
    dst = tmp_path / f"out.{fmt}"
    stats = await convert_image(
        str(src), str(dst), fmt, src_fmt="raw", tuning=CopyTuning(offload=True)
    )
    data = data_bytes(src, "raw")  # the 64 KiB block with the data and written zeros
    assert stats.offloaded == (data if offloaded else 0) and stats.written == data
    qemu_img("compare", "-f", "raw", "-F", fmt, src, dst)
    if offloaded:
        assert data_bytes(dst, "raw") == data  # the holes stay holes


def test_copy_offloading_on_the_command_line(tmp_path: Path) -> None:
    src = source(tmp_path)
    dst = tmp_path / "out.raw"
    tapnbd("convert", "-q", "-C", "-f", "raw", "-O", "raw", src, dst)
    qemu_img("compare", "-f", "raw", "-F", "raw", src, dst)
    for extra in (["-S", "4k"], ["-c"]):
        out = tapnbd(
            "convert", "-q", "-C", *extra, "-f", "raw", "-O", "qcow2", src, dst, check=False
        )
        assert "cannot go with -S or -c" in out, out


async def test_copy_offloading_falls_back_when_the_kernel_refuses(tmp_path: Path) -> None:
    """From tmpfs to this filesystem copy_file_range says EXDEV: the copy goes on the
    usual way, as qemu-img's does, and the result is the same disk."""
    from formats.qcow.convert import convert_image

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's directory")
    src = Path(tempfile.mkdtemp(dir=shm)) / "src.raw"
    try:
        src.write_bytes(source(tmp_path).read_bytes())
        dst = tmp_path / "out.raw"
        stats = await convert_image(
            str(src), str(dst), "raw", src_fmt="raw", tuning=CopyTuning(offload=True)
        )
        assert stats.offloaded == 0 and stats.written > 0
        qemu_img("compare", "-f", "raw", "-F", "raw", src, dst)
    finally:
        shutil.rmtree(src.parent)


# -W: out-of-order writes


class _LateFirst(RamDriver):
    """Reads that finish in reverse: the lower the offset, the longer it takes."""

    async def pread(self, offset: int, length: int) -> bytes | bytearray:
        await asyncio.sleep(0.02 * (self.size() - offset) / self.size())
        return await super().pread(offset, length)


class _Logged(RamDriver):
    """Records the offset of each write and zeroing, in the order they reach it."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.log: list[int] = []

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self.log.append(offset)
        await super().pwrite(offset, data, fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        self.log.append(offset)
        await super().zero(offset, length, may_trim=may_trim, fua=fua, fast=fast)


@pytest.mark.parametrize("zero_target", [False, True])
@pytest.mark.parametrize("out_of_order", [False, True])
async def test_writes_are_in_order_unless_w(zero_target: bool, out_of_order: bool) -> None:
    """16 chunks in flight whose reads finish last-first: without -W they are written
    first-first all the same (with -n, the zero run between them too); with -W as their
    reads finish."""
    size = 32 * MiB
    src = _LateFirst(size)
    await src.pwrite(0, b"\x05" * (14 * MiB))
    await src.pwrite(18 * MiB, b"\x06" * (14 * MiB))  # 4 MiB of zeros between
    dst = _Logged(size)
    if zero_target:  # -n: an existing image, written over
        await dst.pwrite(0, b"\xff" * size)
        dst.log.clear()
    tuning = CopyTuning(depth=16, out_of_order=out_of_order)
    await _copy(
        Backend(src, read_only=True), Backend(dst), size, Pace(), zero_target=zero_target,
        tuning=tuning,
    )  # fmt: skip
    assert bytes(await dst.pread(0, size)) == bytes(await src.pread(0, size))
    if out_of_order:
        assert dst.log != sorted(dst.log)
    else:
        assert dst.log == sorted(dst.log) and len(dst.log) >= 14 + zero_target


class _AllData(RamDriver):
    """A RAM disk with no block status: all of it is one data run, zeros included."""

    def can_extents(self) -> bool:
        return False


@pytest.mark.parametrize("sparse", [64 << 10, 8 << 10])
async def test_zero_blocks_in_data_are_holes_the_short_last_one_too(sparse: int) -> None:
    """64 KiB of data, then zeros read as data to the disk's end, which is not a whole
    block: only the data is written, the zeros of the short last block included."""
    size = (192 << 10) + (4 << 10)
    src = _AllData(size)
    await src.pwrite(0, b"\x11" * (64 << 10))
    dst = _Logged(size)
    stats = await _copy(
        Backend(src, read_only=True), Backend(dst), size, Pace(), tuning=CopyTuning(sparse)
    )
    assert dst.log == [0] and stats.written == 64 << 10
    assert bytes(await dst.pread(0, size)) == bytes(await src.pread(0, size))


@pytest.mark.parametrize("differs", [False, True])
async def test_an_overlays_short_last_block_is_written_only_if_it_differs(differs: bool) -> None:
    """-B: each block is compared with what the target reads now (its backing file);
    the disk's short last block too."""
    size = (64 << 10) + (4 << 10)
    src = _AllData(size)
    await src.pwrite(0, b"\x07" * size)
    if differs:
        await src.pwrite(size - 4096, b"\x08" * 4096)
    dst = _Logged(size)
    await dst.pwrite(0, b"\x07" * size)  # what the backing file reads
    dst.log.clear()
    await _copy(Backend(src, read_only=True), Backend(dst), size, Pace(), diff=True)
    assert dst.log == ([64 << 10] if differs else [])
    assert bytes(await dst.pread(0, size)) == bytes(await src.pread(0, size))


def source_read_last_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> Path:
    """A 16 MiB raw source whose reads (through any read-only Backend) finish
    last-first: a copy that writes as its reads finish writes out of order."""
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(seed).randbytes(16 * MiB))
    real = Backend.pread

    async def late_first(self: Backend, offset: int, length: int) -> bytes | bytearray | memoryview:
        if self.read_only:  # the source
            await asyncio.sleep(0.02 * (16 * MiB - offset) / (16 * MiB))
        return await real(self, offset, length)

    monkeypatch.setattr(Backend, "pread", late_first)
    return src


def host_offsets(image: Path) -> list[int]:
    """Where qemu-img map finds the qcow2 image's data clusters, in guest order."""
    runs = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", image))
    return [r["offset"] for r in runs if r["data"]]


@pytest.mark.parametrize("out_of_order", [False, True])
async def test_without_w_a_new_qcow2_image_is_laid_out_in_the_guests_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out_of_order: bool
) -> None:
    """qemu-img map: the data clusters' host offsets rise with their guest offsets
    (as qemu-img convert's, without -W), though the source's reads finish last-first;
    with -W they need not. qemu-img compare: the same disk either way."""
    from formats.qcow.convert import convert_image

    src = source_read_last_first(tmp_path, monkeypatch, 7)
    dst = tmp_path / "dst.qcow2"
    tuning = CopyTuning(depth=8, out_of_order=out_of_order)
    await convert_image(str(src), str(dst), "qcow2", src_fmt="raw", tuning=tuning)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, dst)
    hosts = host_offsets(dst)
    assert (hosts == sorted(hosts)) is not out_of_order, hosts


@pytest.mark.parametrize("w", [False, True])
def test_the_cli_passes_w_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, w: bool) -> None:
    """``tapnbd convert [-W]`` in process, the source's reads finishing last-first as
    above: the layout says whether the command line's -W reached the copy."""
    from typer.testing import CliRunner

    from tapnbd.cli import app, load_commands

    src = source_read_last_first(tmp_path, monkeypatch, 9)
    dst = tmp_path / "dst.qcow2"
    load_commands()
    args = ["convert", "-q", *(["-W"] if w else []), "-m", "8", "-f", "raw", "-O", "qcow2"]
    res = CliRunner().invoke(app, [*args, str(src), str(dst)])
    assert res.exit_code == 0, (res.stdout, res.exception)
    hosts = host_offsets(dst)
    assert (hosts == sorted(hosts)) is not w, hosts


def test_w_on_the_command_line(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(8).randbytes(6 * MiB))
    for args in (["-W"], ["--out-of-order", "-m", "16"], ["-W", "-c"]):
        dst = tmp_path / "dst.qcow2"
        tapnbd("convert", "-q", *args, "-f", "raw", "-O", "qcow2", src, dst)
        qemu_img("compare", "-f", "raw", "-F", "qcow2", src, dst)
        dst.unlink()
