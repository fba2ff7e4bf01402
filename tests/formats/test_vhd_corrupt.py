"""Hostile VHDs: each is refused at open with the field named, quickly.

The image-trust bounds: any header opens or is refused within 5 s and in bounded memory
(the BAT is at most 4 MiB and inside the file; locator data at most 64 KiB).
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from pathlib import Path

import pytest

from formats import open_image
from formats.vhd.create import create_vhd
from formats.vhd.layout import HEADER_CHECKSUM_AT
from tapnbd.errors import ImageError
from tests.formats.vhd_util import SIZE, MiB, bat, patch_header, refooter

#: Offsets inside the dynamic header (at 512 in the file).
H_TABLE_OFFSET = 16
H_MAX_ENTRIES = 28
H_BLOCK_SIZE = 32
H_PARENT_UUID = 40


async def _open(path: Path) -> None:
    d = await open_image(str(path), fmt="vhd", read_only=True)
    try:
        await d.pread(0, min(d.size(), 4 * MiB))
    finally:
        await d.close()


def refused(path: Path, *words: str) -> str:
    """Opening ``path`` fails within 5 s with a message containing every word."""
    t0 = time.monotonic()
    with pytest.raises(ImageError) as err:
        asyncio.run(_open(path))
    assert time.monotonic() - t0 < 5
    # Without the directory: a test's name in its tmp path must not match a word.
    msg = str(err.value).replace(str(path.parent), "")
    for w in words:
        assert w in msg, msg
    return msg


def _dynamic(path: Path, writes: int = 2) -> Path:
    async def main() -> None:
        await create_vhd(str(path), SIZE)
        d = await open_image(str(path), fmt="vhd")
        try:
            for k in range(writes):
                await d.pwrite(k * 2 * MiB, bytes([k + 1]) * 4096)
        finally:
            await d.close()

    asyncio.run(main())
    return path


def test_bad_footer_checksum(tmp_path: Path) -> None:
    img = _dynamic(tmp_path / "d.vhd")
    data = bytearray(img.read_bytes())
    data[-512 + 40] ^= 1  # original size, in the footer at the end
    data[40] ^= 1  # and in the copy
    img.write_bytes(bytes(data))
    refused(img, "footer checksum")


def test_bad_footer_at_end_uses_the_copy(tmp_path: Path) -> None:
    """A crash may leave the end without a footer: the copy at 0 opens it."""
    img = _dynamic(tmp_path / "d.vhd")
    data = bytearray(img.read_bytes())
    data[-512:] = bytes(512)
    img.write_bytes(bytes(data))
    asyncio.run(_open(img))


def test_bad_header_checksum(tmp_path: Path) -> None:
    img = _dynamic(tmp_path / "d.vhd")
    patch_header(img, H_BLOCK_SIZE + 1, b"\x11", fix_checksum=False)
    refused(img, "dynamic header checksum")


def test_bat_past_eof(tmp_path: Path) -> None:
    img = _dynamic(tmp_path / "d.vhd")
    patch_header(img, H_TABLE_OFFSET, struct.pack(">Q", 1 << 40))
    refused(img, "BAT", "past the end")


def test_bat_entry_past_eof(tmp_path: Path) -> None:
    img = _dynamic(tmp_path / "d.vhd")
    toff = struct.unpack_from(">Q", img.read_bytes(), 512 + H_TABLE_OFFSET)[0]
    with open(img, "r+b") as f:
        f.seek(toff + 4 * 3)
        f.write(struct.pack(">I", 0x00FFFFFF))
    refused(img, "BAT entry 3", "past the end")


def test_overlapping_blocks(tmp_path: Path) -> None:
    img = _dynamic(tmp_path / "d.vhd")
    entries = bat(img)
    toff = struct.unpack_from(">Q", img.read_bytes(), 512 + H_TABLE_OFFSET)[0]
    with open(img, "r+b") as f:
        f.seek(toff + 4 * 1)
        f.write(struct.pack(">I", entries[0] + 8))  # block 1 moved inside block 0
    refused(img, "BAT entry 1", "overlaps BAT entry 0")
    # More blocks than the file can hold: refused before any sorting.
    with open(img, "r+b") as f:
        f.seek(toff + 4 * 5)
        f.write(struct.pack(">I", entries[0]))
    refused(img, "BAT entry", "overlapping")


def test_block_over_the_bat(tmp_path: Path) -> None:
    img = _dynamic(tmp_path / "d.vhd")
    toff = struct.unpack_from(">Q", img.read_bytes(), 512 + H_TABLE_OFFSET)[0]
    with open(img, "r+b") as f:
        f.seek(toff + 4 * 6)
        f.write(struct.pack(">I", 1))  # block 6 over the header and the BAT
    refused(img, "overlap")


@pytest.mark.parametrize("entries", [0xFFFFFFFF, 1 << 20, 3])
def test_max_table_entries(tmp_path: Path, entries: int) -> None:
    img = _dynamic(tmp_path / "d.vhd")
    patch_header(img, H_MAX_ENTRIES, struct.pack(">I", entries))
    refused(img, "max table entries" if entries != 1 << 20 else "BAT")


@pytest.mark.parametrize("bs", [0, 1000, 1 << 30])
def test_bad_block_size(tmp_path: Path, bs: int) -> None:
    img = _dynamic(tmp_path / "d.vhd")
    patch_header(img, H_BLOCK_SIZE, struct.pack(">I", bs))
    refused(img, "block size")


def test_unknown_disk_type(tmp_path: Path) -> None:
    img = _dynamic(tmp_path / "d.vhd")
    refooter(img, {60: struct.pack(">I", 7)})
    refused(img, "disk type")


def test_parent_uuid_mismatch(tmp_path: Path) -> None:
    base, top = tmp_path / "base.vhd", tmp_path / "top.vhd"
    _dynamic(base)
    asyncio.run(create_vhd(str(top), None, backing="base.vhd"))
    patch_header(top, H_PARENT_UUID, bytes(range(16)))
    refused(top, "parent unique id")


def test_parent_locator_loop(tmp_path: Path) -> None:
    """a -> b -> a: each names the other as its parent."""
    a, b = tmp_path / "a.vhd", tmp_path / "b.vhd"
    _dynamic(tmp_path / "seed.vhd")
    asyncio.run(create_vhd(str(b), None, backing="seed.vhd"))
    asyncio.run(create_vhd(str(a), None, backing="b.vhd"))
    # Point b's locators at a (same length names: seed.vhd -> a.vhd is shorter; rewrite).
    raw = bytearray(b.read_bytes())
    for old, new in [
        (b"file://seed.vhd", b"file://a.vhd\0\0\0"),
        ("seed.vhd".encode("utf-16-le"), "a.vhd\0\0\0".encode("utf-16-le")),
    ]:
        at = raw.find(old, 1536)  # in the locators' data, not the header's name
        assert at > 0
        raw[at : at + len(old)] = new
    b.write_bytes(bytes(raw))
    msg = refused(a, "parent locator loop (")
    assert "checksum" not in msg


def test_locator_out_of_bounds(tmp_path: Path) -> None:
    base, top = tmp_path / "base.vhd", tmp_path / "top.vhd"
    _dynamic(base)
    asyncio.run(create_vhd(str(top), None, backing="base.vhd"))
    # Locator 0's data offset (576 + 16) far past the end.
    patch_header(top, 576 + 16, struct.pack(">Q", 1 << 40))
    refused(top, "parent locator 0", "outside the file")


def test_header_checksum_field_is_where_we_think(tmp_path: Path) -> None:
    img = _dynamic(tmp_path / "d.vhd")
    raw = img.read_bytes()
    assert struct.unpack_from(">I", raw, 512 + HEADER_CHECKSUM_AT)[0] != 0


def test_fuzz_footer_and_header(tmp_path: Path, seed: int) -> None:
    """Random damage to the footer, header and BAT: open and read, or refuse; fast."""
    print(f"seed {seed}")
    rng = random.Random(seed)
    clean = _dynamic(tmp_path / "clean.vhd", writes=3).read_bytes()
    img = tmp_path / "f.vhd"
    toff = struct.unpack_from(">Q", clean, 512 + H_TABLE_OFFSET)[0]
    regions = [(0, 512), (512, 1024), (toff, 64), (len(clean) - 512, 512)]
    opened = 0
    for _ in range(80):
        data = bytearray(clean)
        for _ in range(rng.randrange(1, 5)):
            a, n = rng.choice(regions)
            data[a + rng.randrange(n)] = rng.randrange(256)
        if rng.random() < 0.7:  # fix checksums so the damage gets past them
            from formats.vhd.layout import FOOTER_CHECKSUM_AT, checksum

            for at in (0, len(data) - 512):
                f = data[at : at + 512]
                data[at + 64 : at + 68] = checksum(f, FOOTER_CHECKSUM_AT).to_bytes(4, "big")
            h = data[512:1536]
            data[512 + 36 : 512 + 40] = checksum(h, HEADER_CHECKSUM_AT).to_bytes(4, "big")
        img.write_bytes(bytes(data))
        t0 = time.monotonic()
        try:
            asyncio.run(_open(img))
            opened += 1
        except ImageError:
            pass
        except OSError:
            pass  # a read of a bad block: EIO is allowed, a crash is not
        assert time.monotonic() - t0 < 5
    print(f"{opened} of 80 damaged images opened")


def test_hostile_bat_is_refused_fast(tmp_path: Path, seed: int) -> None:
    """The largest BAT allowed, full of random entries, in a sparse 1 TiB file."""
    print(f"seed {seed}")
    rng = random.Random(seed)
    img = _dynamic(tmp_path / "d.vhd")
    footer = img.read_bytes()[-512:]
    n = 1 << 20
    patch_header(img, H_MAX_ENTRIES, struct.pack(">I", n))
    size = 1 << 40
    toff = struct.unpack_from(">Q", img.read_bytes(), 512 + H_TABLE_OFFSET)[0]
    with open(img, "r+b") as f:
        f.truncate(size)
        f.seek(size - 512)
        f.write(footer)
        f.seek(toff)
        last = (size - 512 - (2 << 20) - 512) // 512
        f.write(struct.pack(f">{n}I", *(rng.randrange(8192, last) for _ in range(n))))
    refused(img, "BAT entry", "overlap")


def test_block_next_to_the_bat_opens_one_sector_into_it_does_not(tmp_path: Path) -> None:
    """The edges of the metadata check: adjacent is fine, one sector over is refused."""
    img = _dynamic(tmp_path / "d.vhd")
    toff = struct.unpack_from(">Q", img.read_bytes(), 512 + H_TABLE_OFFSET)[0]
    bat_end = toff + 512  # 8 entries, padded to a sector
    with open(img, "r+b") as f:
        f.seek(toff)
        f.write(struct.pack(">I", bat_end // 512))  # block 0 right after the BAT
    asyncio.run(_open(img))
    with open(img, "r+b") as f:
        f.seek(toff)
        f.write(struct.pack(">I", bat_end // 512 - 1))  # its last sector
    refused(img, "BAT entry 0", "overlaps the BAT")


def test_block_over_the_batmap(tmp_path: Path) -> None:
    from tests.formats.test_vhd_read import _add_batmap

    img = tmp_path / "b.vhd"
    asyncio.run(create_vhd(str(img), SIZE))
    _add_batmap(img, 0)
    raw = img.read_bytes()
    toff = struct.unpack_from(">Q", raw, 512 + H_TABLE_OFFSET)[0]
    batmap_at = toff + 512 + 512  # after the BAT's sector and the batmap's header
    span = (2 << 20) + 512
    img.write_bytes(raw[:-512] + bytes(span) + raw[-512:])  # room for one block
    with open(img, "r+b") as f:
        f.seek(toff)
        f.write(struct.pack(">I", batmap_at // 512))
    refused(img, "BAT entry 0", "overlaps the batmap")


def _locators(top: Path) -> list[tuple[int, int, int, int]]:
    """(platform code, data space, data length, data offset) of the 8 locators."""
    raw = top.read_bytes()
    return [struct.unpack_from(">IIIxxxxQ", raw, 512 + 576 + 24 * i) for i in range(8)]


def test_parent_found_by_each_locator(tmp_path: Path) -> None:
    """MacX, W2ru, W2ku are each enough alone; a drive-letter path is not followed."""
    base, top = tmp_path / "base.vhd", tmp_path / "top.vhd"
    _dynamic(base)
    asyncio.run(create_vhd(str(top), None, backing="base.vhd"))
    locs = _locators(top)
    codes = [c for c, *_ in locs if c]
    assert [c.to_bytes(4, "big") for c in codes] == [b"MacX", b"W2ru", b"W2ku"]
    clean = top.read_bytes()
    for keep in range(3):
        top.write_bytes(clean)
        for i in range(3):
            if i != keep:
                patch_header(top, 576 + 24 * i, bytes(4))  # platform code: none
        patch_header(top, 64, bytes(512))  # no parent name in the header either
        asyncio.run(_open(top))
    # Only a W2ku naming a Windows drive: there is nothing here to open.
    top.write_bytes(clean)
    _code, _space, _n, off = locs[2]
    name = "C:\\vhds\\base.vhd".encode("utf-16-le")
    with open(top, "r+b") as f:
        f.seek(off)
        f.write(name)
    patch_header(top, 576 + 24 * 2 + 8, struct.pack(">I", len(name)))
    for i in range(2):
        patch_header(top, 576 + 24 * i, bytes(4))
    patch_header(top, 64, bytes(512))
    refused(top, "no parent found")
