"""The commands that change an image in place (``tapnbd rebase|commit|resize``), backing
names kept as given, and options refused where they do not apply: run as processes,
with qemu-img's own command on a copy of the same image as the referee (qemu-img
compare of the two results, qemu-img check clean), or qemu-io reading back where
qemu-img cannot handle QCOW v1.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.formats.qcow_util import data_bytes, need, patch, qemu_img, read_header
from tests.helpers import run, start_server, tapnbd_cmd

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("qemu-img", "qemu-io")


def tapnbd(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(tapnbd_cmd(*map(str, args)), check=check)


def qwrite(image: Path, fmt: str, *commands: str) -> None:
    """qemu-io writes (``write -P 1 0 1M``), without per-allocation syncs."""
    args: list[str] = ["qemu-io", "-f", fmt, "-t", "unsafe"]
    for c in commands:
        args += ["-c", c]
    run([*args, str(image)])


def qcreate(image: Path, fmt: str, size: int | None = None, *opts: str) -> Path:
    qemu_img("create", "-q", "-f", fmt, *opts, image, *([str(size)] if size else []))
    return image


def same(a: Path, b: Path, fa: str, fb: str) -> None:
    """qemu-img compare: equal guest contents (exit 0), else the assertion shows why."""
    qemu_img("compare", "-f", fa, "-F", fb, a, b)


def qinfo(image: Path, fmt: str) -> dict[str, object]:
    out = json.loads(qemu_img("info", "-f", fmt, "--output=json", image))
    assert isinstance(out, dict)
    return out


def snapshot(image: Path, fmt: str, out: Path) -> Path:
    """The image's guest contents as a raw file, read by qemu-img."""
    qemu_img("convert", "-f", fmt, "-O", "raw", image, out)
    return out


# Backing names kept as given (issue 16: create stored an absolute path).


@pytest.mark.parametrize("fmt", ["qcow", "qcow2"])
def test_create_keeps_a_relative_backing_name_and_the_chain_moves(tmp_path: Path, fmt: str) -> None:
    d = tmp_path / "a"
    (d / "sub").mkdir(parents=True)
    qcreate(d / "base.raw", "raw", 4 * MiB)
    qwrite(d / "base.raw", "raw", "write -P 7 0 4M")
    tapnbd("create", "-f", fmt, d / "sub/o", "-b", "../base.raw", "-F", "raw")
    qcreate(d / "sub/q", fmt, None, "-b", "../base.raw", "-F", "raw")
    ours, theirs = qinfo(d / "sub/o", fmt), qinfo(d / "sub/q", fmt)
    assert ours["backing-filename"] == theirs["backing-filename"] == "../base.raw"
    assert ours["full-backing-filename"] == theirs["full-backing-filename"]
    moved = tmp_path / "b"
    shutil.move(d, moved)
    # Still opens, through qemu and through tapnbd, and reads the base's bytes.
    run(["qemu-io", "-f", fmt, "-c", "read -P 7 0 4M", str(moved / "sub/o")])
    out = json.loads(tapnbd("info", "-f", fmt, "-F", "raw", "--json", moved / "sub/o").stdout)
    assert out["backing-filename"] == "../base.raw"


# Options that do not apply are refused, naming the option.


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["-f", "qcow", "-b", "BASE", "-F", "raw", "--optimise"], "--optimise"),
        (["-f", "raw", "-s", "1M", "--cluster-size", "64K"], "--cluster-size"),
        (["-f", "qcow", "-s", "1M", "--preallocation", "full"], "--preallocation"),
        (["-f", "vhd", "-s", "1M", "--preallocation", "metadata"], "--preallocation"),
        (["-f", "qcow2", "-s", "1M", "--reserve"], "--reserve"),
        (["-f", "qcow2", "-s", "1M", "--subformat", "fixed"], "--subformat"),
        (["-f", "raw", "-s", "1M", "--no-optimise"], "--no-optimise"),
        (["-f", "raw", "-s", "1M", "-b", "BASE"], "--backing"),
        (["-f", "qcow2", "-s", "1M", "-F", "raw"], "--backing-format"),
    ],
)
def test_create_refuses_options_that_do_not_apply(
    tmp_path: Path, args: list[str], flag: str
) -> None:
    base = qcreate(tmp_path / "base.raw", "raw", MiB)
    image = tmp_path / "img"
    proc = tapnbd("create", image, *[str(base) if a == "BASE" else a for a in args], check=False)
    assert proc.returncode == 1, proc.stderr
    assert flag in proc.stderr
    assert not image.exists()


def test_convert_refuses_compression_for_a_format_without_it(tmp_path: Path) -> None:
    src = qcreate(tmp_path / "s.raw", "raw", MiB)
    proc = tapnbd("convert", "-q", "-O", "qcow", "-c", src, tmp_path / "d", check=False)
    assert proc.returncode == 1
    assert "(-c)" in proc.stderr


# rebase


def _chain(tmp_path: Path, fmt: str) -> tuple[Path, Path]:
    """base (1s everywhere) <- overlay (3s at 3M), and a new base (2s at 1M-2M)."""
    base = qcreate(tmp_path / "base.qcow2", "qcow2", 4 * MiB)
    qwrite(base, "qcow2", "write -P 1 0 4M")
    new = qcreate(tmp_path / "new.qcow2", "qcow2", 4 * MiB)
    qwrite(new, "qcow2", "write -P 1 0 1M", "write -P 2 1M 1M")
    top = tmp_path / f"o.{fmt}"
    tapnbd("create", "-f", fmt, top, "-b", "base.qcow2", "-F", "qcow2")
    qwrite(top, fmt, "write -P 3 3M 64k", "write -P 4 2500k 4k")
    return top, new


def test_rebase_qcow2_matches_qemu_img(tmp_path: Path) -> None:
    top, _new = _chain(tmp_path, "qcow2")
    ref = tmp_path / "ref.qcow2"
    shutil.copy(top, ref)
    tapnbd("rebase", "-f", "qcow2", top, "-b", "new.qcow2", "-F", "qcow2")
    qemu_img("rebase", "-f", "qcow2", ref, "-b", "new.qcow2", "-F", "qcow2")
    same(top, ref, "qcow2", "qcow2")
    ours = qinfo(top, "qcow2")
    assert ours["backing-filename"] == "new.qcow2"
    assert ours["backing-filename-format"] == "qcow2"
    qemu_img("check", "-f", "qcow2", top)
    # And standalone: -b "".
    tapnbd("rebase", "-f", "qcow2", top, "-b", "")
    qemu_img("rebase", "-f", "qcow2", ref, "-b", "")
    same(top, ref, "qcow2", "qcow2")
    assert "backing-filename" not in qinfo(top, "qcow2")
    qemu_img("check", "-f", "qcow2", top)


