"""Helpers for the qcow2 tests: qemu-made images of every kind, and qemu as the referee."""

from __future__ import annotations

import json
from pathlib import Path

from tests.formats.qcow_util import need, qemu_img, run
from tests.helpers import qemu_io

MiB = 1 << 20
SIZE = 16 * MiB

#: (pattern, offset, length): unaligned, crossing clusters and (for 512 B clusters) L2 tables.
PATTERNS = [
    ("0xab", 0, 100 * 1024),
    ("0xcd", 5 * MiB + 512, 4096),
    ("0xee", 3 * MiB - 100, 200),
    ("0x11", 2 * MiB - 4096, 8192),
    ("0x22", 9 * MiB + 7, 70000),
]


def write_patterns(image: Path, patterns: list[tuple[str, int, int]] = PATTERNS) -> None:
    qemu_io(image, *(f"write -P {p} {off} {n}" for p, off, n in patterns), fmt="qcow2")


def make_image(tmp: Path, kind: str) -> Path:
    """A qemu-made qcow2 image of one ``kind`` (see IMAGE_KINDS)."""
    need("qemu-img", "qemu-io")
    img = tmp / f"{kind}.qcow2"
    if kind.startswith("cluster-"):
        qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={kind[8:]}", img, str(SIZE))
        write_patterns(img)
    elif kind == "v2":
        qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", img, str(SIZE))
        write_patterns(img)
    elif kind.startswith("refcount-"):
        qemu_img("create", "-f", "qcow2", "-o", f"refcount_bits={kind[9:]}", img, str(SIZE))
        write_patterns(img)
    elif kind == "zero-clusters":
        qemu_img("create", "-f", "qcow2", img, str(SIZE))
        write_patterns(img)
        # A zero cluster over data, one over nothing, and a discarded range.
        qemu_io(img, "write -z 0 64k", "write -z 12M 256k", "discard 9M 64k", fmt="qcow2")
    elif kind == "compressed":
        src = tmp / "src.qcow2"
        qemu_img("create", "-f", "qcow2", src, str(SIZE))
        write_patterns(src)
        qemu_io(src, "write -P 0x5a 6M 1M", fmt="qcow2")
        qemu_img("convert", "-c", "-O", "qcow2", src, img)
        # A compressed image with one cluster rewritten normally.
        qemu_io(img, "write -P 0x77 6M 4k", fmt="qcow2")
    elif kind == "chain":
        base = tmp / "base.raw"
        run("truncate", "-s", str(SIZE), base)
        qemu_io(base, "write -P 0x33 0 16M", fmt="raw")
        mid = tmp / "mid.qcow2"
        qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "raw", mid)
        qemu_io(mid, "write -P 0x44 1M 1M", "write -z 4M 64k", fmt="qcow2")
        qemu_img(
            "create", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", "-o", "cluster_size=4k", img
        )
        write_patterns(img)
        qemu_io(img, "write -z 1M 128k", "write -P 0x66 4194816 1000", fmt="qcow2")
    elif kind == "short-backing":
        base = tmp / "short.qcow2"
        qemu_img("create", "-f", "qcow2", base, str(SIZE // 2))
        qemu_io(base, "write -P 0x99 0 8M", fmt="qcow2")
        qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", img, str(SIZE))
        qemu_io(img, "write -P 0x12 8384512 8192", fmt="qcow2")
    elif kind in ("qcow-backing", "probed-backing"):
        base = tmp / "base.qcow"
        qemu_img("create", "-f", "qcow", base, str(SIZE))
        qemu_io(base, "write -P 0x71 0 3M", "write -P 0x72 9M 100k", fmt="qcow")
        qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow", img)
        write_patterns(img)
        if kind == "probed-backing":
            # Rename the backing format extension to an unknown type: the format is
            # then probed, as for images made before qemu stored it.
            head = bytearray(img.read_bytes()[:4096])
            at = head.index(bytes.fromhex("e2792aca"))
            with open(img, "r+b") as f:
                f.seek(at)
                f.write(bytes.fromhex("e2792acb"))
    elif kind == "raw-declared-backing":
        # The header says raw: the backing file is read as raw bytes although they look
        # like a qcow2 image (never re-probed: the trust rule).
        base = tmp / "looks-like.qcow2"
        qemu_img("create", "-f", "qcow2", base, str(SIZE))
        qemu_io(base, "write -P 0x73 0 1M", fmt="qcow2")
        qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "raw", img, str(SIZE))
        qemu_io(img, "write -P 0x74 64k 4k", fmt="qcow2")
    elif kind.startswith("snapshot"):
        qemu_img("create", "-f", "qcow2", img, str(SIZE))
        write_patterns(img)
        qemu_img("snapshot", "-c", "snap1", img)
        if kind == "snapshot":  # else every table is still shared with the snapshot
            qemu_io(img, "write -P 0xf0 0 8k", "write -P 0xf1 10M 64k", fmt="qcow2")
    else:
        raise ValueError(kind)
    return img


IMAGE_KINDS = [
    "cluster-512",
    "cluster-4096",
    "cluster-65536",
    "cluster-2M",
    "v2",
    "refcount-1",
    "refcount-64",
    "zero-clusters",
    "compressed",
    "chain",
    "short-backing",
    "snapshot",
    "snapshot-shared",
    "qcow-backing",
    "probed-backing",
    "raw-declared-backing",
]


def qemu_raw(img: Path, out: Path) -> bytes:
    """What qemu reads: ``qemu-img convert -O raw``."""
    qemu_img("convert", "-O", "raw", img, out)
    return out.read_bytes()


def qemu_map(img: Path) -> list[tuple[int, int, bool, bool]]:
    """``qemu-img map`` as merged (start, end, data, zero) ranges."""
    out = json.loads(qemu_img("map", "--output=json", img))
    return merge([(e["start"], e["length"], e["data"], e["zero"]) for e in out])


def nbd_map(uri: str) -> list[tuple[int, int, bool, bool]]:
    """``nbdinfo --map`` (base:allocation) as merged (start, end, data, zero) ranges."""
    need("nbdinfo")
    out = json.loads(run("nbdinfo", "--map", "--json", uri))
    return merge([(e["offset"], e["length"], not e["type"] & 1, bool(e["type"] & 2)) for e in out])


def merge(entries: list[tuple[int, int, bool, bool]]) -> list[tuple[int, int, bool, bool]]:
    out: list[tuple[int, int, bool, bool]] = []
    for start, length, data, zero in entries:
        if out and out[-1][1] == start and out[-1][2:] == (data, zero):
            out[-1] = (out[-1][0], start + length, data, zero)
        else:
            out.append((start, start + length, data, zero))
    return out


def check_clean(img: Path) -> dict[str, object]:
    """``qemu-img check``: exit 0, no leaks, no corruptions."""
    out = qemu_img("check", "--output=json", img)
    report: dict[str, object] = json.loads(out[out.index("{") :])
    assert report.get("corruptions", 0) == 0, report
    assert report.get("leaks", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report
    return report


def set_reserved_bit(img: Path) -> None:
    """Set a reserved bit in the first L2 entry of the first L2 table: a hostile entry
    that every reader must refuse by name."""
    with img.open("r+b") as f:
        f.seek(40)  # the header's l1_table_offset
        l1 = int.from_bytes(f.read(8), "big")
        f.seek(l1)
        l2 = int.from_bytes(f.read(8), "big") & ((1 << 56) - 512)
        f.seek(l2)
        entry = int.from_bytes(f.read(8), "big")
        f.seek(l2)
        f.write((entry | 0x2).to_bytes(8, "big"))
