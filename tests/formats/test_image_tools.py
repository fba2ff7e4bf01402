"""The image tools through the real CLI (``tapnbd create|info|check|convert`` run as
processes), with qemu-img and qemu-io as the referee.

Each CLI run costs a Python start-up (about half a second on a loaded machine), so images
that only set a test up are made in-process (formats.qcow.create, QcowDriver) or by qemu.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tapnbd.cli.info import image_info
from tests.formats.qcow_util import (
    MiB,
    make_qcow,
    make_raw,
    open_qcow,
    patch,
    qemu_img,
    qemu_io,
    read_header,
    write_raw,
)
from tests.formats.qcow_util import (
    run as qrun,
)
from tests.helpers import run, tapnbd_cmd

GiB = 1 << 30


@pytest.fixture(autouse=True)
def _tools() -> None:
    from tests.formats.qcow_util import need

    need("qemu-img", "qemu-io")


def tapnbd(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(tapnbd_cmd(*map(str, args)), check=check)


def qwrite(image: Path, *commands: str, fmt: str = "qcow") -> None:
    """qemu-io writes without its per-allocation syncs (nothing crashes here)."""
    args: list[str] = ["qemu-io", "-f", fmt, "-t", "unsafe"]
    for c in commands:
        args += ["-c", c]
    qrun(*args, image)


def info(image: Path) -> dict[str, object]:
    # The chains here are the test's own: it vouches for their headers.
    out: dict[str, object] = json.loads(
        tapnbd("info", "--json", "--allow-probed-backing-chain", image).stdout
    )
    return out


def qinfo(image: Path, *, chain: bool = False) -> object:
    args: list[str | Path] = ["info", "--output=json", image]
    if chain:
        args.insert(1, "--backing-chain")
    return json.loads(qemu_img(*args))


def xen(i: dict[str, object]) -> dict[str, object]:
    specific = i["format-specific"]
    assert isinstance(specific, dict)
    ext: dict[str, object] = specific["data"]["xen-extension"]
    return ext


def disk_usage(path: Path) -> int:
    return path.stat().st_blocks * 512


#: Fields that mean the same in ``tapnbd info --json`` and ``qemu-img info --output=json``.
SHARED = ("format", "virtual-size", "cluster-size", "backing-filename", "full-backing-filename")


def assert_agrees(ours: dict[str, object], theirs: object) -> None:
    assert isinstance(theirs, dict)
    for key in SHARED:
        assert ours.get(key) == theirs.get(key), key
    # Both measure the file's blocks (nothing writes it in between).
    assert ours["actual-size"] == theirs["actual-size"]


# create


def test_create_defaults_are_optimised_and_sparse(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow"
    tapnbd("create", img, "--size", "10G")
    assert disk_usage(img) <= 64 << 10  # the header and a page of L1 at most
    assert img.stat().st_size < 1 * MiB  # the 40 KiB L1 table, as a hole
    i = info(img)
    assert i["format"] == "qcow" and i["virtual-size"] == 10 * GiB
    assert i["cluster-size"] == 4096
    assert "backing-filename" not in i
    x = xen(i)
    assert x["optimised"] is True and x["honoured"] is True
    assert x["sparse"] is True and x["l1-big-endian"] is True
    assert x["min-cluster-alloc"] == 512 and x["cksum-matches"] is True
    assert_agrees(i, qinfo(img))
    # Written by a qemu client, it stays a valid qcow.
    qemu_io(img, "write -P 0x61 5G 64k", "read -P 0x61 5G 64k")


def test_create_reserve_allocates(tmp_path: Path) -> None:
    img = tmp_path / "r.qcow"
    tapnbd("create", img, "--size", "64M", "--reserve")
    # Room for every extent: 32 L1 slots of a 4 KiB table and 2 MiB of clusters.
    assert disk_usage(img) >= 32 * (2 * MiB + 4096)
    i = info(img)
    assert xen(i)["sparse"] is False and xen(i)["optimised"] is True
    assert_agrees(i, qinfo(img))
    raw = tmp_path / "r.raw"
    tapnbd("create", raw, "--size", "64M", "--format", "raw", "--reserve")
    assert disk_usage(raw) >= 64 * MiB
    sparse = tmp_path / "s.raw"
    tapnbd("create", sparse, "--size", "1G", "--format", "raw")
    assert disk_usage(sparse) == 0
    q = qinfo(sparse)
    assert isinstance(q, dict)
    assert (q["format"], q["virtual-size"]) == ("raw", GiB)


def test_create_with_backing_is_normal(tmp_path: Path) -> None:
    base = asyncio.run(make_qcow(tmp_path / "base.qcow", 64 * MiB))
    qwrite(base, "write -P 0x42 1M 64k")
    top = tmp_path / "top.qcow"
    tapnbd("create", top, "--backing", base)  # the size is the backing file's
    i = info(top)
    assert i["virtual-size"] == 64 * MiB
    assert i["backing-filename"] == i["full-backing-filename"] == str(base.resolve())
    assert i["cluster-size"] == 512  # blktap/QEMU: 512-byte clusters over a backing file
    x = xen(i)
    assert x["optimised"] is False and x["min-cluster-alloc"] == 1
    assert x["honoured"] is False  # tapdisk ignored the extension with a backing file
    chain = qinfo(top, chain=True)
    assert isinstance(chain, list) and len(chain) == 2
    assert_agrees(i, chain[0])
    backing = i["backing-image"]
    assert isinstance(backing, dict)
    assert_agrees(backing, chain[1])
    # qemu reads the backing data through the new image.
    qemu_io(top, "read -P 0x42 1M 64k", "read -P 0 0 1M")
    # The human-readable form names the chain too.
    out = tapnbd("info", "-F", "qcow", "-f", "qcow", top).stdout
    assert f"image: {top}" in out and "file format: qcow" in out
    assert "virtual size: 64 MiB (67108864 bytes)" in out
    assert f"backing file: {base.resolve()}" in out
    assert f"image: {base.resolve()}" in out
    # --size with --backing; a raw backing file.
    braw = make_raw(tmp_path / "b.raw", 8 * MiB)
    top2 = tmp_path / "top2.qcow"
    tapnbd("create", top2, "--backing", braw, "--size", "16M")
    q = qinfo(top2)
    assert isinstance(q, dict)
    assert q["virtual-size"] == 16 * MiB and q["backing-filename"] == str(braw.resolve())


@pytest.mark.parametrize(
    ("args", "cluster", "optimised"),
    [
        (["--no-optimise"], 4096, False),
        (["--cluster-size", "64K"], 65536, True),
        (["--cluster-size", "512", "--no-optimise"], 512, False),
    ],
)
def test_create_options(tmp_path: Path, args: list[str], cluster: int, optimised: bool) -> None:
    img = tmp_path / "o.qcow"
    tapnbd("create", img, "--size", "256M", *args)
    i = info(img)
    assert i["cluster-size"] == cluster
    x = xen(i)
    l2_size = 1 << read_header(img).l2_bits
    assert x["optimised"] is optimised and x["sparse"] is True
    assert x["min-cluster-alloc"] == (l2_size if optimised else 1)
    assert l2_size * 8 >= cluster  # an extent's clusters stay aligned after its table
    assert_agrees(i, qinfo(img))
    qemu_io(img, "write -P 0x33 100M 3k", "read -P 0x33 100M 3k", "read -P 0 0 1M")


def test_create_refuses_bad_options(tmp_path: Path) -> None:
    img = tmp_path / "x.qcow"
    for args, message in [
        (["--size", "1G", "--cluster-size", "3000"], "cluster size 3000 must be a power of two"),
        (["--size", "1G", "--cluster-size", "128K"], "cluster size 131072 must be a power of two"),
        (["--size", "1G", "--format", "vmdk"], "unknown format 'vmdk'"),
        ([], "a size is needed"),
    ]:
        proc = tapnbd("create", img, *args, check=False)
        assert proc.returncode == 1, args
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert not img.exists()


# info


def test_info_allocation_and_checksum(tmp_path: Path) -> None:
    img = asyncio.run(make_qcow(tmp_path / "n.qcow", 64 * MiB, optimise=False))
    qwrite(img, "write -P 0x11 0 12k", "write -P 0x22 10M 4k", "write -P 0x33 40M 1")
    i = info(img)
    # qemu-img map: the clusters holding data (qcow v1 has no zero clusters).
    mapped = json.loads(qemu_img("map", "--output=json", img))
    data = sum(m["length"] for m in mapped if m["data"])
    assert i["allocated-size"] == data == 5 * 4096
    assert i["allocated-clusters"] == 5
    assert_agrees(i, qinfo(img))

    async def write_optimised(path: Path) -> Path:
        await make_qcow(path, 64 * MiB)
        d = await open_qcow(path)
        await d.pwrite(3 * MiB, b"x" * 4096)
        await d.close()  # a clean close rewrites the checksum
        return path

    opt = asyncio.run(write_optimised(tmp_path / "o.qcow"))
    i = info(opt)
    x = xen(i)
    assert x["cksum-matches"] is True and x["optimised"] is True
    assert i["allocated-clusters"] == 512  # a whole extent
    specific = i["format-specific"]
    assert isinstance(specific, dict) and specific["data"]["fast-path"] is True
    # A stale checksum (a crash before the clean close): reported, and the safe path.
    cksum = int(str(x["cksum"]), 16)
    patch(opt, 52, (cksum ^ 1).to_bytes(4, "big"))
    i = info(opt)
    assert xen(i)["cksum-matches"] is False
    assert xen(i)["cksum"] == f"0x{cksum ^ 1:08x}"
    missing = tapnbd("info", tmp_path / "nope.qcow", check=False)
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_info_relative_backing_agrees_with_qemu(tmp_path: Path) -> None:
    """A qemu-made overlay naming its backing file relatively, looked at from elsewhere:
    the backing file is found next to the image, and named as qemu names it."""
    (tmp_path / "sub").mkdir()
    base = make_raw(tmp_path / "sub" / "base.raw", 4 * MiB)
    write_raw(base, MiB, b"r" * 4096)
    top = tmp_path / "sub" / "top.qcow"
    qemu_img("create", "-f", "qcow", "-b", "base.raw", "-F", "raw", top)
    for image in ("sub/top.qcow", "./sub/../sub/top.qcow"):
        ours = json.loads(
            run(tapnbd_cmd("info", "--json", "-f", "qcow", "-F", "raw", image), cwd=tmp_path).stdout
        )
        theirs = json.loads(run(["qemu-img", "info", "--output=json", image], cwd=tmp_path).stdout)
        assert_agrees(ours, theirs)
        assert ours["backing-filename"] == "base.raw"
    qemu_io(top, "read -P 0x72 1M 4k")


# check


def _l1(path: Path, i: int) -> int:
    with open(path, "rb") as f:
        f.seek(read_header(path).l1_table_offset + 8 * i)
        return int.from_bytes(f.read(8), "big")


def _l2(path: Path, i: int, j: int) -> int:
    with open(path, "rb") as f:
        f.seek(_l1(path, i) + 8 * j)
        return int.from_bytes(f.read(8), "big")


def _set_l2(path: Path, i: int, j: int, value: int) -> None:
    patch(path, _l1(path, i) + 8 * j, value.to_bytes(8, "big"))


def _damaged(tmp_path: Path, damage: str) -> Path:
    """A normal image (4 KiB clusters, 2 MiB per L1 slot) with three clusters, damaged."""
    img = asyncio.run(make_qcow(tmp_path / f"{damage}.qcow", 64 * MiB, optimise=False))
    qwrite(img, "write -P 0x11 0 8k", "write -P 0x22 4M 4k")
    eof = img.stat().st_size
    if damage == "leak":
        _set_l2(img, 0, 1, 0)  # the cluster behind it is now unreferenced
    elif damage == "overlap":
        _set_l2(img, 0, 1, _l2(img, 2, 0))  # two guest clusters, one host cluster
    elif damage == "overlap-unaligned":
        # Sector-aligned only: it spans entry 0's cluster and its own old one.
        _set_l2(img, 0, 1, _l2(img, 0, 0) + 512)
    elif damage == "l2-past-eof":
        _set_l2(img, 2, 0, eof + 64 * 4096)
    elif damage == "l1-past-eof":
        patch(img, read_header(img).l1_table_offset + 8 * 2, (eof + 4096).to_bytes(8, "big"))
    elif damage == "l2-in-metadata":
        _set_l2(img, 0, 0, read_header(img).l1_table_offset)
    return img


@pytest.mark.parametrize(
    ("damage", "code", "leaks", "messages"),
    [
        ("none", 0, 0, ["No errors were found on the image.", "3 clusters allocated, 0 leaked"]),
        ("leak", 3, 1, ["1 clusters are not referenced by any table (leaked"]),
        # Each pointer moved away from its cluster also leaks that cluster.
        ("overlap", 2, 1, ["cluster at 0x", "is also used by something else"]),
        ("overlap-unaligned", 2, 0, ["entry 1: cluster at 0x", "is also used by something else"]),
        ("l2-past-eof", 2, 1, ["entry 0: cluster offset 0x", "lies past the end of the file"]),
        ("l1-past-eof", 2, 2, ["L1 entry 2 (0x", "points past the end of the file"]),
        ("l2-in-metadata", 2, 1, ["entry 0: cluster offset 0x1000 lies in the metadata"]),
    ],
)
def test_check_reports_and_exit_codes(
    tmp_path: Path, damage: str, code: int, leaks: int, messages: list[str]
) -> None:
    img = _damaged(tmp_path, damage)
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    proc = tapnbd("check", img, check=False)
    assert proc.returncode == code, proc.stdout + proc.stderr
    for m in messages:
        assert m in proc.stdout, proc.stdout
    assert proc.stdout.startswith("ERROR: ") == (code == 2)
    assert f", {leaks} leaked" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before  # read-only
    if damage in ("none", "overlap"):
        j = json.loads(tapnbd("check", "--json", img, check=False).stdout)
        assert j["exit-code"] == code and j["leaks"] == leaks
        assert (j["corruptions"] > 0) == (code == 2)
        if code:
            assert all(m in "\n".join(j["messages"]) for m in messages)
        else:
            assert j["allocated-clusters"] == 3 and j["corruptions"] == 0
            # qemu changed L1 without the checksum: harmless in a normal image.
            assert j["cksum"] == "mismatch"
            assert [m for m in j["messages"] if "harmless" not in m] == []


def test_check_checksum_mismatch(tmp_path: Path) -> None:
    img = asyncio.run(make_qcow(tmp_path / "o.qcow", 64 * MiB))
    with open(img, "rb") as f:
        f.seek(52)
        cksum = int.from_bytes(f.read(4), "big")
    patch(img, 52, (cksum ^ 0xFFFF).to_bytes(4, "big"))
    proc = tapnbd("check", img, check=False)
    assert proc.returncode == 4
    assert "the L1 checksum in the Xen extension does not match the L1 table" in proc.stdout
    assert "cksum: mismatch" in proc.stdout
    # Not a qcow: refused with exit code 1.
    raw = make_raw(tmp_path / "r.raw", 4096)
    proc = tapnbd("check", raw, check=False)
    assert proc.returncode == 1 and "not a qcow image" in proc.stderr
    # A qcow2 image is checked by the qcow2 checker (tests/formats/test_qcow2_cli.py).
    q2 = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", q2, "1M")
    proc = tapnbd("check", q2, check=False)
    assert proc.returncode == 0, proc.stdout


# convert


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 256 MiB qcow made by qemu: data, allocated zeros, holes."""
    src = tmp_path_factory.mktemp("convert") / "src.qcow"
    qemu_img("create", "-f", "qcow", src, "256M")
    qwrite(
        src,
        "write -P 0xab 0 1M",
        "write -P 0 1M 1M",  # allocated, all zeros: skipped by convert
        "write -P 0xcd 100M 64k",
        "write -P 0xef 255M 960k",
    )
    return src