def test_rebase_unsafe_changes_the_name_only(tmp_path: Path) -> None:
    top, _new = _chain(tmp_path, "qcow2")
    ref = tmp_path / "ref.qcow2"
    shutil.copy(top, ref)
    tapnbd("rebase", "-u", "-f", "qcow2", top, "-b", "new.qcow2", "-F", "qcow2")
    qemu_img("rebase", "-u", "-f", "qcow2", ref, "-b", "new.qcow2", "-F", "qcow2")
    same(top, ref, "qcow2", "qcow2")
    # The name only: what shows through is now the new base's (2s at 1M).
    run(["qemu-io", "-f", "qcow2", "-c", "read -P 2 1M 1M", str(top)])


def test_rebase_qcow_v1_keeps_what_the_guest_reads(tmp_path: Path) -> None:
    top, _new = _chain(tmp_path, "qcow")
    before = snapshot(top, "qcow", tmp_path / "before.raw")
    tapnbd("rebase", "-f", "qcow", top, "-b", "new.qcow2", "-F", "qcow2")
    assert qinfo(top, "qcow")["backing-filename"] == "new.qcow2"
    same(top, before, "qcow", "raw")  # qemu-img rebase cannot change a QCOW v1 name
    tapnbd("check", top)
    tapnbd("rebase", "-f", "qcow", top, "-b", "")
    assert "backing-filename" not in qinfo(top, "qcow")
    same(top, before, "qcow", "raw")
    # Standalone again, blktap's extension is honoured: its checksum was recomputed.
    out = json.loads(tapnbd("check", "--json", top).stdout)
    assert (out["exit-code"], out["cksum"]) == (0, "ok")


@pytest.mark.parametrize(
    ("served", "command"),
    [
        ("o.qcow2", ["rebase", "-f", "qcow2", "o.qcow2", "-b", "new.qcow2"]),
        ("o.qcow2", ["commit", "-f", "qcow2", "o.qcow2"]),
        ("base.qcow2", ["commit", "-f", "qcow2", "o.qcow2"]),
        ("o.qcow2", ["resize", "-f", "qcow2", "o.qcow2", "+1M"]),
        ("o.qcow2", ["amend", "-f", "qcow2", "-o", "lazy_refcounts=on", "o.qcow2"]),
        ("o.qcow", ["check", "--repair", "o.qcow"]),
    ],
)
def test_a_changing_command_refuses_an_image_in_use_and_leaves_it(
    tmp_path: Path, served: str, command: list[str]
) -> None:
    _chain(tmp_path, "qcow2")
    if served == "o.qcow":
        tapnbd("create", tmp_path / "o.qcow", "-s", "1M")
    images = sorted(tmp_path.iterdir())
    before = {p: p.read_bytes() for p in images}
    fmt = served.rsplit(".", 1)[1]
    server = start_server([str(tmp_path / served), "--format", fmt], tmp_path / "serve.log")
    try:
        args = [str(tmp_path / a) if (tmp_path / a).exists() else a for a in command]
        proc = tapnbd(*args, check=False)
    finally:
        server.stop()
    assert proc.returncode == 1
    assert "in use" in proc.stderr
    assert {p: p.read_bytes() for p in images} == before


def test_rebase_vhd_differencing_disk(tmp_path: Path) -> None:
    """qemu has no differencing VHDs: tapnbd serve writes, tapnbd convert reads back
    (an open checks the parent's UUID against the child's header)."""
    base, new = tmp_path / "base.vhd", tmp_path / "new.vhd"
    for image, pattern in ((base, "write -P 1 0 8M"), (new, "write -P 2 2M 2M")):
        tapnbd("create", "-f", "vhd", image, "-s", "8M")
        qwrite(image, "vpc", pattern)
    top = tmp_path / "o.vhd"
    tapnbd("create", "-f", "vhd", top, "-b", base.name)
    server = start_server([str(top), "--format", "vhd"], tmp_path / "serve.log")
    try:
        run(["qemu-io", "-f", "raw", "-c", "write -P 5 1M 100k", server.uri])
    finally:
        assert server.stop() == 0
    before, after = tmp_path / "before.raw", tmp_path / "after.raw"
    tapnbd("convert", "-q", "-f", "vhd", "-O", "raw", top, before)
    tapnbd("rebase", "-f", "vhd", top, "-b", new.name)
    tapnbd("convert", "-q", "-f", "vhd", "-O", "raw", top, after)
    assert after.read_bytes() == before.read_bytes()
    out = json.loads(tapnbd("info", "--json", "-f", "vhd", top).stdout)
    assert out["backing-filename"] == "new.vhd"
    tapnbd("check", top)
    # Standalone, or a name longer than the locator's space: refused, nothing changed.
    deep = tmp_path / ("d" * 200) / ("e" * 200) / ("f" * 200)
    deep.mkdir(parents=True)
    shutil.copy(new, deep / "new.vhd")
    was = top.read_bytes()
    for name, message in (("", "standalone"), (str(deep / "new.vhd"), "does not fit")):
        proc = tapnbd("rebase", "-u", "-f", "vhd", top, "-b", name, check=False)
        assert proc.returncode == 1
        assert message in proc.stderr
        assert top.read_bytes() == was


def test_rebase_refuses_names_too_long_for_qcow_v1(tmp_path: Path) -> None:
    # qemu-img puts a QCOW v1 L1 table right after the name: no room for a longer one.
    raw = qcreate(tmp_path / "r", "raw", MiB)
    q = qcreate(tmp_path / "q.qcow", "qcow", None, "-b", raw.name, "-F", "raw")
    before = q.read_bytes()
    long_name = "x" * 40 + ".raw"
    shutil.copy(raw, tmp_path / long_name)
    proc = tapnbd("rebase", "-u", "-f", "qcow", q, "-b", long_name, "-F", "raw", check=False)
    assert proc.returncode == 1
    assert "does not fit" in proc.stderr
    assert q.read_bytes() == before


# commit


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("fmt", ["qcow2", "qcow"])
def test_commit_matches_qemu_img(tmp_path: Path, fmt: str, keep: bool) -> None:
    images = {}
    for who in ("ours", "ref"):
        d = tmp_path / who
        d.mkdir()
        base = qcreate(d / "base.raw", "raw", 4 * MiB)
        qwrite(base, "raw", "write -P 1 0 4M")
        top = qcreate(d / "top", fmt, None, "-b", "base.raw", "-F", "raw")
        qwrite(top, fmt, "write -P 5 1M 100k", "write -z 3M 64k", "write -P 6 4000k 96k")
        images[who] = (base, top)
    flags = ["-d"] if keep else []
    tapnbd("commit", "-q", "-f", fmt, *flags, images["ours"][1])
    qemu_img("commit", "-q", "-f", fmt, *flags, images["ref"][1])
    same(images["ours"][0], images["ref"][0], "raw", "raw")
    same(images["ours"][1], images["ref"][1], fmt, fmt)
    alloc = json.loads(qemu_img("map", "-f", fmt, "--output=json", images["ours"][1]))
    in_top = [e for e in alloc if e["depth"] == 0 and e["data"]]
    assert bool(in_top) == keep  # emptied unless -d
    if fmt == "qcow2":
        qemu_img("check", "-f", "qcow2", images["ours"][1])


