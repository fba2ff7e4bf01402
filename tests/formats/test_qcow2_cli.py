"""``tapnbd create/info/convert/check`` on qcow2, with qemu-img as the referee."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.formats.qcow2_util import check_clean, make_image
from tests.formats.qcow_util import need, qemu_img
from tests.helpers import qemu_io, run, tapnbd_cmd


def tapnbd(*args: str | Path, check: bool = True) -> str:
    return run(tapnbd_cmd(*map(str, args)), check=check).stdout


def qemu_info(img: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(qemu_img("info", "--output=json", img))
    return out


@pytest.mark.parametrize(
    "opts",
    [
        (),
        ("--cluster-size", "512"),
        ("--cluster-size", "2M"),
        ("--preallocation", "metadata"),
        ("--preallocation", "falloc"),
        ("--preallocation", "full"),
    ],
    ids=["default", "512", "2M", "metadata", "falloc", "full"],
)
def test_create_passes_qemu_check(tmp_path: Path, opts: tuple[str, ...]) -> None:
    need("qemu-img", "qemu-io")
    img = tmp_path / "new.qcow2"
    tapnbd("create", "--format", "qcow2", "--size", "100M", *opts, img)
    check_clean(img)
    info = qemu_info(img)
    assert info["virtual-size"] == 100 << 20
    if opts[-1:] in (("falloc",), ("full",)):  # the data's space is reserved on disk
        assert info["actual-size"] >= 100 << 20
    elif opts[-1:] == ("metadata",):
        assert info["actual-size"] < 10 << 20
    assert info["cluster-size"] == {"512": 512, "2M": 2 << 20}.get(opts[-1] if opts else "", 65536)
    qemu_io(img, "write -P 0x61 1M 70k", "read -P 0x61 1M 70k", fmt="qcow2")
    check_clean(img)


@pytest.mark.parametrize(
    "opts",
    [
        "refcount_bits=1",
        "refcount_bits=2,lazy_refcounts=on",
        "refcount_bits=64,cluster_size=4k",
        "lazy_refcounts=on,compat=v3",
        "compat=0.10",
        "refcount_bits=8,preallocation=metadata",
    ],
)
def test_create_options_agree_with_qemu_img(tmp_path: Path, opts: str) -> None:
    """``create -o`` takes qemu-img's qcow2 creation options: both images report the
    same format-specific facts, pass qemu-img check, and stay clean once written."""
    need("qemu-img", "qemu-io")
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    tapnbd("create", "-f", "qcow2", "-o", opts, ours, "64M")  # the size where qemu-img has it
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, ref, "64M")
    got, want = qemu_info(ours), qemu_info(ref)
    for key in ("format-specific", "cluster-size", "virtual-size"):
        assert got[key] == want[key], key
    check_clean(ours)
    qemu_io(ours, "write -P 0x61 1M 300k", "read -P 0x61 1M 300k", fmt="qcow2")
    check_clean(ours)


def test_create_with_many_refcount_blocks_passes_qemu_check(tmp_path: Path) -> None:
    """512-byte clusters with 64-bit refcounts: 8 GiB needs a 2 MiB L1 table, so its
    refcounts take about 66 blocks and a two-cluster refcount table, which must count
    themselves too (refcount.covering)."""
    need("qemu-img", "qemu-io")
    img = tmp_path / "many.qcow2"
    tapnbd("create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", img, "8G")
    check_clean(img)
    with open(img, "rb") as f:
        head = f.read(64)
    assert struct.unpack(">I", head[56:60])[0] >= 2  # refcount_table_clusters
    qemu_io(img, "write -P 0x61 7G 300k", "read -P 0x61 7G 300k", fmt="qcow2")
    check_clean(img)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("-o", "compat=0.10,refcount_bits=8"), "refcount_bits other than 16 needs compat 1.1"),
        (("-o", "compat=0.10,lazy_refcounts=on"), "lazy_refcounts needs compat 1.1"),
        (("-o", "refcount_bits=3"), "power of two"),
        (("-o", "refcount_bits=128"), "power of two"),
        (("-o", "lazy_refcounts=maybe"), "lazy_refcounts=maybe"),
        (("-o", "compat=2"), "compat=2"),
        (("-o", "cluster_size=4k", "--cluster-size", "4k"), "both given"),
        (("-o", "subformat=fixed"), "-o subformat does not apply to a qcow2 image"),
        (("-o", "refcount_bits"), "expected key=value"),
        (("-o", "size=2M"), "-o size and --size are both given"),
    ],
)
def test_create_options_refused_by_name(tmp_path: Path, args: tuple[str, ...], says: str) -> None:
    img = tmp_path / "new.qcow2"
    r = run(tapnbd_cmd("create", "-f", "qcow2", "-s", "1M", *args, str(img)), check=False)
    assert r.returncode == 1 and says in r.stderr, r.stderr
    assert not img.exists()


def test_create_size_given_twice_is_refused(tmp_path: Path) -> None:
    img = tmp_path / "new.qcow2"
    r = run(tapnbd_cmd("create", "-f", "qcow2", "-s", "1M", str(img), "2M"), check=False)
    assert r.returncode == 1 and "the size is given twice" in r.stderr, r.stderr
    assert not img.exists()


def test_create_option_for_another_format_is_refused(tmp_path: Path) -> None:
    img = tmp_path / "new.qcow"
    r = run(
        tapnbd_cmd("create", "-f", "qcow", "-s", "1M", "-o", "lazy_refcounts=on", str(img)),
        check=False,
    )
    assert r.returncode == 1 and "-o lazy_refcounts does not apply to a qcow image" in r.stderr
    assert not img.exists()


def test_create_overlay_with_backing_format(tmp_path: Path) -> None:
    need("qemu-img")
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(3).randbytes(1 << 20))
    img = tmp_path / "top.qcow2"
    tapnbd("create", "--format", "qcow2", "--backing", "base.raw", "-F", "raw", img)
    info = qemu_info(img)
    assert info["backing-filename"] == "base.raw"
    assert info["backing-filename-format"] == "raw"
    assert info["virtual-size"] == 1 << 20
    qemu_img("compare", "-f", "qcow2", "-F", "raw", img, base)
    check_clean(img)


def test_info_json_keys_match_qemu(tmp_path: Path) -> None:
    img = make_image(tmp_path, "snapshot")
    ours = json.loads(tapnbd("info", "--json", img))
    theirs = qemu_info(img)
    for key in ("virtual-size", "cluster-size", "format", "dirty-flag"):
        assert ours[key] == theirs[key], key
    assert ours["format-specific"] == theirs["format-specific"]
    assert [s["name"] for s in ours["snapshots"]] == [s["name"] for s in theirs["snapshots"]]
    for ks, ts in zip(ours["snapshots"], theirs["snapshots"], strict=True):
        assert ks == ts
    text = tapnbd("info", img)
    assert "snap1" in text


def test_convert_both_ways(tmp_path: Path) -> None:
    need("qemu-img")
    src = make_image(tmp_path, "compressed")
    raw = tmp_path / "out.raw"
    tapnbd("convert", "-q", "-O", "raw", src, raw)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", src, raw)
    back = tmp_path / "back.qcow2"
    tapnbd("convert", "-q", "-O", "qcow2", raw, back)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", back, raw)
    check_clean(back)


@pytest.mark.parametrize(
    "opts", ["refcount_bits=1,cluster_size=4k", "compat=0.10,cluster_size=16k"]
)
def test_convert_options_agree_with_qemu_img(tmp_path: Path, opts: str) -> None:
    """``convert -O qcow2 -o`` lays out the new image as qemu-img convert does."""
    need("qemu-img")
    src = make_image(tmp_path, "compressed")
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    tapnbd("convert", "-q", "-O", "qcow2", "-o", opts, src, ours)
    qemu_img("convert", "-O", "qcow2", "-o", opts, src, ref)
    got, want = qemu_info(ours), qemu_info(ref)
    for key in ("format-specific", "cluster-size", "virtual-size"):
        assert got[key] == want[key], key
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours, src)
    check_clean(ours)


def test_convert_option_the_destination_lacks_is_refused(tmp_path: Path) -> None:
    src = make_image(tmp_path, "compressed")
    for fmt, opt in (
        ("raw", "cluster_size=4k"),
        ("qcow", "lazy_refcounts=on"),
        ("qcow2", "size=1M"),
    ):
        dst = tmp_path / f"out.{fmt}"
        r = run(tapnbd_cmd("convert", "-q", "-O", fmt, "-o", opt, str(src), str(dst)), check=False)
        key = opt.split("=")[0]
        assert r.returncode == 1 and f"-o {key} does not apply to a {fmt} image" in r.stderr
        assert not dst.exists()


def _refcount_block(img: Path) -> int:
    with open(img, "rb") as f:
        head = f.read(64)
        (rt,) = struct.unpack(">Q", head[48:56])
        f.seek(rt)
        (block,) = struct.unpack(">Q", f.read(8))
    return int(block)


def test_check_finds_leaks_and_refcount_errors(tmp_path: Path) -> None:
    need("qemu-img")
    img = tmp_path / "c.qcow2"
    tapnbd("create", "--format", "qcow2", "--size", "16M", img)
    qemu_io(img, "write -P 0x11 0 64k", fmt="qcow2")
    assert run(tapnbd_cmd("check", str(img)), check=False).returncode == 0
    block = _refcount_block(img)
    # Cluster 7 is unused (the file grows to 8 clusters): a refcount of 1 is a leak.
    with open(img, "r+b") as f:
        f.truncate(8 << 16)
        f.seek(block + 2 * 7)
        f.write(struct.pack(">H", 1))
    assert run(["qemu-img", "check", str(img)], check=False).returncode == 3
    proc = run(tapnbd_cmd("check", "--json", str(img)), check=False)
    assert proc.returncode == 3
    assert json.loads(proc.stdout)["leaks"] == 1
    # Cluster 0 (the header) at refcount 0 is a corruption.
    with open(img, "r+b") as f:
        f.seek(block)
        f.write(struct.pack(">H", 0))
    assert run(["qemu-img", "check", str(img)], check=False).returncode == 2
    proc = run(tapnbd_cmd("check", "--json", str(img)), check=False)
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["corruptions"] == 1


@pytest.mark.parametrize("cluster_size", ["512", "65536"])
def test_convert_compressed(tmp_path: Path, cluster_size: str) -> None:
    """convert -c: compressible clusters packed compressed, the rest written plain."""
    need("qemu-img")
    rng = random.Random(11)
    print("seed 11")
    raw = tmp_path / "src.raw"
    data = bytearray(3 << 20)
    for i in range(0, len(data) - 70000, 150000):
        if rng.random() < 0.5:
            data[i : i + 70000] = bytes([rng.randrange(256)]) * 70000  # compresses
        else:
            data[i : i + 70000] = rng.randbytes(70000)  # does not
    raw.write_bytes(bytes(data) + b"tail" * 384)  # no multiple of a 64K cluster
    out = tmp_path / "c.qcow2"
    tapnbd("convert", "-q", "-c", "-O", "qcow2", "--cluster-size", cluster_size, raw, out)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", out, raw)
    report = check_clean(out)
    assert isinstance(report["compressed-clusters"], int) and report["compressed-clusters"] > 0


def test_dirty_image_repaired_then_opens_writable(tmp_path: Path) -> None:
    """qemu with lazy refcounts killed mid-work leaves the dirty bit and missing
    refcounts: refused for writing, repaired by check --repair, then qemu finds it clean."""
    need("qemu-img", "qemu-io")
    img = tmp_path / "dirty.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "16M")
    run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 1M", "-c", "sigraise 9", str(img)],
        check=False,
    )
    assert qemu_info(img)["dirty-flag"] is True
    proc = run(tapnbd_cmd("serve", "--port", "0", str(img)), check=False, timeout=30)
    assert proc.returncode != 0 and "check --repair" in proc.stderr
    assert run(tapnbd_cmd("check", str(img)), check=False).returncode == 2
    proc = run(tapnbd_cmd("check", "--repair", str(img)), check=False)
    assert proc.returncode == 0, proc.stdout
    assert qemu_info(img)["dirty-flag"] is False
    check_clean(img)
    qemu_io(img, "read -P 0x42 0 1M", "write -P 0x43 2M 64k", fmt="qcow2")
    check_clean(img)


@pytest.mark.parametrize("out_fmt", ["qcow2", "qcow"])
def test_convert_onto_a_backing_file_writes_only_what_differs(tmp_path: Path, out_fmt: str) -> None:
    """convert -B: an overlay on the named base that reads as the source, holding only
    the blocks that read differently from the base (zeros over data as zero clusters on
    qcow2, written zeros on qcow); qemu-img convert -B's overlay reads the same."""
    need("qemu-img", "qemu-io")
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "8M")
    qemu_io(base, "write -P 1 0 8M", fmt="qcow2")
    src = tmp_path / "src.qcow2"
    qemu_img("convert", "-O", "qcow2", base, src)
    qemu_io(src, "write -P 2 1M 64k", "write -z 3M 128k", "write -P 3 5M 4k", fmt="qcow2")
    ours, ref = tmp_path / f"ours.{out_fmt}", tmp_path / f"ref.{out_fmt}"
    tapnbd("convert", "-q", "-O", out_fmt, "-B", "base.qcow2", "-F", "qcow2", src, ours)
    qemu_img("convert", "-O", out_fmt, "-B", "base.qcow2", "-F", "qcow2", src, ref)
    qemu_img("compare", "-F", "qcow2", ours, src)
    qemu_img("compare", ours, ref)
    info = qemu_info(ours)
    assert info["backing-filename"] == "base.qcow2"
    runs = json.loads(qemu_img("map", "--output=json", ours))
    mine = [(r["start"], r["length"], r["data"]) for r in runs if r["depth"] == 0]
    # 64 KiB at 5M: the one 64 KiB block the 4 KiB write changed. The zeros over the
    # base's data at 3M are a zero cluster on qcow2 (no data), written zeros on qcow.
    zeros_are_data = out_fmt == "qcow"
    want = [(1 << 20, 65536, True), (3 << 20, 131072, zeros_are_data), (5 << 20, 65536, True)]
    assert mine == want, mine
    if out_fmt == "qcow2":
        check_clean(ours)


