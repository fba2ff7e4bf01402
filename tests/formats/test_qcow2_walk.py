"""The tools that count every reference of a qcow2 image (check, snapshot, bitmap,
amend) against features they must count or refuse: a LUKS header is counted (it used to
be called a leak, so check -r freed it, and a snapshot zeroed its refcounts), and
extended L2 entries and an external data file are refused by name, untouched.
qemu-img, given the key, is the referee."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.formats.qcow_util import SECRET, create_encrypted, need, qemu_img
from tests.formats.qcow_util import tapnbd_out as tapnbd
from tests.helpers import qemu_io, run


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("qemu-img", "qemu-io")


def qemu_check(img: Path) -> None:
    """qemu-img check with the key: clean, the LUKS header readable."""
    r = run(
        ["qemu-img", "check", "--object", SECRET, "--image-opts",
         f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0"],
        check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_luks_header_is_counted_and_kept(tmp_path: Path) -> None:
    img = tmp_path / "enc.qcow2"
    create_encrypted(img, "encrypt.format=luks", "4M")
    header = img.read_bytes()[4096:8192]
    assert "0 leaked" in tapnbd("check", img)
    tapnbd("check", "-r", "all", img)
    tapnbd("snapshot", "-c", "s1", img)
    tapnbd("bitmap", "--add", img, "b0")
    tapnbd("amend", "-o", "refcount_bits=8", img)
    assert "0 leaked" in tapnbd("check", img)
    assert img.read_bytes()[4096:8192] == header
    qemu_check(img)


@pytest.mark.parametrize(
    ("opts", "says"),
    [("extended_l2=on", "'extended L2 entries'"), ("data_file={}/d.raw", "'external data file'")],
)
def test_what_cannot_be_walked_is_refused_by_name(tmp_path: Path, opts: str, says: str) -> None:
    img = tmp_path / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts.format(tmp_path), img, "4M")
    qemu_io(img, "write -P 1 0 1M", fmt="qcow2")
    before = img.read_bytes()
    for args in (
        ("check", img),
        ("check", "-r", "all", img),
        ("snapshot", "-c", "s1", img),
        ("bitmap", "--add", img, "b0"),
        ("amend", "-o", "refcount_bits=8", img),
    ):
        out = tapnbd(*args, check=False)
        assert says in out and "not supported" in out, (args, out)
        assert img.read_bytes() == before, args