def test_commit_empties_an_overlay_with_internal_snapshots_and_keeps_them(
    tmp_path: Path,
) -> None:
    """The overlay is emptied in place, as qemu-img commit does: its snapshot keeps the
    clusters it shares and reads as before, and both images match qemu-img's."""
    images = {}
    for who in ("ours", "ref"):
        d = tmp_path / who
        d.mkdir()
        base = qcreate(d / "base.raw", "raw", 4 * MiB)
        qwrite(base, "raw", "write -P 1 0 4M")
        top = qcreate(d / "top.qcow2", "qcow2", None, "-b", "base.raw", "-F", "raw")
        qwrite(top, "qcow2", "write -P 5 1M 64k")
        qemu_img("snapshot", "-c", "s1", top)
        qwrite(top, "qcow2", "write -P 6 2M 64k", "write -P 7 1M 4k")
        images[who] = (base, top)
    before = snapshot(images["ours"][1], "qcow2", tmp_path / "before.raw")
    tapnbd("commit", "-q", "-f", "qcow2", images["ours"][1])
    qemu_img("commit", "-q", "-f", "qcow2", images["ref"][1])
    same(images["ours"][0], images["ref"][0], "raw", "raw")
    same(images["ours"][0], before, "raw", "raw")  # the base now holds what the top read
    same(images["ours"][1], images["ref"][1], "qcow2", "qcow2")
    top = images["ours"][1]
    snaps = qinfo(top, "qcow2")["snapshots"]
    assert isinstance(snaps, list) and [s["name"] for s in snaps] == ["s1"]
    for who in ("ours", "ref"):
        qemu_img(
            "convert", "-l", "snapshot.name=s1", "-O", "raw", images[who][1], tmp_path / who / "s1"
        )
    same(tmp_path / "ours" / "s1", tmp_path / "ref" / "s1", "raw", "raw")
    alloc = json.loads(qemu_img("map", "-f", "qcow2", "--output=json", top))
    assert not [e for e in alloc if e["depth"] == 0 and e["data"]]  # emptied
    qemu_img("check", "-f", "qcow2", top)


def test_commit_keeps_the_qcow2_overlays_options(tmp_path: Path) -> None:
    """Emptying keeps what qemu-img commit keeps: the refcount width, lazy refcounts,
    the cluster size and version (it used to make the overlay anew with defaults)."""
    base = qcreate(tmp_path / "base.raw", "raw", 4 * MiB)
    qwrite(base, "raw", "write -P 1 0 4M")
    opts = "refcount_bits=8,lazy_refcounts=on,cluster_size=4k"
    top = qcreate(tmp_path / "top.qcow2", "qcow2", None, "-b", "base.raw", "-F", "raw", "-o", opts)
    qwrite(top, "qcow2", "write -P 5 1M 100k", "write -z 3M 64k")
    want = qinfo(top, "qcow2")
    tapnbd("commit", "-q", "-f", "qcow2", top)
    got = qinfo(top, "qcow2")
    for key in ("format-specific", "cluster-size", "backing-filename", "backing-filename-format"):
        assert got[key] == want[key], key
    qemu_img("check", "-f", "qcow2", top)
    same(top, base, "qcow2", "raw")


def test_commit_into_a_deeper_base(tmp_path: Path) -> None:
    images = {}
    for who in ("ours", "ref"):
        d = tmp_path / who
        d.mkdir()
        base = qcreate(d / "base.qcow2", "qcow2", 4 * MiB)
        qwrite(base, "qcow2", "write -P 1 0 4M")
        mid = qcreate(d / "mid.qcow2", "qcow2", None, "-b", "base.qcow2", "-F", "qcow2")
        qwrite(mid, "qcow2", "write -P 2 0 1M")
        top = qcreate(d / "top.qcow2", "qcow2", None, "-b", "mid.qcow2", "-F", "qcow2")
        qwrite(top, "qcow2", "write -P 3 512k 1M")
        images[who] = (base, top)
    ours, ref = images["ours"], images["ref"]
    tapnbd("commit", "-q", "-f", "qcow2", "-b", ours[0], ours[1])
    qemu_img("commit", "-q", "-f", "qcow2", "-b", ref[0], ref[1])
    same(ours[0], ref[0], "qcow2", "qcow2")
    same(ours[1], ref[1], "qcow2", "qcow2")
    qemu_img("check", "-f", "qcow2", ours[0])


# resize


@pytest.mark.parametrize(
    ("fmt", "steps"),
    [
        ("raw", ["+3M", "--shrink -3500K", "5M"]),
        # 1536M needs three L1 entries of 512 MiB: the table grows in its cluster.
        ("qcow2", ["+3M", "--shrink -3500K", "5M", "1536M", "--shrink 1M"]),
    ],
)
def test_resize_matches_qemu_img(tmp_path: Path, fmt: str, steps: list[str]) -> None:
    ours = qcreate(tmp_path / "ours", fmt, MiB)
    qwrite(ours, fmt, "write -P 7 0 1M")
    ref = tmp_path / "ref"
    shutil.copy(ours, ref)
    for step in steps:
        *flags, size = step.split()
        tapnbd("resize", "-q", "-f", fmt, *flags, ours, size)
        qemu_img("resize", "-q", "-f", fmt, *flags, ref, "--", size)
        assert qinfo(ours, fmt)["virtual-size"] == qinfo(ref, fmt)["virtual-size"]
        same(ours, ref, fmt, fmt)
        if fmt == "qcow2":
            qemu_img("check", "-f", "qcow2", ours)


def _map(image: Path, fmt: str) -> list[tuple[int, int, bool, bool]]:
    """(start, length, present, data) of each run, as qemu-img map says (a raw file's
    holes are found with SEEK_DATA)."""
    out = json.loads(qemu_img("map", "--output=json", "-f", fmt, image))
    return [(e["start"], e["length"], e["present"], e["data"]) for e in out]


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_resize_preallocates_only_the_grown_range_of_a_qcow2(tmp_path: Path, mode: str) -> None:
    ours = qcreate(tmp_path / "ours", "qcow2", MiB)
    ref = tmp_path / "ref"
    shutil.copy(ours, ref)
    tapnbd("resize", "-q", "-f", "qcow2", f"--preallocation={mode}", ours, "+2M")
    qemu_img("resize", "-q", "-f", "qcow2", f"--preallocation={mode}", ref, "+2M")
    assert _map(ours, "qcow2") == _map(ref, "qcow2")  # old: a hole; new: allocated
    assert _map(ours, "qcow2")[0] == (0, MiB, False, False)
    qemu_img("check", "-f", "qcow2", ours)
    same(ours, ref, "qcow2", "qcow2")
    if mode != "metadata":  # the space is there: reserved or written
        assert os.stat(ours).st_blocks * 512 >= 2 * MiB


