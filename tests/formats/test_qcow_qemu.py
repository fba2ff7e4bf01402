"""qcow interoperability with qemu as the referee, at the driver level (no server).

- images made and written by qemu-img/qemu-io read back correctly through QcowDriver;
- images written by QcowDriver compare equal (qemu-img compare) to a raw image holding
  the same writes;
- qemu-img convert -O raw of our images matches our own convert.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from formats.qcow.convert import convert_image
from tapnbd.backend import Backend
from tests.formats.qcow_util import (
    MiB,
    compare,
    make_qcow,
    make_raw,
    open_qcow,
    qemu_img,
    qemu_io,
    random_writes,
    write_raw,
)


@pytest.fixture(autouse=True)
def _tools() -> None:
    from tests.formats.qcow_util import need

    need("qemu-img", "qemu-io")


PATTERNS = [
    ("0xab", 0, 65536),
    ("0xcd", 5 * MiB + 512, 4096),
    ("0xee", 3 * MiB - 100, 200),  # crosses a cluster boundary
    ("0x11", 2 * MiB - 4096, 8192),  # crosses an L1 slot (2 MiB)
    ("0x22", 9 * MiB, 1536),
]


def _write_patterns(image: Path, fmt: str = "qcow") -> None:
    qemu_io(image, *(f"write -P {p} {off} {n}" for p, off, n in PATTERNS), fmt=fmt)


def _expected(size: int, base: bytes | None = None) -> bytearray:
    ref = bytearray(base if base is not None else bytes(size))
    for p, off, n in PATTERNS:
        ref[off : off + n] = bytes([int(p, 16)]) * n
    return ref


@pytest.mark.parametrize("backing", [False, True], ids=["standalone", "backing"])
async def test_qemu_images_read_back(tmp_path: Path, backing: bool) -> None:
    """qemu-img create -f qcow (4 KiB clusters alone, 512 B with a backing file)."""
    size = 16 * MiB
    img = tmp_path / "q.qcow"
    base = None
    if backing:
        braw = make_raw(tmp_path / "base.raw", size)
        base = os.urandom(size)
        write_raw(braw, 0, base)
        qemu_img("create", "-f", "qcow", "-b", str(braw), "-F", "raw", img)
    else:
        qemu_img("create", "-f", "qcow", img, str(size))
    _write_patterns(img)
    d = await open_qcow(img)
    assert d.g.cluster_size == (512 if backing else 4096)
    assert not d.fast_path  # no extension: the normal path
    ref = _expected(size, base)
    assert bytes(await d.pread(0, size)) == bytes(ref)
    # Unaligned reads across clusters and runs.
    rng = random.Random(1)
    for _ in range(200):
        off = rng.randrange(size - 1)
        n = rng.randrange(1, min(size - off, 300000) + 1)
        assert bytes(await d.pread(off, n)) == bytes(ref[off : off + n])
    await d.close()


@pytest.mark.parametrize("backing", [False, True], ids=["standalone", "backing"])
async def test_write_into_qemu_images(tmp_path: Path, backing: bool) -> None:
    """Our writes into qemu's images read back right in qemu."""
    size = 16 * MiB
    img = tmp_path / "q.qcow"
    ref_path = make_raw(tmp_path / "ref.raw", size)
    if backing:
        braw = make_raw(tmp_path / "base.raw", size)
        write_raw(braw, 0, os.urandom(size))
        write_raw(ref_path, 0, braw.read_bytes())
        qemu_img("create", "-f", "qcow", "-b", str(braw), "-F", "raw", img)
    else:
        qemu_img("create", "-f", "qcow", img, str(size))
    _write_patterns(img)
    _write_patterns(ref_path, fmt="raw")
    d = await open_qcow(img)
    for off, data in random_writes(random.Random(2), size, 60):
        await d.pwrite(off, data)
        write_raw(ref_path, off, data)
    await d.close()
    compare(img, ref_path)


@pytest.mark.parametrize(
    "kind", ["optimised", "normal", "reserve", "cluster512", "cluster64k", "backing"]
)
async def test_our_writes_compare_equal(tmp_path: Path, kind: str) -> None:
    """tapnbd-written images compare equal to a raw image holding the same writes."""
    size = 24 * MiB + 4096
    ref_path = make_raw(tmp_path / "ref.raw", size)
    backing = None
    if kind == "backing":
        backing = make_raw(tmp_path / "base.raw", size)
        data = os.urandom(size)
        write_raw(backing, 0, data)
        write_raw(ref_path, 0, data)
    img = await make_qcow(
        tmp_path / "t.qcow",
        size,
        optimise=kind != "normal",
        backing=backing,
        reserve=kind == "reserve",
        cluster_size={"cluster512": 512, "cluster64k": 65536}.get(kind),
    )
    d = await open_qcow(img)
    assert d.fast_path == (kind not in ("normal", "backing"))
    rng = random.Random(kind)
    for off, data in random_writes(rng, size, 120):
        await d.pwrite(off, data, fua=rng.random() < 0.05)
        write_raw(ref_path, off, data)
        if rng.random() < 0.1:
            await d.flush()
    # Zeroing and discard, mirrored (discard is mirrored as zeros where it zeroes).
    for _ in range(10):
        off = rng.randrange(size - MiB)
        n = rng.randrange(1, MiB)
        await d.zero(off, n, may_trim=rng.random() < 0.5, fua=False, fast=False)
        write_raw(ref_path, off, bytes(n))
    await d.close()
    compare(img, ref_path)
    # And through our own reader after a reopen.
    d = await open_qcow(img, read_only=True)
    assert bytes(await d.pread(0, size)) == ref_path.read_bytes()
    await d.close()