SOURCE_DATA = 1 * MiB + 64 * 1024 + 960 * 1024


@pytest.mark.parametrize(
    ("out", "args"),
    [("raw", []), ("qcow", []), ("qcow", ["--no-optimise", "--cluster-size", "64K"])],
    ids=["raw", "qcow-optimised", "qcow-normal-64k"],
)
def test_convert(tmp_path: Path, source: Path, out: str, args: list[str]) -> None:
    dst = tmp_path / f"dst.{out}"
    proc = tapnbd("convert", source, dst, "-O", out, *args)  # stderr: a pipe, not a terminal
    assert "Traceback" not in proc.stderr
    assert "256.0/256.0 MiB" in proc.stderr  # the bar still reports, once, at the end
    qemu_img("compare", "-f", "qcow", "-F", out, source, dst)
    i = asyncio.run(image_info(str(dst)))
    assert i["format"] == out and i["virtual-size"] == 256 * MiB
    # Sparse: about the data, not the zeros or the holes (an optimised image's extents
    # are allocated, but as holes in the file).
    slack = 512 * 1024  # partial clusters, tables, L1
    assert disk_usage(dst) <= SOURCE_DATA + slack, disk_usage(dst)
    if out == "qcow":
        x = xen(i)
        assert x["optimised"] is ("--no-optimise" not in args)
        if x["optimised"]:
            assert x["cksum-matches"] is True  # closed cleanly
        else:
            # The written zeros were skipped: nothing allocated at 1-2 MiB.
            mapped = json.loads(qemu_img("map", "--output=json", dst))
            assert sum(m["length"] for m in mapped if m["data"]) == SOURCE_DATA
        assert tapnbd("check", dst).returncode == 0
    else:
        quiet = tapnbd("convert", "-q", source, tmp_path / "q.raw", "-O", "raw")
        assert quiet.stderr == "" and quiet.stdout == ""


