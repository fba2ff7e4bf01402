"""Helpers for the VHD tests: qemu-made images (``-f vpc``), libvhdi, image surgery."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

from formats.vhd.layout import FOOTER_CHECKSUM_AT, HEADER_CHECKSUM_AT, checksum
from tests.formats.qcow_util import need, qemu_img, run
from tests.helpers import qemu_io

MiB = 1 << 20
SIZE = 16 * MiB

#: (pattern, offset, length): unaligned, crossing 2 MiB blocks, the last sector.
PATTERNS = [
    ("0xab", 0, 100 * 1024),
    ("0xcd", 5 * MiB + 512, 4096),
    ("0xee", 3 * MiB - 100, 200),
    ("0x11", 2 * MiB - 4096, 8192),
    ("0x22", 9 * MiB + 7, 70000),
]


def write_patterns(image: Path, patterns: list[tuple[str, int, int]] = PATTERNS) -> None:
    qemu_io(image, *(f"write -P {p} {off} {n}" for p, off, n in patterns), fmt="vpc")


def qemu_vhd(path: Path, size: int = SIZE, subformat: str = "dynamic") -> Path:
    """A VHD made by ``qemu-img create -f vpc`` (creator 'qemu': sized by CHS)."""
    need("qemu-img", "qemu-io")
    qemu_img("create", "-f", "vpc", "-o", f"subformat={subformat}", path, str(size))
    return path


def qemu_raw(img: Path, out: Path) -> bytes:
    """What qemu reads: ``qemu-img convert -f vpc -O raw``."""
    qemu_img("convert", "-f", "vpc", "-O", "raw", img, out)
    return out.read_bytes()


def qemu_size(img: Path) -> int:
    import json

    return int(json.loads(qemu_img("info", "-f", "vpc", "--output=json", img))["virtual-size"])


def refooter(path: Path, fields: dict[int, bytes]) -> None:
    """Change footer fields ({offset: bytes}) in both copies, checksums redone."""
    data = bytearray(path.read_bytes())
    ends = [len(data) - 512]
    if data[:8] == b"conectix":
        ends.append(0)
    for at in ends:
        foot = bytearray(data[at : at + 512])
        for off, raw in fields.items():
            foot[off : off + len(raw)] = raw
        foot[FOOTER_CHECKSUM_AT : FOOTER_CHECKSUM_AT + 4] = checksum(
            foot, FOOTER_CHECKSUM_AT
        ).to_bytes(4, "big")
        data[at : at + 512] = foot
    path.write_bytes(bytes(data))


def patch_header(path: Path, at: int, raw: bytes, *, fix_checksum: bool = True) -> None:
    """Write ``raw`` at ``at`` inside the dynamic header (at 512), checksum redone."""
    with open(path, "r+b") as f:
        f.seek(512)
        hdr = bytearray(f.read(1024))
        hdr[at : at + len(raw)] = raw
        if fix_checksum:
            hdr[HEADER_CHECKSUM_AT : HEADER_CHECKSUM_AT + 4] = checksum(
                hdr, HEADER_CHECKSUM_AT
            ).to_bytes(4, "big")
        f.seek(512)
        f.write(hdr)


def bat(path: Path) -> list[int]:
    data = path.read_bytes()
    toff, n = struct.unpack_from(">QxxxxI", data, 512 + 16)
    return list(struct.unpack_from(f">{n}I", data, toff))


@contextlib.contextmanager
def vhdimount(image: Path, mnt: Path) -> Iterator[Path]:
    """libvhdi's FUSE view of ``image`` (its parent chain followed): the top layer."""
    need("vhdimount", "fusermount")
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        import pytest

        pytest.skip("vhdimount needs FUSE (root, /dev/fuse)")
    mnt.mkdir(exist_ok=True)
    run("vhdimount", image, mnt, timeout=30)
    try:
        files = sorted(mnt.iterdir(), key=lambda p: int(p.name[4:]))
        # vhdi1 is the bottom of the chain, the last one the image itself.
        yield files[-1]
    finally:
        subprocess.run(["fusermount", "-u", str(mnt)], check=False, capture_output=True)