@pytest.mark.parametrize("out_fmt", ["raw", "vhd"])
def test_convert_onto_a_backing_file_needs_qcow2_or_qcow(tmp_path: Path, out_fmt: str) -> None:
    src = make_image(tmp_path, "compressed")
    out = tmp_path / "o"
    r = run(
        tapnbd_cmd("convert", "-q", "-O", out_fmt, "-B", str(src), str(src), str(out)), check=False
    )
    assert r.returncode == 1 and "-B is for qcow2 and qcow" in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("target_fmt", ["raw", "qcow2", "vhd"])
def test_convert_into_an_existing_image_writes_its_zeros_too(
    tmp_path: Path, target_fmt: str
) -> None:
    """convert -n: the existing image, full of other data, reads exactly as the source
    afterwards (its holes and zero clusters included), in its own format."""
    need("qemu-img", "qemu-io")
    src = make_image(tmp_path, "zero-clusters")
    size = qemu_info(src)["virtual-size"]
    qemu_name = "vpc" if target_fmt == "vhd" else target_fmt
    tgt = tmp_path / f"tgt.{target_fmt}"
    qemu_img("create", "-q", "-f", qemu_name, tgt, str(size))
    qemu_io(tgt, f"write -P 0xee 0 {size}", fmt=qemu_name)
    tapnbd("convert", "-q", "-n", *(["-O", "vhd"] if target_fmt == "vhd" else []), src, tgt)
    qemu_img("compare", "-f", "qcow2", "-F", qemu_name, src, tgt)
    assert qemu_info(tgt)["format"] == qemu_name  # written into, not made anew