def test_convert_flattens_a_backing_chain(tmp_path: Path, source: Path) -> None:
    """qcow over qcow: the copy reads like the overlay, base data included."""
    top = asyncio.run(make_qcow(tmp_path / "top.qcow", None, backing=source))
    qwrite(top, "write -P 0x77 512k 4k", "write -P 0x88 200M 64k")
    dst = tmp_path / "flat.qcow"
    tapnbd("convert", "-q", "-f", "qcow", "-F", "qcow", top, dst, "-O", "qcow")
    qemu_img("compare", "-f", "qcow", "-F", "qcow", top, dst)
    assert "backing-filename" not in asyncio.run(image_info(str(dst)))
    # Onto a file being read (the image, a backing file through a symlink): refused.
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    link = tmp_path / "link.qcow"
    link.symlink_to(source)
    for target in (top, link):
        proc = tapnbd(
            "convert", "-q", "--allow-probed-backing-chain", top, target, "-O", "raw", check=False
        )
        assert proc.returncode == 1
        assert "is the source image or one of its backing files" in proc.stderr
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    qemu_img("compare", "-f", "qcow", "-F", "qcow", top, dst)


def _run_measured(cmd: list[str]) -> tuple[float, int]:
    """Run ``cmd``: (seconds, peak RSS in bytes) of that one child (wait4, not
    RUSAGE_CHILDREN, which is the maximum over every child the test process ever had)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read().decode()  # a pipe that fills would stall the child
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stderr.close()
    assert proc.returncode == 0, err
    return seconds, usage.ru_maxrss * 1024


async def _big_image(path: Path, writes: list[tuple[int, int, int]]) -> Path:
    """A 100 GiB optimised qcow holding ``writes`` (offset, length, byte)."""
    await make_qcow(path, 100 * GiB)
    d = await open_qcow(path)
    for off, n, byte in writes:
        for pos in range(off, off + n, 4 * MiB):
            await d.pwrite(pos, bytes([byte]) * min(4 * MiB, off + n - pos))
    await d.close()
    return path


def test_convert_100g_sparse_quickly_in_bounded_memory(tmp_path: Path) -> None:
    """An image far bigger than memory, with 64 MiB of data: the copy takes seconds, and
    the converter's peak RSS does not grow with the data copied."""
    writes = [(0, MiB, 0x5A), (10 * GiB, 64 * MiB, 0x6B), (99 * GiB, 64 << 10, 0x7C)]
    writes.append((100 * GiB - 512, 512, 0x7D))
    src = asyncio.run(_big_image(tmp_path / "src.qcow", writes))
    # Baseline: the same program converting an image with almost nothing in it.
    tiny = asyncio.run(_big_image(tmp_path / "tiny.qcow", [(0, 4096, 0x5A)]))
    _, base_rss = _run_measured(
        tapnbd_cmd("convert", "-q", str(tiny), str(tmp_path / "t.raw"), "-O", "raw")
    )
    for out in ("raw", "qcow"):
        dst = tmp_path / f"big.{out}"
        seconds, rss = _run_measured(tapnbd_cmd("convert", str(src), str(dst), "-O", out))
        assert seconds < 20, seconds
        assert rss < base_rss + 32 * MiB, (rss, base_rss)
        assert disk_usage(dst) < 80 * MiB  # sparse
        qemu_io(
            dst,
            "read -P 0x5a 0 1M",
            "read -P 0 1M 1M",
            "read -P 0x6b 10G 64M",
            "read -P 0 50G 1M",
            "read -P 0x7c 99G 64k",
            f"read -P 0x7d {100 * GiB - 512} 512",
            fmt=out,
        )