@pytest.mark.parametrize("mode", ["falloc", "full"])
def test_resize_preallocates_the_grown_range_of_a_raw_file(tmp_path: Path, mode: str) -> None:
    ours = qcreate(tmp_path / "ours.raw", "raw", MiB)
    tapnbd("resize", "-q", "-f", "raw", f"--preallocation={mode}", ours, "+2M")
    assert os.path.getsize(ours) == 3 * MiB
    assert os.stat(ours).st_blocks * 512 >= 2 * MiB
    if mode == "full":  # written zeros are data to SEEK_DATA; fallocated ones are not
        assert data_bytes(ours, "raw", MiB) == 2 * MiB


@pytest.mark.parametrize(
    ("fmt", "args", "says"),
    [
        ("raw", ["--preallocation=metadata", "+1M"], "metadata is for qcow2"),
        ("qcow2", ["--preallocation=full", "--shrink", "-512K"], "is for growing"),
        ("qcow", ["--preallocation=full", "+1M"], "for raw and qcow2"),
        ("qcow2", ["--preallocation=some", "+1M"], "use off, metadata, falloc, full"),
    ],
)
def test_resize_preallocation_refusals(
    tmp_path: Path, fmt: str, args: list[str], says: str
) -> None:
    image = qcreate(tmp_path / "i", fmt, MiB)
    before = image.read_bytes()
    proc = tapnbd("resize", "-f", fmt, image, *args, check=False)
    assert proc.returncode == 1 and says in proc.stderr, proc.stderr
    assert image.read_bytes() == before


def test_resize_refuses_to_shrink_without_the_flag_or_with_snapshots(tmp_path: Path) -> None:
    image = qcreate(tmp_path / "i.qcow2", "qcow2", 4 * MiB)
    qwrite(image, "qcow2", "write -P 1 0 4M")
    before = image.read_bytes()
    proc = tapnbd("resize", "-f", "qcow2", image, "-1M", check=False)
    assert proc.returncode == 1
    assert "--shrink" in proc.stderr
    assert image.read_bytes() == before
    qemu_img("snapshot", "-c", "s1", image)
    before = image.read_bytes()
    proc = tapnbd("resize", "--shrink", "-f", "qcow2", image, "-1M", check=False)
    assert proc.returncode == 1
    assert "snapshots" in proc.stderr
    assert image.read_bytes() == before


def test_resize_grown_overlay_hides_a_larger_backing_file(tmp_path: Path) -> None:
    base = qcreate(tmp_path / "base.raw", "raw", 4 * MiB)
    qwrite(base, "raw", "write -P 1 0 4M")
    ours = qcreate(tmp_path / "o.qcow2", "qcow2", MiB, "-b", "base.raw", "-F", "raw")
    ref = tmp_path / "ref.qcow2"
    shutil.copy(ours, ref)
    tapnbd("resize", "-q", "-f", "qcow2", ours, "3M")
    qemu_img("resize", "-q", "-f", "qcow2", ref, "3M")
    same(ours, ref, "qcow2", "qcow2")
    run(["qemu-io", "-f", "qcow2", "-c", "read -P 1 0 1M", "-c", "read -P 0 1M 2M", str(ours)])


def test_resize_grows_a_qcow_v1_image_in_place(tmp_path: Path) -> None:
    image = tmp_path / "v.qcow"
    tapnbd("create", image, "-s", "1M")
    qwrite(image, "qcow", "write -P 7 0 1M")
    tapnbd("resize", "-q", image, "64M")
    assert qinfo(image, "qcow")["virtual-size"] == 64 * MiB
    run(["qemu-io", "-f", "qcow", "-c", "read -P 7 0 1M", "-c", "read -P 0 1M 63M", str(image)])
    qwrite(image, "qcow", "write -P 8 60M 1M")
    run(["qemu-io", "-f", "qcow", "-c", "read -P 8 60M 1M", str(image)])
    # The L1 table cannot grow past the first data cluster; and no shrinking.
    before = image.read_bytes()
    for size, message in (("5G", "the L1 table can grow to"), ("--shrink 32M", "cannot shrink")):
        *flags, value = size.split()
        proc = tapnbd("resize", *flags, image, value, check=False)
        assert proc.returncode == 1
        assert message in proc.stderr
        assert image.read_bytes() == before


def test_resize_grows_a_dynamic_vhd_in_place(tmp_path: Path) -> None:
    """qemu-img cannot resize a VHD: it is the reader (virtual size, contents)."""
    image = tmp_path / "d.vhd"
    tapnbd("create", "-f", "vhd", image, "-s", "8M")
    qwrite(image, "vpc", "write -P 3 0 8M")
    orig = tmp_path / "orig.vhd"
    shutil.copy(image, orig)
    tapnbd("resize", "-q", "-f", "vhd", image, "100M")
    assert qinfo(image, "vpc")["virtual-size"] == 100 * MiB
    same(image, orig, "vpc", "vpc")  # equal, and the grown part reads as zeros
    qwrite(image, "vpc", "write -P 4 90M 1M")
    run(["qemu-io", "-f", "vpc", "-c", "read -P 4 90M 1M", "-c", "read -P 3 0 8M", str(image)])
    tapnbd("check", image)
    # 2 MiB blocks: the table's sector holds 128 entries, 256 MiB; and no shrinking.
    before = image.read_bytes()
    for size, message in (("1G", "the table can grow to 128"), ("--shrink 50M", "cannot shrink")):
        *flags, value = size.split()
        proc = tapnbd("resize", "-f", "vhd", *flags, image, value, check=False)
        assert proc.returncode == 1
        assert message in proc.stderr
        assert image.read_bytes() == before


# check --repair


def _kill9_after_writes(tmp_path: Path, image: Path, fmt: str) -> None:
    """Serve ``image``, write through qemu-io (each write answered), then kill -9."""
    server = start_server([str(image), "--format", fmt], tmp_path / "serve.log")
    try:
        run(
            [
                "qemu-io",
                "-f",
                "raw",
                "-c",
                "write -P 9 0 3M",
                "-c",
                "write -P 8 20M 1M",
                "-c",
                "write -z 1M 64k",
                server.uri,
            ]
        )
    finally:
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL


def test_repair_qcow_after_kill9_fixes_the_checksum(tmp_path: Path) -> None:
    image = tmp_path / "k.qcow"
    tapnbd("create", image, "-s", "64M")  # allocation-optimised: the fast path
    _kill9_after_writes(tmp_path, image, "qcow")
    assert tapnbd("check", image, check=False).returncode == 4  # checksum left stale
    copy = tmp_path / "copy.qcow"
    shutil.copy(image, copy)
    proc = tapnbd("check", "--repair", image)
    assert "repaired" in proc.stdout
    out = json.loads(tapnbd("check", "--json", image).stdout)
    assert (out["exit-code"], out["cksum"]) == (0, "ok")
    same(image, copy, "qcow", "qcow")
    run(["qemu-io", "-f", "qcow", "-c", "read -P 9 0 1M", "-c", "read -P 8 20M 1M", str(image)])


def test_repair_qcow_frees_leaked_clusters(tmp_path: Path) -> None:
    """Leaks at the end (cut off) and in the middle (punched out), as a crash between
    an allocation and its table write leaves them."""
    image = tmp_path / "l.qcow"
    tapnbd("create", image, "-s", "8M", "--no-optimise", "--cluster-size", "4K")
    qwrite(image, "qcow", "write -P 5 0 1M", "write -P 6 4M 64k")
    h = read_header(image)
    # Unhook the L2 entry of the first data cluster of the 4M write: a leak in the middle.
    l1 = image.read_bytes()[h.l1_table_offset : h.l1_table_offset + 8 * 4]
    l2off = int.from_bytes(l1[8 * (4 * MiB >> (h.cluster_bits + h.l2_bits)) :][:8], "big")
    entry = l2off + 8 * ((4 * MiB >> h.cluster_bits) & ((1 << h.l2_bits) - 1))
    patch(image, entry, bytes(8))
    with open(image, "ab") as f:  # clusters the file grew by, never referenced
        f.write(b"\x01" * 3 * 4096)
    out = json.loads(tapnbd("check", "--json", image, check=False).stdout)
    assert (out["exit-code"], out["leaks"]) == (3, 4)
    copy = tmp_path / "copy.qcow"
    shutil.copy(image, copy)
    size = image.stat().st_size
    tapnbd("check", "--repair", image)
    out = json.loads(tapnbd("check", "--json", image).stdout)
    assert (out["exit-code"], out["leaks"]) == (0, 0)
    assert image.stat().st_size == size - 3 * 4096
    same(image, copy, "qcow", "qcow")
    # The space is used again: a new L2 table and cluster land where the leak was.
    qwrite(image, "qcow", "write -P 7 6M 4k")
    assert image.stat().st_size == size - 4096
    tapnbd("check", image)


def test_repair_qcow_with_a_backing_name_that_is_no_file(tmp_path: Path) -> None:
    """An NBD URI as the backing name is not a missing file: check says so and goes on,
    and --repair frees the leaks on the image alone, never reaching for the server
    (nothing listens there)."""
    image = tmp_path / "r.qcow"
    uri = f"nbd+unix:///?socket={tmp_path / 'none.sock'}"
    tapnbd("create", "-u", "-b", uri, "-F", "raw", "-s", "8M", "--cluster-size", "4K", image)
    header = image.read_bytes()
    with open(image, "ab") as f:  # clusters the file grew by, never referenced
        f.write(b"\x01" * 2 * 4096)
    out = json.loads(tapnbd("check", "--json", image, check=False).stdout)
    assert (out["exit-code"], out["leaks"], out["check-errors"]) == (3, 2, 0), out
    assert f"backing file {uri!r} is not a local file" in out["messages"], out
    proc = tapnbd("check", "--repair", image)
    assert "repaired: 2 leaked clusters freed" in proc.stdout, proc.stdout
    out = json.loads(tapnbd("check", "--json", image).stdout)
    assert (out["exit-code"], out["leaks"]) == (0, 0), out
    assert image.read_bytes() == header


def test_repair_qcow2_after_kill9_agrees_with_qemu_img(tmp_path: Path) -> None:
    image = tmp_path / "k.qcow2"
    tapnbd("create", "-f", "qcow2", image, "-s", "64M")
    _kill9_after_writes(tmp_path, image, "qcow2")
    assert tapnbd("check", image, check=False).returncode in (0, 3)
    copy = tmp_path / "copy.qcow2"
    shutil.copy(image, copy)
    tapnbd("check", "--repair", image)
    tapnbd("check", image)
    qemu_img("check", "-f", "qcow2", image)
    same(image, copy, "qcow2", "qcow2")


def test_repair_refuses_vhd(tmp_path: Path) -> None:
    image = tmp_path / "d.vhd"
    tapnbd("create", "-f", "vhd", image, "-s", "4M")
    proc = tapnbd("check", "--repair", image, check=False)
    assert proc.returncode == 1
    assert "--repair" in proc.stderr


# info on damaged images: the header and a warning, exit 0, as qemu-img info


@pytest.mark.parametrize("fmt", ["qcow", "qcow2", "vhd"])
def test_info_of_an_overlay_whose_backing_file_is_missing(tmp_path: Path, fmt: str) -> None:
    base = qcreate(tmp_path / "base", "vpc" if fmt == "vhd" else "raw", MiB)
    image = tmp_path / "o"
    extra = [] if fmt == "vhd" else ["-F", "raw"]
    tapnbd("create", "-f", fmt, image, "-b", "base", *extra)
    whole = json.loads(tapnbd("info", "--json", "-f", fmt, *extra, image).stdout)
    base.unlink()
    qfmt = "vpc" if fmt == "vhd" else fmt
    assert subprocess.run(["qemu-img", "info", "-f", qfmt, image]).returncode == 0
    proc = tapnbd("info", "-f", fmt, image)
    assert proc.stderr.startswith("warning:") and "the backing chain is not shown" in proc.stderr
    assert "backing file: base" in proc.stdout
    out = json.loads(tapnbd("info", "--json", "-f", fmt, image).stdout)
    assert out["virtual-size"] == whole["virtual-size"]
    assert out["backing-filename"] == whole["backing-filename"]
    assert "full-backing-filename" not in out


def test_info_of_a_qcow_with_a_bad_l1_entry(tmp_path: Path) -> None:
    image = tmp_path / "g.qcow"
    tapnbd("create", image, "-s", "64M")
    qwrite(image, "qcow", "write -P 1 0 3M")
    h = read_header(image)
    patch(image, h.l1_table_offset + 8, (0x7FFFFFFF000).to_bytes(8, "big"))
    assert subprocess.run(["qemu-img", "info", "-f", "qcow", image]).returncode == 0
    proc = tapnbd("info", image)
    assert "L1 entry 1 (0x7fffffff000) points past the end of the file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "virtual size: 64 MiB" in proc.stdout
    # The entry is left out, the rest is counted: the first 2 MiB extent only.
    out = json.loads(tapnbd("info", "--json", image).stdout)
    assert out["allocated-size"] == 2 * MiB
    # A refused chain is not damage: info still fails on a probed overlay (issue 11).
    over = tmp_path / "over.qcow"
    tapnbd("create", over, "-b", qcreate(tmp_path / "b.raw", "raw", MiB), "-F", "raw")
    proc = tapnbd("info", over, check=False)
    assert proc.returncode == 1 and "was probed, not given" in proc.stderr