def test_convert_into_an_existing_image_refuses_a_small_one_and_creation_options(
    tmp_path: Path,
) -> None:
    src = make_image(tmp_path, "compressed")
    small = tmp_path / "small.raw"
    small.write_bytes(b"\x01" * 65536)
    r = run(tapnbd_cmd("convert", "-q", "-n", str(src), str(small)), check=False)
    assert r.returncode == 1 and "too small" in r.stderr, r.stderr
    assert small.read_bytes() == b"\x01" * 65536
    r = run(
        tapnbd_cmd("convert", "-q", "-n", "-o", "compat=1.1", str(src), str(small)), check=False
    )
    assert r.returncode == 1 and "-o, --cluster-size and -B do not apply" in r.stderr, r.stderr
    missing = tmp_path / "missing.qcow2"
    r = run(tapnbd_cmd("convert", "-q", "-n", str(src), str(missing)), check=False)
    assert r.returncode == 1 and "no such file" in r.stderr and not missing.exists(), r.stderr


def _leak_and_corruption(img: Path, corrupt: bool) -> None:
    """Cluster 7 at refcount 1 with nothing naming it (a leak); with ``corrupt``, the
    header's own refcount at 0 too (a corruption)."""
    tapnbd("create", "--format", "qcow2", "--size", "16M", img)
    qemu_io(img, "write -P 0x11 0 64k", fmt="qcow2")
    block = _refcount_block(img)
    with open(img, "r+b") as f:
        f.truncate(8 << 16)
        f.seek(block + 2 * 7)
        f.write(struct.pack(">H", 1))
        if corrupt:
            f.seek(block)
            f.write(struct.pack(">H", 0))


