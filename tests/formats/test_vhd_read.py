"""VHDs made by qemu (``-f vpc``) and by tapnbd, served and read by real clients.

qemu is the referee for fixed and dynamic disks: nbdcopy's copy through ``tapnbd serve``
must equal ``qemu-img convert -f vpc -O raw`` byte for byte, and the sizes must agree.
libvhdi (vhdimount) is the second reader, and the one that follows differencing chains.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from formats import open_image, probe
from formats.vhd import VhdDriver
from formats.vhd.create import create_vhd
from formats.vhd.layout import BATMAP_COOKIE, BATMAP_V1_2, batmap_checksum
from tapnbd.driver import Extent, ExtentFlags
from tests.formats.qcow2_util import nbd_map
from tests.formats.qcow_util import need, qemu_img, run
from tests.formats.vhd_util import (
    SIZE,
    MiB,
    bat,
    qemu_raw,
    qemu_size,
    qemu_vhd,
    refooter,
    vhdimount,
    write_patterns,
)
from tests.helpers import Server, qemu_io


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_qemu_image_reads_back(
    tmp_path: Path, serve: Callable[..., Server], subformat: str
) -> None:
    need("nbdcopy", "nbdinfo")
    img = qemu_vhd(tmp_path / "q.vhd", subformat=subformat)
    write_patterns(img)
    expected = qemu_raw(img, tmp_path / "qemu.raw")
    # A fixed disk has no header to probe: it is VHD only when the admin says so.
    server = serve(str(img), "--read-only", "--format", "vhd")
    out = tmp_path / "nbd.raw"
    run("nbdcopy", server.uri, out)
    assert out.read_bytes() == expected
    assert int(run("nbdinfo", "--size", server.uri)) == qemu_size(img)
    if subformat == "dynamic":
        # Blocks 0, 1, 2 and 4 hold data; the rest are holes.
        data = [(s, e) for s, e, is_data, _z in nbd_map(server.uri) if is_data]
        assert data == [(0, 6 * MiB), (8 * MiB, 10 * MiB)]


@pytest.mark.parametrize("size", [1 * MiB, 16 * MiB + 3 * 512, 127 * MiB + 77 * 512, 5 << 30])
def test_size_matches_qemu(tmp_path: Path, size: int) -> None:
    """qemu sizes its own images by CHS: tapnbd must report the same size."""
    img = qemu_vhd(tmp_path / "q.vhd", size=size)

    async def main() -> int:
        d = await open_image(str(img))
        try:
            return d.size()
        finally:
            await d.close()

    assert asyncio.run(main()) == qemu_size(img)


@pytest.mark.parametrize("creator", [b"vpc ", b"win ", b"qem2", b"tap\0", b"d2v "])
def test_size_rule_by_creator(tmp_path: Path, creator: bytes) -> None:
    """Virtual PC's images are sized by CHS, Hyper-V's and blktap's by current size."""
    img = qemu_vhd(tmp_path / "q.vhd", size=20 * MiB)
    chs_size = qemu_size(img)
    # A current size of 16 MiB: smaller than what the geometry says.
    refooter(img, {28: creator, 48: (16 * MiB).to_bytes(8, "big")})

    async def main() -> int:
        d = await open_image(str(img))
        try:
            return d.size()
        finally:
            await d.close()

    ours = asyncio.run(main())
    assert ours == qemu_size(img)
    assert ours == (chs_size if creator == b"vpc " else 16 * MiB)


def test_fixed_probes_as_raw(tmp_path: Path) -> None:
    img = qemu_vhd(tmp_path / "f.vhd", subformat="fixed")
    assert probe(str(img)) == "raw"
    dyn = qemu_vhd(tmp_path / "d.vhd")
    assert probe(str(dyn)) == "vhd"