def test_info_of_a_qcow2_with_bad_l1_entries(tmp_path: Path) -> None:
    """qemu-img info shows a qcow2 whose L1 table names L2 tables past the end (exit 0);
    so does tapnbd, with one warning line, the bad entries read as holes."""
    image = qcreate(tmp_path / "g.qcow2", "qcow2", 4096 * MiB)
    qwrite(image, "qcow2", "write -P 1 0 1M", "write -P 2 1G 1M", "write -P 3 2G 1M")
    l1 = int.from_bytes(image.read_bytes()[40:48], "big")  # l1_table_offset
    for i in (2, 4):  # 64 KiB clusters: an L2 table maps 512 MiB
        patch(image, l1 + 8 * i, (0x7FFFFFF0000).to_bytes(8, "big"))
    assert subprocess.run(["qemu-img", "info", "-f", "qcow2", image]).returncode == 0
    proc = tapnbd("info", image)
    assert proc.stderr.strip().splitlines() == [
        f"warning: {image}: L1 entry 2 (0x7ffffff0000) points past the end of the file "
        f"({image.stat().st_size} bytes) (and 1 more); bad L1 entries are left out "
        "(they read as holes)"
    ], proc.stderr
    assert "virtual size: 4 GiB" in proc.stdout
    out = json.loads(tapnbd("info", "--output=json", image).stdout)
    assert out["virtual-size"] == 4096 * MiB and out["format"] == "qcow2"
    # Only info salvages: serving the image still refuses it, naming the entry.
    proc = tapnbd("map", image, check=False)
    assert proc.returncode != 0 and "L1 entry 2" in proc.stderr
    # The salvaged table never names the bad L2 tables (a read there would go past EOF).
    from formats.qcow2.meta import read_meta
    from formats.raw import RawDriver

    async def salvaged() -> tuple[list[int], list[str]]:
        child = RawDriver(str(image), read_only=True)
        try:
            bad: list[str] = []
            meta = await read_meta(child, bad)
            return list(meta.l1[:5]), bad
        finally:
            await child.close()

    l1_entries, bad = asyncio.run(salvaged())
    assert len(bad) == 2 and l1_entries[2] == l1_entries[4] == 0
    assert l1_entries[0] and l1_entries[1] == 0  # the good entry stays, holes stay holes


def test_commit_vhd_differencing_disk(tmp_path: Path) -> None:
    """qemu has no differencing VHDs: the overlay is written through tapnbd serve, and
    qemu-img reads the committed (dynamic) parent back."""
    base = tmp_path / "base.vhd"
    tapnbd("create", "-f", "vhd", base, "-s", "8M")
    qwrite(base, "vpc", "write -P 1 0 8M")
    top = tmp_path / "o.vhd"
    tapnbd("create", "-f", "vhd", top, "-b", base.name)
    server = start_server([str(top), "--format", "vhd"], tmp_path / "serve.log")
    try:
        run(
            [
                "qemu-io",
                "-f",
                "raw",
                "-c",
                "write -P 5 1M 100k",
                "-c",
                "write -P 6 7M 512",
                server.uri,
            ]
        )
    finally:
        assert server.stop() == 0
    expect = tmp_path / "expect.raw"
    tapnbd("convert", "-q", "-f", "vhd", "-O", "raw", top, expect)
    tapnbd("commit", "-q", "-f", "vhd", top)
    same(base, expect, "vpc", "raw")
    out = json.loads(tapnbd("info", "--json", "-f", "vhd", top).stdout)
    assert out["backing-filename"] == "base.vhd"
    got = tmp_path / "got.raw"
    tapnbd("convert", "-q", "-f", "vhd", "-O", "raw", top, got)
    assert got.read_bytes() == expect.read_bytes()
    assert "0 clusters allocated" in tapnbd("check", top).stdout  # emptied


def test_resize_keeps_an_optimised_qcow_on_its_fast_path(tmp_path: Path) -> None:
    """Written and closed by tapnbd (checksum right), grown, served again: the checksum
    covers the longer table, and the new range is allocated by whole extents."""
    image = tmp_path / "f.qcow"
    tapnbd("create", image, "-s", "4M")

    def serve_write(*commands: str) -> None:
        server = start_server([str(image), "--format", "qcow"], tmp_path / "serve.log")
        try:
            args = ["qemu-io", "-f", "raw"]
            for c in commands:
                args += ["-c", c]
            run([*args, server.uri])
        finally:
            assert server.stop() == 0
        assert "safe path" not in server.stderr()

    serve_write("write -P 1 0 4M")
    tapnbd("resize", "-q", image, "64M")
    out = json.loads(tapnbd("check", "--json", image).stdout)
    assert (out["exit-code"], out["cksum"]) == (0, "ok")
    serve_write("write -P 2 60M 1M")
    out = json.loads(tapnbd("check", "--json", image).stdout)
    assert (out["exit-code"], out["cksum"]) == (0, "ok")
    run(["qemu-io", "-f", "qcow", "-c", "read -P 1 0 4M", "-c", "read -P 2 60M 1M", str(image)])


@pytest.mark.parametrize("fmt", ["qcow", "qcow2"])
def test_rebase_unsafe_of_a_hostile_header_is_refused_naming_the_field(
    tmp_path: Path, fmt: str
) -> None:
    """-u reads no data, but the header is still checked before it is rewritten: a
    backing name length of 4 GiB must not become a 4 GiB write."""
    qcreate(tmp_path / "b.raw", "raw", MiB)
    image = tmp_path / "o"
    tapnbd("create", "-f", fmt, image, "-b", "b.raw", "-F", "raw")
    patch(image, 16, (0xFFFFFFFF).to_bytes(4, "big"))  # backing_file_size, both formats
    before = image.read_bytes()
    proc = tapnbd("rebase", "-u", "-f", fmt, image, "-b", "b.raw", "-F", "raw", check=False)
    assert proc.returncode == 1
    assert "backing_file_size" in proc.stderr and "Traceback" not in proc.stderr
    assert image.read_bytes() == before