def test_check_r_leaks_and_r_all_as_qemu_img_spells_them(tmp_path: Path) -> None:
    """-r leaks lowers only refcounts above their references (qemu-img check -r leaks
    on a copy agrees), leaving a corruption for -r all."""
    need("qemu-img", "qemu-io")
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    _leak_and_corruption(ours, corrupt=False)
    shutil.copy(ours, ref)
    assert run(tapnbd_cmd("check", "-r", "leaks", str(ours)), check=False).returncode == 0
    qemu_img("check", "-r", "leaks", ref)
    assert ours.read_bytes() == ref.read_bytes()  # the same refcount written back
    both = tmp_path / "both.qcow2"
    _leak_and_corruption(both, corrupt=True)
    assert run(tapnbd_cmd("check", "-r", "leaks", str(both)), check=False).returncode == 2
    after = run(["qemu-img", "check", str(both)], check=False)
    assert after.returncode == 2 and "Leaked" not in after.stdout + after.stderr, after.stdout
    assert run(tapnbd_cmd("check", "-r", "all", str(both)), check=False).returncode == 0
    qemu_img("check", both)
    r = run(tapnbd_cmd("check", "-r", "some", str(both)), check=False)
    assert r.returncode == 1 and "use leaks or all" in r.stderr


def test_convert_takes_qemu_imgs_progress_flag(tmp_path: Path) -> None:
    src = make_image(tmp_path, "compressed")
    out = tmp_path / "out.qcow2"
    r = run(tapnbd_cmd("convert", "-p", "-O", "qcow2", str(src), str(out)))
    assert r.returncode == 0 and out.exists()
    qemu_img("compare", src, out)


@pytest.mark.parametrize(
    ("fmt", "size", "opts"),
    [
        ("raw", "512", ()),
        ("raw", "1536", ()),
        ("raw", "10M", ()),
        ("raw", "5T", ()),
        ("qcow2", "3P", ("-o", "cluster_size=2M")),
    ],
)
def test_info_prints_sizes_as_qemu_img_does(
    tmp_path: Path, fmt: str, size: str, opts: tuple[str, ...]
) -> None:
    """The human sizes of info and snapshot -l (tapnbd.cli._output.qemu_size): 3 PiB
    printed as "3.07e+03 TiB" before both used one formatter."""
    img = tmp_path / f"s.{fmt}"
    qemu_img("create", "-q", "-f", fmt, *opts, img, size)

    def line(out: str) -> str:
        return next(x for x in out.splitlines() if x.startswith("virtual size:"))

    assert line(tapnbd("info", "-f", fmt, img)) == line(qemu_img("info", "-f", fmt, img))
