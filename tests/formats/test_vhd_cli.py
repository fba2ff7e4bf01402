"""``tapnbd create/info/convert/check`` on VHD, with qemu-img (-f vpc) and libvhdi as referees."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.formats.qcow_util import need, qemu_img
from tests.formats.vhd_util import bat, vhdimount
from tests.helpers import qemu_io, run, tapnbd_cmd

MiB = 1 << 20


def tapnbd(*args: str | Path, check: bool = True) -> str:
    return run(tapnbd_cmd(*map(str, args)), check=check).stdout


def qemu_info(img: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(qemu_img("info", "-f", "vpc", "--output=json", img))
    return out


@pytest.mark.parametrize(
    "opts",
    [(), ("--subformat", "fixed"), ("--cluster-size", "512K"), ("--format", "vpc")],
    ids=["dynamic", "fixed", "512K", "vpc-alias"],
)
def test_create_read_by_qemu(tmp_path: Path, opts: tuple[str, ...]) -> None:
    need("qemu-img", "qemu-io")
    img = tmp_path / "new.vhd"
    fmt = () if "--format" in opts else ("--format", "vhd")
    tapnbd("create", *fmt, "--size", "100M", *opts, img)
    info = qemu_info(img)
    assert info["virtual-size"] == 100 * MiB
    if "fixed" in opts:
        assert img.stat().st_size == 100 * MiB + 512
    else:
        want = 512 * 1024 if "512K" in opts else 2 * MiB
        assert info["cluster-size"] == want
    qemu_io(img, "write -P 0x61 1M 70k", "read -P 0x61 1M 70k", fmt="vpc")
    out = json.loads(tapnbd("info", "--format", "vhd", "--json", img))
    assert out["virtual-size"] == 100 * MiB
    data = out["format-specific"]["data"]
    assert data["disk-type"] == ("fixed" if "fixed" in opts else "dynamic")
    assert len(data["uuid"]) == 36
    assert run(tapnbd_cmd("check", "--format", "vhd", str(img)), check=False).returncode == 0


def test_info_of_a_chain(tmp_path: Path) -> None:
    base, top = tmp_path / "base.vhd", tmp_path / "top.vhd"
    tapnbd("create", "-f", "vhd", "-s", "16M", base)
    tapnbd("create", "-f", "vhd", "-b", "base.vhd", top)
    out = json.loads(tapnbd("info", "-f", "vhd", "--json", top))
    data = out["format-specific"]["data"]
    parent = out["backing-image"]["format-specific"]["data"]
    assert data["disk-type"] == "differencing"
    assert data["parent-uuid"] == parent["uuid"]
    assert out["backing-filename"] == "base.vhd"
    assert data["block-size"] == 2 * MiB
    text = tapnbd("info", "-f", "vhd", top)
    assert "disk type: differencing" in text and "backing file: base.vhd" in text
    # Probed, the child's parent is not followed (a probed header may be guest data).
    proc = run(tapnbd_cmd("info", str(top)), check=False)
    assert proc.returncode != 0 and "probed" in proc.stderr


def test_convert_to_vhd_and_back(tmp_path: Path, seed: int) -> None:
    need("qemu-img")
    print(f"seed {seed}")
    rng = random.Random(seed)
    src = tmp_path / "src.raw"
    data = bytearray(24 * MiB)
    for _ in range(20):
        off, n = rng.randrange(len(data) - 70000), rng.randrange(1, 70000)
        data[off : off + n] = rng.randbytes(n)
    src.write_bytes(bytes(data))
    vhd = tmp_path / "out.vhd"
    tapnbd("convert", "-q", "-O", "vpc", src, vhd)
    qemu_img("compare", "-f", "vpc", "-F", "raw", vhd, src)
    back = tmp_path / "back.raw"
    tapnbd("convert", "-q", "-f", "vhd", "-O", "raw", vhd, back)
    assert back.read_bytes() == bytes(data)
    # A qemu-made VHD converted to qcow2 by tapnbd.
    q = tmp_path / "q.vhd"
    qemu_img("create", "-f", "vpc", q, "16M")
    qemu_io(q, "write -P 0x5a 3M 1M", fmt="vpc")
    qc = tmp_path / "q.qcow2"
    tapnbd("convert", "-q", "-O", "qcow2", q, qc)
    qemu_img("compare", "-f", "vpc", "-F", "qcow2", q, qc)


def test_check_finds_corruption_and_leaks(tmp_path: Path) -> None:
    img = tmp_path / "c.vhd"
    tapnbd("create", "-f", "vhd", "-s", "16M", img)
    qemu_io(img, "write -P 1 0 4k", "write -P 2 4M 4k", fmt="vpc")
    assert run(tapnbd_cmd("check", str(img)), check=False).returncode == 0
    # A leaked block: space at the end that no BAT entry names (a crash's leftover).
    raw = bytearray(img.read_bytes())
    span = 2 * MiB + 512
    img.write_bytes(bytes(raw[:-512]) + bytes(span) + bytes(raw[-512:]))
    proc = run(tapnbd_cmd("check", "--json", str(img)), check=False)
    assert proc.returncode == 3, proc.stdout
    assert json.loads(proc.stdout)["leaks"] == 1
    # Two BAT entries naming the same block: corrupt (exit 2), the field named.
    entries = bat(img)
    toff = struct.unpack_from(">Q", raw, 512 + 16)[0]
    with open(img, "r+b") as f:
        f.seek(toff + 4)
        f.write(struct.pack(">I", entries[0]))
    proc = run(tapnbd_cmd("check", str(img)), check=False)
    assert proc.returncode == 2 and "BAT entry" in proc.stdout, proc.stdout


def test_cli_chain_read_by_libvhdi(tmp_path: Path) -> None:
    """create -b, written by qemu-io through tapnbd's file (raw over NBD is elsewhere)."""
    base, top = tmp_path / "base.vhd", tmp_path / "top.vhd"
    tapnbd("create", "-f", "vhd", "-s", "8M", base)
    qemu_io(base, "write -P 0x33 0 8M", fmt="vpc")
    tapnbd("create", "-f", "vhd", "-b", str(base), top)
    expected = tmp_path / "exp.raw"
    tapnbd("convert", "-q", "-f", "vhd", "-O", "raw", top, expected)
    assert expected.read_bytes() == b"\x33" * (8 * MiB)
    with vhdimount(top, tmp_path / "mnt") as view:
        assert view.read_bytes() == expected.read_bytes()


def test_info_says_a_probed_fixed_vhd_may_be_one(tmp_path: Path) -> None:
    img = tmp_path / "f.vhd"
    tapnbd("create", "-f", "vhd", "--subformat", "fixed", "-s", "8M", img)
    out = tapnbd("info", img)
    assert "file format: raw" in out and "give --format vhd" in out
    assert "give --format vhd" not in tapnbd("info", "-f", "vhd", img)