def test_commit_grows_a_smaller_base_as_qemu_img(tmp_path: Path) -> None:
    images = {}
    for who in ("ours", "ref"):
        d = tmp_path / who
        d.mkdir()
        base = qcreate(d / "b.qcow2", "qcow2", MiB)
        qwrite(base, "qcow2", "write -P 1 0 1M")
        top = qcreate(d / "o.qcow2", "qcow2", 4 * MiB, "-b", "b.qcow2", "-F", "qcow2")
        qwrite(top, "qcow2", "write -P 3 3M 64k")
        images[who] = (base, top)
    tapnbd("commit", "-q", "-f", "qcow2", images["ours"][1])
    qemu_img("commit", "-q", "-f", "qcow2", images["ref"][1])
    assert qinfo(images["ours"][0], "qcow2")["virtual-size"] == 4 * MiB
    same(images["ours"][0], images["ref"][0], "qcow2", "qcow2")
    same(images["ours"][1], images["ref"][1], "qcow2", "qcow2")
    qemu_img("check", "-f", "qcow2", images["ours"][0])


# amend


@pytest.mark.parametrize(
    ("create", "opts"),
    [
        ("compat=0.10", "compat=1.1"),
        ("compat=0.10", "compat=v3,lazy_refcounts=on"),
        ("compat=1.1", "compat=0.10"),
        ("compat=1.1", "lazy_refcounts=on"),
        ("compat=1.1,lazy_refcounts=on", "lazy_refcounts=off"),
        ("compat=1.1,lazy_refcounts=on", "lazy_refcounts=off,compat=0.10"),
        ("compat=1.1", "refcount_bits=8"),
        ("compat=1.1", "refcount_bits=2,lazy_refcounts=on"),
        ("compat=1.1,refcount_bits=64", "refcount_bits=16,compat=0.10"),
    ],
)
def test_amend_matches_qemu_img(tmp_path: Path, create: str, opts: str) -> None:
    """The same amend on copies of an overlay with data: the same format-specific facts,
    the same backing file, the same guest contents, and qemu-img check clean."""
    images = {}
    for who in ("ours", "ref"):
        d = tmp_path / who
        d.mkdir()
        base = qcreate(d / "base.raw", "raw", 4 * MiB)
        qwrite(base, "raw", "write -P 1 0 4M")
        top = qcreate(d / "top.qcow2", "qcow2", None, "-b", "base.raw", "-F", "raw", "-o", create)
        qwrite(top, "qcow2", "write -P 5 1M 100k", "write -P 6 3M 4k")
        images[who] = top
    before = snapshot(images["ours"], "qcow2", tmp_path / "before.raw")
    tapnbd("amend", "-q", "-o", opts, images["ours"])
    qemu_img("amend", "-f", "qcow2", "-o", opts, images["ref"])
    ours, ref = qinfo(images["ours"], "qcow2"), qinfo(images["ref"], "qcow2")
    for key in ("format-specific", "backing-filename", "backing-filename-format", "virtual-size"):
        assert ours[key] == ref[key], key
    same(images["ours"], images["ref"], "qcow2", "qcow2")
    same(images["ours"], before, "qcow2", "raw")
    qemu_img("check", "-f", "qcow2", images["ours"])
    qwrite(images["ours"], "qcow2", "write -P 7 2M 64k")  # still writable, by qemu too
    qemu_img("check", "-f", "qcow2", images["ours"])


@pytest.mark.parametrize(
    ("opts", "steps"), [("lazy_refcounts=on", 1), ("refcount_bits=8,lazy_refcounts=on", 2)]
)
async def test_amend_p_fills_the_bar_step_by_step(tmp_path: Path, opts: str, steps: int) -> None:
    """-p's bar: the file's size, filled by one share per step as each ends."""
    from formats.pacing import Pace
    from formats.qcow2.amend import amend_qcow2
    from tapnbd.cli.image_flags import parse_options

    top = qcreate(tmp_path / "top.qcow2", "qcow2", 4 * MiB)
    qwrite(top, "qcow2", "write -P 5 1M 100k")
    total = top.stat().st_size
    began: list[int] = []
    moved: list[int] = []
    await amend_qcow2(str(top), parse_options(opts), pace=Pace(0, began.append, moved.append))
    assert began == [total] and sum(moved) == total and len(moved) == steps
    qemu_img("check", "-f", "qcow2", top)


def test_amend_p_draws_a_bar_that_ends_full_and_q_silences_it(tmp_path: Path) -> None:
    import re

    for quiet in (False, True):
        top = qcreate(tmp_path / f"q{quiet}.qcow2", "qcow2", 4 * MiB)
        err = tapnbd("amend", "-p", *(["-q"] if quiet else []), "-o", "refcount_bits=8", top)
        full = re.search(r"(\d+\.\d+)/\1 KiB", err.stderr)
        assert (full is None) is quiet, err.stderr
        assert qinfo(top, "qcow2")["format-specific"]["data"]["refcount-bits"] == 8  # type: ignore[index]


def test_amend_upgrade_keeps_internal_snapshots(tmp_path: Path) -> None:
    top = qcreate(tmp_path / "top.qcow2", "qcow2", 4 * MiB, "-o", "compat=0.10")
    qwrite(top, "qcow2", "write -P 5 1M 64k")
    qemu_img("snapshot", "-c", "s1", top)
    qwrite(top, "qcow2", "write -P 6 1M 64k")
    tapnbd("amend", "-q", "-o", "compat=1.1", top)
    info = qinfo(top, "qcow2")
    assert info["format-specific"]["data"]["compat"] == "1.1"  # type: ignore[index]
    snaps = info["snapshots"]
    assert isinstance(snaps, list) and [s["name"] for s in snaps] == ["s1"]
    qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", top, tmp_path / "s1.raw")
    assert (tmp_path / "s1.raw").read_bytes()[MiB : MiB + 65536] == b"\5" * 65536
    qemu_img("check", "-f", "qcow2", top)


@pytest.mark.parametrize(
    ("create", "io", "opts", "says"),
    [
        ("compat=1.1", "write -z 1M 64k", "compat=0.10", "zero clusters"),
        ("refcount_bits=8", "", "compat=0.10", "refcount_bits 8"),
        ("compat=1.1,lazy_refcounts=on", "", "compat=0.10", "lazy_refcounts needs compat 1.1"),
        ("compat=0.10", "", "lazy_refcounts=on", "lazy_refcounts needs compat 1.1"),
        ("compat=1.1", "", "refcount_bits=3", "a power of two from 1 to 64"),
        ("compat=0.10", "", "refcount_bits=8", "needs compat 1.1"),
        ("compat=1.1", "", "refcount_bits=8,compat=0.10", "needs compat 1.1"),
        ("compat=1.1", "", "size=8M", "use tapnbd resize"),
        ("compat=1.1", "", "compat=2", "compat=2"),
        ("compat=1.1", "", "lazy_refcounts=maybe", "lazy_refcounts=maybe"),
        ("compat=1.1", "", "colour=red", "unknown option"),
    ],
)
def test_amend_refuses_by_name_and_leaves_the_image(
    tmp_path: Path, create: str, io: str, opts: str, says: str
) -> None:
    top = qcreate(tmp_path / "top.qcow2", "qcow2", 4 * MiB, "-o", create)
    qwrite(top, "qcow2", "write -P 5 0 64k", *([io] if io else []))
    before = top.read_bytes()
    r = tapnbd("amend", "-o", opts, top, check=False)
    assert r.returncode == 1 and says in r.stderr, r.stderr
    assert top.read_bytes() == before