def _dirty_pages(fd: int) -> int | None:
    """The file's dirty pages in the page cache (cachestat(2), Linux 6.5), or None."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    rng = (ctypes.c_uint64 * 2)(0, 0)  # offset 0, length 0: the whole file
    stat = (ctypes.c_uint64 * 5)()  # cache, dirty, writeback, evicted, recently evicted
    if libc.syscall(451, ctypes.c_uint(fd), rng, stat, ctypes.c_uint(0)) != 0:
        return None
    return int(stat[1])


def _fs_type(path: Path) -> str:
    best, kind = "", ""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        mount, fstype = line.split()[1:3]
        if str(path).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


@pytest.mark.parametrize("fmt", ["raw", "qcow", "qcow2", "vhd"])
def test_a_new_images_close_leaves_its_pages_to_the_kernel(tmp_path: Path, fmt: str) -> None:
    """ext4 writes back a file cut to 0 bytes when it is next closed (auto_da_alloc), in
    the closing process's time: a convert's target was created so, and its close took
    0.3-0.4 s. After our create the data written is still dirty when the file closes,
    as after qemu-img's."""
    import asyncio as aio

    if sys.platform != "linux" or _fs_type(tmp_path) != "ext4":
        pytest.skip("auto_da_alloc is ext4's")
    from formats.locks import locked_target

    path = tmp_path / f"new.{fmt}"
    path.write_bytes(b"\x01" * (1 << 20))  # an existing file, written over
    os.sync()
    with locked_target(str(path)) as fd:
        if fmt == "raw":
            from formats.raw import create_raw

            create_raw(str(path), 64 << 20, target_fd=fd)
        elif fmt == "qcow":
            from formats.qcow.create import create_qcow

            aio.run(create_qcow(str(path), 64 << 20, target_fd=fd))
        elif fmt == "qcow2":
            from formats.qcow2.create import create_qcow2

            aio.run(create_qcow2(str(path), 64 << 20, target_fd=fd))
        else:
            from formats.vhd.create import create_vhd

            aio.run(create_vhd(str(path), 64 << 20, target_fd=fd))
        end = os.fstat(fd).st_size
        data = os.open(path, os.O_RDWR)  # as the converted image's driver opens it
        try:
            os.pwrite(data, os.urandom(32 << 20), end)
        finally:
            os.close(data)
        dirty = _dirty_pages(fd)
    if dirty is None:
        pytest.skip("no cachestat(2)")
    assert dirty >= (24 << 20) // 4096, dirty  # (a flusher thread may have begun)