async def test_compressed_clusters(tmp_path: Path) -> None:
    """Compressed clusters (qemu-img convert -c) read, and a partial write rewrites one."""
    size = 8 * MiB
    raw = make_raw(tmp_path / "src.raw", size)
    rng = random.Random(3)
    text = bytes(rng.choice(b"abcdefgh ") for _ in range(size // 2))
    write_raw(raw, 0, text)
    write_raw(raw, size // 2, os.urandom(1 * MiB))  # incompressible: stored plain
    img = tmp_path / "c.qcow"
    # qemu-img 7.2 writes every cluster, then exits 1 on the zero-length compressed
    # write that ends a compressed conversion (qcow has no such thing): check the result.
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow", raw, img, check=False)
    compare(img, raw)
    d = await open_qcow(img)
    _alloc, comp = await d.allocation()
    assert comp > 0
    assert bytes(await d.pread(0, size)) == raw.read_bytes()
    assert bytes(await d.pread(12345, 10000)) == raw.read_bytes()[12345:22345]
    # Partial writes into compressed clusters: decompress, merge, reallocate.
    ref = bytearray(raw.read_bytes())
    for off in (100, 4096 * 7 + 5, 2 * MiB + 77):
        await d.pwrite(off, b"Z" * 300)
        ref[off : off + 300] = b"Z" * 300
    await d.pwrite(8192, b"W" * 4096)  # a whole compressed cluster, no decompression
    ref[8192 : 8192 + 4096] = b"W" * 4096
    await d.zero(16384, 4096, may_trim=True, fua=False, fast=False)
    ref[16384 : 16384 + 4096] = bytes(4096)
    await d.zero(20480 + 100, 100, may_trim=True, fua=False, fast=False)
    ref[20580:20680] = bytes(100)
    assert bytes(await d.pread(0, size)) == bytes(ref)
    await d.close()
    refp = make_raw(tmp_path / "ref.raw", size)
    write_raw(refp, 0, bytes(ref))
    compare(img, refp)


@pytest.mark.parametrize("optimise", [True, False])
async def test_convert_matches_qemu_img_convert(tmp_path: Path, optimise: bool) -> None:
    size = 20 * MiB
    img = await make_qcow(tmp_path / "t.qcow", size, optimise=optimise)
    d = await open_qcow(img)
    for off, data in random_writes(random.Random(4), size, 40):
        await d.pwrite(off, data)
    await d.pwrite(3 * MiB, bytes(MiB))  # written zeros: skipped by convert
    await d.close()
    ours = tmp_path / "ours.raw"
    theirs = tmp_path / "theirs.raw"
    stats = await convert_image(str(img), str(ours), "raw")
    assert stats.skipped > 0
    qemu_img("convert", "-f", "qcow", "-O", "raw", img, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    # qcow -> qcow (normal and optimised) -> compare with qemu
    for opt in (True, False):
        out = tmp_path / f"copy{opt}.qcow"
        await convert_image(str(img), str(out), "qcow", optimise=opt)
        compare(out, theirs)
    # raw -> qcow stays sparse: zero regions are not allocated
    q2 = tmp_path / "fromraw.qcow"
    await convert_image(str(theirs), str(q2), "qcow", optimise=False)
    compare(q2, theirs)
    d = await open_qcow(q2, read_only=True)
    alloc, _ = await d.allocation()
    assert alloc * d.g.cluster_size < size
    await d.close()


async def test_backing_chain_qcow_over_qcow(tmp_path: Path) -> None:
    """A chain raw <- qcow <- qcow, with qemu writing the middle and us the top."""
    size = 8 * MiB
    base = make_raw(tmp_path / "base.raw", size)
    write_raw(base, 0, os.urandom(size))
    mid = tmp_path / "mid.qcow"
    qemu_img("create", "-f", "qcow", "-b", str(base), "-F", "raw", mid)
    qemu_io(mid, "write -P 0x77 1M 100k")
    top = await make_qcow(tmp_path / "top.qcow", None, backing=mid)
    d = await open_qcow(top)
    assert d.size() == size
    await d.pwrite(1 * MiB + 50_000, b"T" * 100_000)
    await d.close()
    ref = bytearray(base.read_bytes())
    ref[MiB : MiB + 102400] = b"\x77" * 102400
    ref[MiB + 50_000 : MiB + 150_000] = b"T" * 100_000
    refp = make_raw(tmp_path / "ref.raw", size)
    write_raw(refp, 0, bytes(ref))
    compare(top, refp)
    d = await open_qcow(top, read_only=True)
    b = Backend(d, read_only=True)
    assert bytes(await b.pread(0, size)) == bytes(ref)
    await b.close()