def test_amend_refuses_a_header_that_would_not_fit_one_sector(tmp_path: Path) -> None:
    """The new header is written as one sector, so that a power cut leaves the old one or
    the new one whole; a backing name that makes it longer is refused, untouched."""
    d = tmp_path / ("d" * 200)
    d.mkdir()
    base = qcreate(d / ("b" * 200 + ".raw"), "raw", MiB)
    top = qcreate(
        tmp_path / "top.qcow2", "qcow2", None, "-b", str(base), "-F", "raw", "-o", "compat=0.10"
    )
    before = top.read_bytes()
    r = tapnbd("amend", "-o", "compat=1.1", top, check=False)
    assert r.returncode == 1 and "512-byte sector" in r.stderr, r.stderr
    assert top.read_bytes() == before


def test_amend_checks_a_hostile_snapshot_table_before_reading_it(tmp_path: Path) -> None:
    """A downgrade reads every snapshot's tables: a snapshot whose L1 table claims 32 GiB
    is refused by name, not read."""
    top = qcreate(tmp_path / "top.qcow2", "qcow2", 4 * MiB)
    qwrite(top, "qcow2", "write -P 5 0 64k")
    qemu_img("snapshot", "-c", "s1", top)
    snapshots_offset = int.from_bytes(top.read_bytes()[64:72], "big")
    patch(top, snapshots_offset + 8, (0xFFFFFFF0).to_bytes(4, "big"))  # l1_size
    before = top.read_bytes()
    r = tapnbd("amend", "-o", "compat=0.10", top, check=False)
    assert r.returncode == 1 and "l1_size" in r.stderr and "s1" in r.stderr, r.stderr
    assert top.read_bytes() == before


def test_amend_of_a_dirty_or_foreign_image_is_refused(tmp_path: Path) -> None:
    top = qcreate(tmp_path / "top.qcow2", "qcow2", MiB)
    patch(top, 72, (1).to_bytes(8, "big"))  # incompatible_features: the dirty bit
    r = tapnbd("amend", "-o", "lazy_refcounts=on", top, check=False)
    assert r.returncode == 1 and "check --repair" in r.stderr, r.stderr
    patch(top, 72, (2).to_bytes(8, "big"))  # the corrupt bit: qemu found bad metadata
    r = tapnbd("amend", "-o", "lazy_refcounts=on", top, check=False)
    assert r.returncode == 1 and "marked the image corrupt" in r.stderr, r.stderr
    raw = qcreate(tmp_path / "d.raw", "raw", MiB)
    r = tapnbd("amend", "-o", "compat=1.1", raw, check=False)
    assert r.returncode == 1 and "this one is raw" in r.stderr, r.stderr


def test_amend_refuses_a_refcount_width_too_narrow_for_the_sharing(tmp_path: Path) -> None:
    """A snapshot shares every cluster: a 1-bit refcount cannot say 2 (qemu-img amend
    refuses it too), and nothing is written."""
    top = qcreate(tmp_path / "top.qcow2", "qcow2", 4 * MiB)
    qwrite(top, "qcow2", "write -P 5 0 64k")
    qemu_img("snapshot", "-c", "s1", top)
    before = top.read_bytes()
    r = tapnbd("amend", "-o", "refcount_bits=1", top, check=False)
    assert r.returncode == 1 and "refcount_bits 1 cannot count" in r.stderr, r.stderr
    assert top.read_bytes() == before
    tapnbd("amend", "-q", "-o", "refcount_bits=2", top)
    info = qinfo(top, "qcow2")
    assert info["format-specific"]["data"]["refcount-bits"] == 2  # type: ignore[index]
    assert [s["name"] for s in info["snapshots"]] == ["s1"]  # type: ignore[attr-defined]
    qemu_img("check", "-f", "qcow2", top)


@pytest.mark.parametrize("opts", ["compat=0.10", "compat=1.1,lazy_refcounts=on", "refcount_bits=4"])
def test_amend_survives_a_power_cut_anywhere(tmp_path: Path, seed: int, opts: str) -> None:
    """Every crash state of an amend (the power-loss model: durable writes, any subset of
    the rest, torn at sectors) is the old image or the new one: qemu-img opens it, checks
    it clean, finds the same backing file and reads the same guest contents.

    The downgrade starts from qemu's own version 3 overlay, whose header, feature table
    and backing name run past the first sector."""
    from formats.filters import at_file_layer
    from formats.filters.powerloss import PowerLossRecorder
    from formats.qcow2.amend import amend_qcow2
    from tapnbd.driver import Driver

    base = qcreate(tmp_path / "base.raw", "raw", 4 * MiB)
    qwrite(base, "raw", "write -P 1 0 4M")
    create = "compat=0.10" if "compat=1.1" in opts else "compat=1.1"
    top = qcreate(
        tmp_path / "top.qcow2", "qcow2", None, "-b", "base.raw", "-F", "raw", "-o", create
    )
    qwrite(top, "qcow2", "write -P 5 1M 100k")
    before = snapshot(top, "qcow2", tmp_path / "before.raw")
    start = top.read_bytes()
    recorders: list[PowerLossRecorder] = []

    def wrap(child: Driver) -> Driver:
        recorders.append(PowerLossRecorder(child, start))
        return recorders[-1]

    async def amend() -> list[str]:
        with at_file_layer(wrap):
            return await amend_qcow2(str(top), dict(o.split("=") for o in opts.split(",")))

    assert asyncio.run(amend())
    rec = recorders[0]
    rng = random.Random(seed)
    versions = set()
    state = tmp_path / "state.qcow2"
    for st in rec.states(rng, 40):
        state.write_bytes(rec.materialise(st))
        where = f"seed={seed} point={st.point} ({st.how})"
        r = run(["qemu-img", "check", "-f", "qcow2", str(state)], check=False)
        assert r.returncode == 0, f"{where}: {r.stdout}{r.stderr}"
        info = qinfo(state, "qcow2")
        assert info["backing-filename"] == "base.raw", where
        versions.add(info["format-specific"]["data"]["compat"])  # type: ignore[index]
        same(state, before, "qcow2", "raw")
    assert versions <= {"0.10", "1.1"}