@pytest.mark.parametrize("block_size", [512 * 1024, 4096, 8 * MiB])
def test_block_sizes_read_by_qemu(tmp_path: Path, block_size: int) -> None:
    """tapnbd-made images with other block sizes, written by tapnbd, read by qemu."""
    img = tmp_path / "t.vhd"
    expected = bytearray(SIZE)

    async def main() -> None:
        await create_vhd(str(img), SIZE, block_size=block_size)
        d = await open_image(str(img), fmt="vhd")
        try:
            for off, n, byte in [(0, 5000, 1), (3 * MiB - 7, 9000, 2), (SIZE - 512, 512, 3)]:
                await d.pwrite(off, bytes([byte]) * n)
                expected[off : off + n] = bytes([byte]) * n
        finally:
            await d.close()

    asyncio.run(main())
    assert qemu_raw(img, tmp_path / "out.raw") == bytes(expected)
    qemu_img("compare", "-f", "vpc", "-F", "raw", img, tmp_path / "out.raw")


def test_differencing_chain_read_by_libvhdi(tmp_path: Path, serve: Callable[..., Server]) -> None:
    """A chain made and written by tapnbd reads back the same through libvhdi."""
    need("nbdcopy", "qemu-io")
    base, top = tmp_path / "base.vhd", tmp_path / "top.vhd"
    asyncio.run(create_vhd(str(base), SIZE))
    server = serve(str(base), "--format", "vhd")
    qemu_io(server.uri, "write -P 0x41 0 64k", "write -P 0x42 3M 1M", "write -P 0x43 15M 1M")
    server.stop()
    asyncio.run(create_vhd(str(top), None, backing="base.vhd"))
    server = serve(str(top), "--format", "vhd")
    # Inside written blocks and beside them, and a whole new block.
    qemu_io(server.uri, "write -P 0x61 4k 8k", "write -P 0x62 3584k 4k", "write -P 0x63 8M 2M")
    ours = tmp_path / "ours.raw"
    run("nbdcopy", server.uri, ours)
    server.stop()
    expected = bytearray(SIZE)
    for off, n, b in [
        (0, 64 << 10, 0x41), (3 * MiB, MiB, 0x42), (15 * MiB, MiB, 0x43),
        (4096, 8192, 0x61), (3 * MiB + 512 * 1024, 4096, 0x62), (8 * MiB, 2 * MiB, 0x63),
    ]:  # fmt: skip
        expected[off : off + n] = bytes([b]) * n
    assert ours.read_bytes() == bytes(expected)
    with vhdimount(top, tmp_path / "mnt") as view:
        assert view.read_bytes() == bytes(expected)
    info = run("vhdiinfo", top)
    assert "Differential" in info and "base.vhd" in info


def test_partial_sector_write_copies_nothing(tmp_path: Path) -> None:
    """A differencing disk keeps only the sectors written; the bitmap says which."""
    base, top = tmp_path / "base.vhd", tmp_path / "top.vhd"

    async def main() -> tuple[bytes, list[Extent], list[bytes | None]]:
        await create_vhd(str(base), SIZE)
        d = await open_image(str(base), fmt="vhd")
        await d.pwrite(0, b"P" * (4 * MiB))
        await d.close()
        await create_vhd(str(top), None, backing=str(base))
        d = await open_image(str(top), fmt="vhd")
        try:
            await d.pwrite(10_003, b"x" * 7)  # inside sector 19
            await d.pwrite(4096 + 100, b"y" * 5)  # inside sector 8
            await d.pwrite(20 * 512 + 412, b"h" * 100)  # the tail of sector 20
            await d.pwrite(22 * 512, b"w" * 512)  # all of sector 22, then
            await d.pwrite(21 * 512, b"t" * 10)  # the head of 21: 22 stays as written
            await d.flush()
            # A run wholly the parent's, in a block the child never wrote.
            assert bytes(await d.pread(2 * MiB, 4096)) == b"P" * 4096
            # The synchronous path answers only for runs that are all this image's.
            nowait = [d.pread_nowait(off, n) for off, n in ((19 * 512, 512), (22 * 512, 1024))]
            got = bytes(await d.pread(0, 4 * MiB))
            return (
                got,
                list(await d.extents(0, 8 * MiB)),
                [None if x is None else bytes(x) for x in nowait],
            )
        finally:
            await d.close()

    data, extents, nowait = asyncio.run(main())
    want = bytearray(b"P" * (4 * MiB))
    want[10_003:10_010] = b"x" * 7
    want[4196:4201] = b"y" * 5
    want[20 * 512 + 412 : 21 * 512] = b"h" * 100
    want[22 * 512 : 23 * 512] = b"w" * 512
    want[21 * 512 : 21 * 512 + 10] = b"t" * 10
    assert data == bytes(want)
    assert nowait == [bytes(want[19 * 512 : 20 * 512]), None]
    # Data over the parent's data, then the parent's holes.
    assert extents == [
        Extent(0, 4 * MiB, ExtentFlags.DATA),
        Extent(4 * MiB, 4 * MiB, ExtentFlags.HOLE | ExtentFlags.ZERO),
    ]
    entries = bat(top)
    assert entries[1] == 0xFFFFFFFF  # the untouched block was not copied
    raw = top.read_bytes()
    boff = entries[0] * 512
    bitmap = raw[boff : boff + 512]
    # Sectors 8 and 19 to 22 only.
    assert bitmap[1] == 0x80 and bitmap[2] == 0x1E and bitmap.count(0) == 510
    # Its data: the sector, filled from the parent around the 7 bytes; nothing else.
    for s in (8, 19, 20, 21, 22):
        sector = raw[boff + 512 + s * 512 : boff + 512 + (s + 1) * 512]
        assert sector == bytes(want[s * 512 : (s + 1) * 512])


