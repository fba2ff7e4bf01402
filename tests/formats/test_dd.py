"""``tapnbd dd``: part of an image copied into a new one, in dd's terms (qemu-img dd).

qemu-img dd is the referee where its behaviour is dd's; where both skip and count are
given, qemu-img 7.2 counts the blocks from the input's start, so there the input's bytes
(read by qemu-img) are: the output must be exactly the slice dd(1) would copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.formats.qcow_util import need, qemu_img
from tests.helpers import qemu_io, run, tapnbd_cmd

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("qemu-img", "qemu-io")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A 4 MiB qcow2 image: a pattern from byte 24, data at 3M, holes elsewhere."""
    img = tmp_path / "in.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, str(4 * MiB))
    qemu_io(img, "write -P 0xa 24 512k", "write -P 0x3c 3M 64k", fmt="qcow2")
    return img


def raw_bytes(img: Path, fmt: str, tmp: Path) -> bytes:
    out = tmp / f"{img.name}.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", img, out)
    return out.read_bytes()


@pytest.mark.parametrize(
    "operands",
    [("skip=1",), ("bs=64k", "skip=3"), ("bs=4k", "count=7"), ("bs=1M", "count=9"), ("skip=30",)],
)
@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_dd_matches_qemu_img(
    tmp_path: Path, source: Path, operands: tuple[str, ...], out_fmt: str
) -> None:
    ours, ref = tmp_path / "ours", tmp_path / "ref"
    tapnbd = run(tapnbd_cmd("dd", "-O", out_fmt, f"if={source}", f"of={ours}", *operands))
    assert tapnbd.returncode == 0
    qemu_img("dd", "-O", out_fmt, f"if={source}", f"of={ref}", *operands)
    assert raw_bytes(ours, out_fmt, tmp_path) == raw_bytes(ref, out_fmt, tmp_path)


@pytest.mark.parametrize(("bs", "skip", "count"), [(512, 1, 100), (65536, 40, 16), (4096, 700, 10)])
def test_skip_then_count_copies_the_slice_dd_would(
    tmp_path: Path, source: Path, bs: int, skip: int, count: int
) -> None:
    out = tmp_path / "out.raw"
    run(tapnbd_cmd("dd", f"if={source}", f"of={out}", f"bs={bs}", f"skip={skip}", f"count={count}"))
    whole = raw_bytes(source, "qcow2", tmp_path)
    assert out.read_bytes() == whole[skip * bs : skip * bs + count * bs]


def test_holes_stay_holes_at_their_new_offsets(tmp_path: Path, source: Path) -> None:
    """The window's block status is the source's, shifted: the qcow2 output allocates
    only the data that was there (3M + 64k becomes 2M + 64k after skipping 1 MiB)."""
    out = tmp_path / "out.qcow2"
    run(tapnbd_cmd("dd", "-O", "qcow2", f"if={source}", f"of={out}", "bs=1M", "skip=1"))
    runs = json.loads(qemu_img("map", "-f", "qcow2", "--output=json", out))
    data = [(r["start"], r["length"]) for r in runs if r["data"]]
    assert data == [(2 * MiB, 65536)], runs


@pytest.mark.parametrize(
    ("operands", "says"),
    [
        (("of=X",), "give both if=INPUT and of=OUTPUT"),
        (("if=IN", "of=X", "seek=1"), "expected if=, of=, bs=, count= or skip="),
        (("if=IN", "of=X", "bs=1", "bs=2"), "bs= is given twice"),
        (("if=IN", "of=X", "skip=8192"), "nothing to copy: it starts at byte 4194304"),
        (("if=IN", "of=X", "count=0"), "nothing to copy: the range is empty"),
        (("if=IN", "of=X", "bs=0"), "bs"),
    ],
)
def test_refused_by_name_and_nothing_made(
    tmp_path: Path, source: Path, operands: tuple[str, ...], says: str
) -> None:
    out = tmp_path / "X"
    args = [a.replace("IN", str(source)).replace("=X", f"={out}") for a in operands]
    r = run(tapnbd_cmd("dd", *args), check=False)
    assert r.returncode != 0 and says in r.stderr, r.stderr
    assert not out.exists()
