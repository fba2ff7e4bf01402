"""Hostile QCOW v1 images that claim far more than they hold (issue 11).

Each builder writes a file whose header is valid but whose claims are huge: a sparse
multi-GiB L1 table, an L1 full of bad pointers, a sparse 16 TiB file. They take a few
KiB of disk (or the few MiB the case needs) and milliseconds to make.

Also a command, to measure an image with the real CLI::

    python -m tests.formats.crafted huge-l1 /tmp/h.qcow [--chain 3] [--ext]
    python -m tests.formats.crafted bad-entries /tmp/b.qcow --entries 16777216
    python -m tests.formats.crafted many-tables /tmp/m.qcow --entries 8388608
    python -m tests.formats.crafted sparse-16t /tmp/s.qcow
"""

from __future__ import annotations

import argparse
import os
import struct
from pathlib import Path

from formats.qcow.geometry import MAX_L1_SIZE
from formats.qcow.layout import QCOW_MAGIC, XEN_MAGIC
from formats.qcow.meta import CKSUM_MAX_BYTES

#: The largest L1 table a header may claim: 2**28 - 1 entries, 2 GiB of table.
HUGE_L1 = MAX_L1_SIZE
L1_OFF = 4096
#: ext4 with 4 KiB blocks stops just short of 16 TiB.
FILE_16T = (16 << 40) - (1 << 20)


def header(
    size: int,
    *,
    cluster_bits: int = 9,
    l2_bits: int = 6,
    l1_off: int = L1_OFF,
    backing: tuple[int, int] = (0, 0),
) -> bytes:
    """A valid 48-byte QCOW v1 header."""
    return struct.pack(
        ">IIQIIQBB2xIQ",
        QCOW_MAGIC,
        1,
        backing[0],
        backing[1],
        0,
        size,
        cluster_bits,
        l2_bits,
        0,
        l1_off,
    )


def huge_l1(
    path: Path, l1_size: int = HUGE_L1, *, backing: str | None = None, ext: bool = False
) -> Path:
    """An image whose header claims an ``l1_size``-entry L1 (2 GiB of table at most),
    all of it a hole in a sparse file: a few KiB on disk.

    With ``ext``, blktap's extension too, optimised (min_cluster_alloc == l2_size), so
    an open has the checksum to consider.
    """
    cluster_bits, l2_bits = 9, 6
    size = l1_size << (cluster_bits + l2_bits)
    name = os.fsencode(backing) if backing else b""
    l1_off = L1_OFF if not name else L1_OFF * 2
    head = header(size, l1_off=l1_off, backing=(L1_OFF, len(name)) if name else (0, 0))
    if ext and not name:
        # The right checksum of the all-zero table, where an open would check it.
        ck = _zero_cksum(l1_size * 8) if l1_size * 8 <= CKSUM_MAX_BYTES else 0
        head += struct.pack(">IIII", XEN_MAGIC, ck, 1 << l2_bits, 0x03)
    with open(path, "wb") as f:
        f.write(head)
        if name:
            f.seek(L1_OFF)
            f.write(name)
        f.truncate(l1_off + l1_size * 8)
    return path


def _zero_cksum(n: int) -> int:
    """The extension's checksum of ``n`` zero bytes, without holding them."""
    import hashlib

    h = hashlib.md5(usedforsecurity=False)
    zero = bytes(1 << 20)
    while n:
        k = min(n, len(zero))
        h.update(zero[:k])
        n -= k
    return int.from_bytes(h.digest()[:4], "little")


def huge_chain(path: Path, depth: int, l1_size: int = HUGE_L1) -> Path:
    """``path`` backed by ``path.1`` backed by ... ``depth`` huge-L1 images in all."""
    names = [path.with_name(f"{path.name}.{k}") if k else path for k in range(depth)]
    for k in reversed(range(depth)):
        below = names[k + 1].name if k + 1 < depth else None
        huge_l1(names[k], l1_size, backing=below)
    return path


def bad_entries(path: Path, entries: int, value: int | None = None) -> Path:
    """An L1 of ``entries`` entries, every one pointing past the end of the file."""
    cluster_bits, l2_bits = 9, 6
    size = entries << (cluster_bits + l2_bits)
    end = L1_OFF + entries * 8
    bad = value if value is not None else (end + (1 << 30)) & ~511
    chunk = bad.to_bytes(8, "big") * 65536
    with open(path, "wb") as f:
        f.write(header(size))
        f.seek(L1_OFF)
        left = entries
        while left:
            k = min(left, 65536)
            f.write(chunk[: k * 8])
            left -= k
    return path


def overlapping(path: Path, entries: int) -> Path:
    """An L1 of ``entries`` entries that all name the one L2 table the file has room for:
    each looks valid on its own."""
    end = L1_OFF + entries * 8
    bad_entries(path, entries, value=end)
    os.truncate(path, end + (8 << 6))
    return path


def many_tables(path: Path, entries: int) -> Path:
    """A written L1 of ``entries`` entries, each naming its own L2 table, every table in
    the hole that follows: valid, and ``entries`` * 8 bytes of real metadata."""
    end = L1_OFF + entries * 8
    with open(path, "wb") as f:
        f.write(header(entries << 15))
        f.seek(L1_OFF)
        step = 65536
        for s in range(0, entries, step):
            n = min(step, entries - s)
            f.write(struct.pack(f">{n}Q", *range(end + s * 512, end + (s + n) * 512, 512)))
        f.truncate(end + entries * 512)
    return path


def sparse_16t(path: Path) -> Path:
    """A small valid image (16 TiB virtual, nothing allocated) in a 16 TiB sparse file
    (1 MiB short: ext4's limit), with 512-byte clusters: 2**35 of them in the file."""
    with open(path, "wb") as f:
        f.write(header(16 << 40, cluster_bits=9, l2_bits=13))
        f.truncate(FILE_16T)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("case", choices=["huge-l1", "bad-entries", "many-tables", "sparse-16t"])
    ap.add_argument("path", type=Path)
    ap.add_argument("--chain", type=int, default=1, help="huge-l1: images in the chain")
    ap.add_argument("--ext", action="store_true", help="huge-l1: with an optimised extension")
    ap.add_argument("--entries", type=int, default=HUGE_L1)
    a = ap.parse_args()
    if a.case == "huge-l1":
        if a.chain > 1:
            huge_chain(a.path, a.chain, a.entries)
        else:
            huge_l1(a.path, a.entries, ext=a.ext)
    elif a.case == "bad-entries":
        bad_entries(a.path, a.entries)
    elif a.case == "many-tables":
        many_tables(a.path, a.entries)
    else:
        sparse_16t(a.path)


if __name__ == "__main__":
    main()