def _add_batmap(img: Path, full_block: int) -> None:
    """Add blktap2's batmap after the BAT, marking ``full_block`` as full."""
    data = bytearray(img.read_bytes())
    toff, n = struct.unpack_from(">QxxxxI", data, 512 + 16)
    hdr_at = toff + (n * 4 + 511) // 512 * 512
    footer = bytes(data[-512:])
    tail = bytes(data[hdr_at:-512])
    assert tail.count(0) == len(tail) or not tail  # nothing there yet (no blocks)
    bm = bytearray(512)
    bm[full_block >> 3] |= 0x80 >> (full_block & 7)
    hdr = struct.pack(
        ">8sQIII", BATMAP_COOKIE, hdr_at + 512, 1, BATMAP_V1_2, batmap_checksum(bm, BATMAP_V1_2)
    )
    data[hdr_at:] = hdr.ljust(512, b"\0") + bm + footer
    img.write_bytes(bytes(data))


def test_batmap_is_read(tmp_path: Path) -> None:
    """blktap2's batmap marks full blocks: their bitmap is not consulted."""
    img = tmp_path / "b.vhd"

    async def make() -> None:
        await create_vhd(str(img), SIZE)

    asyncio.run(make())
    _add_batmap(img, 0)

    async def main() -> tuple[bytes, bytes, bool]:
        d = await open_image(str(img), fmt="vhd")
        try:
            assert isinstance(d, VhdDriver) and d.meta.batmap is not None
            await d.pwrite(0, b"z" * 4096)  # allocates block 0 (bitmap all ones)
        finally:
            await d.close()
        # Clear block 0's on-disk bitmap: only the batmap now says it is full.
        boff = bat(img)[0] * 512
        with open(img, "r+b") as f:
            f.seek(boff)
            f.write(bytes(512))
        d = await open_image(str(img), fmt="vhd", read_only=True)
        try:
            first = bytes(await d.pread(0, 4096))
            assert isinstance(d, VhdDriver)
            valid = d.meta.batmap is not None
        finally:
            await d.close()
        # A batmap whose checksum fails is ignored: the bitmap decides (zeros).
        raw = bytearray(img.read_bytes())
        toff = struct.unpack_from(">Q", raw, 512 + 16)[0]
        raw[toff + 512 + 512] ^= 0x40  # a batmap bit flipped, checksum stale
        img.write_bytes(bytes(raw))
        d = await open_image(str(img), fmt="vhd", read_only=True)
        try:
            return first, bytes(await d.pread(0, 4096)), valid
        finally:
            await d.close()

    first, second, valid = asyncio.run(main())
    assert valid
    assert first == b"z" * 4096
    assert second == bytes(4096)
