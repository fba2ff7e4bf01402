"""``tapnbd create -u``: a backing file recorded without being opened (it may not exist
yet), as ``qemu-img create -u``; qemu-img is the referee of what is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.formats.qcow_util import need, qemu_img
from tests.formats.qcow_util import tapnbd_out as tapnbd


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("qemu-img", "qemu-io")


def facts(img: Path, fmt: str) -> dict[str, object]:
    info = json.loads(qemu_img("info", "--output=json", "-f", fmt, img))
    return {k: v for k, v in info.items() if k not in ("filename", "actual-size")}


@pytest.mark.parametrize("fmt", ["qcow2", "qcow"])
def test_a_backing_file_that_does_not_exist_yet(tmp_path: Path, fmt: str) -> None:
    ours, theirs = tmp_path / f"ours.{fmt}", tmp_path / f"theirs.{fmt}"
    args = ["-f", fmt, "-u", "-b", "base.raw", "-F", "raw"]
    tapnbd("create", *args, ours, "4M")
    qemu_img("create", "-q", *args, theirs, "4M")
    mine = facts(ours, fmt)
    assert mine["backing-filename"] == "base.raw"
    if fmt == "qcow2":  # QCOW v1 differs in its own defaults (cluster size), not here
        assert mine == facts(theirs, fmt)
    # Once the backing file exists, the overlay reads through to it.
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x33" * (4 << 20))
    qemu_img("compare", "-f", fmt, "-F", "raw", ours, base)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["-f", "qcow2", "-u", "-b", "b.raw", "4M"], "give its format (-F)"),
        (["-f", "qcow2", "-u", "-b", "b.raw", "-F", "raw"], "give the size"),
        (["-f", "qcow", "-u", "-b", "b.raw", "4M"], "give its format (-F)"),
        (["-f", "vhd", "-u", "-b", "b.vhd", "4M"], "parent's UUID"),
        (["-f", "qcow2", "-u", "4M"], "-u is for a backing file"),
    ],
)
def test_what_cannot_be_recorded_unopened_is_refused(
    tmp_path: Path, args: list[str], says: str
) -> None:
    img = tmp_path / "img"
    out = tapnbd("create", img, *args, check=False)
    assert says in out and not img.exists(), out
