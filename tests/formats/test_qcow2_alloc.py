"""qcow2 allocating writes (issue 13, "Performance"): the inline allocation path and the
file grown ahead of need, judged by qemu-io on a copy and by qemu-img check."""

from __future__ import annotations

import errno
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

from formats.filters import FilterDriver
from formats.qcow import file_filter
from formats.qcow2 import open_qcow2
from formats.qcow2.driver import GROW_AHEAD, Qcow2Driver
from formats.raw import RawDriver
from tests.formats.qcow2_util import check_clean
from tests.formats.qcow_util import need, qemu_img
from tests.helpers import Server, qemu_io, run

SIZE = 32 << 20
CLUSTER = 65536


def _allocating_commands(seed: int) -> list[str]:
    """Writes that mostly land in new clusters: 4k ones, some across a cluster boundary,
    some of several clusters, and zero clusters written over again."""
    rng = random.Random(seed)
    cmds = []
    for _ in range(120):
        what = rng.random()
        if what < 0.6:
            off = rng.randrange(0, SIZE // 4096) * 4096
            cmds.append(f"write -P 0x{rng.randrange(1, 256):02x} {off} 4096")
        elif what < 0.75:
            off = rng.randrange(1, SIZE // CLUSTER) * CLUSTER - 2048  # straddles a boundary
            cmds.append(f"write -P 0x{rng.randrange(1, 256):02x} {off} 4096")
        elif what < 0.9:
            off = rng.randrange(0, SIZE - (1 << 20))
            n = rng.choice([CLUSTER, 3 * CLUSTER + 5, 1 << 20])
            cmds.append(f"write -P 0x{rng.randrange(1, 256):02x} {off} {n}")
        else:
            a = rng.randrange(0, SIZE // CLUSTER - 4) * CLUSTER
            cmds.append(f"write -z {a} {2 * CLUSTER}")
            cmds.append(f"write -P 0x{rng.randrange(1, 256):02x} {a + 8192} 4096")
    return cmds


def test_allocating_writes_match_qemu_and_the_file_ends_at_its_last_cluster(
    tmp_path: Path, serve: Callable[..., Server]
) -> None:
    need("qemu-img", "qemu-io")
    img = tmp_path / "alloc.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(SIZE))
    ref = tmp_path / "ref.qcow2"
    shutil.copy(img, ref)
    seed = random.randrange(1 << 32)
    print("seed", seed)
    cmds = _allocating_commands(seed)
    server = serve(str(img), "--format", "qcow2")
    # Writeback: qemu-io's default (writethrough) sends every write with FUA, which the
    # server serves on its asynchronous path; plain writes take the inline one.
    args = ["qemu-io", "-f", "raw", "-t", "writeback"]
    for c in [*cmds, "flush"]:
        args += ["-c", c]
    out = run([*args, server.uri]).stdout
    assert "failed" not in out and "error" not in out.lower(), out
    assert server.stop() == 0
    qemu_io(ref, *cmds, fmt="qcow2")
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", img, ref)
    report = check_clean(img)
    # The writes allocated more than GROW_AHEAD, so the file grew ahead more than once;
    # a clean close gives the space back: the file ends where qemu says the image does.
    end = report["image-end-offset"]
    assert isinstance(end, int) and end > 2 * GROW_AHEAD
    assert img.stat().st_size == end


def test_overlay_reads_in_small_requests_match_qemu(
    tmp_path: Path, serve: Callable[..., Server]
) -> None:
    """Small reads of an overlay are served from the backing file inline where nothing is
    allocated (pread_nowait); nbdcopy in 4 KiB requests must see what qemu sees."""
    need("qemu-img", "qemu-io", "nbdcopy")
    seed = random.randrange(1 << 32)
    print("seed", seed)
    rng = random.Random(seed)
    base = tmp_path / "base.raw"
    base.write_bytes(rng.randbytes(4 << 20) + bytes(4 << 20) + rng.randbytes(3 << 20))
    img = tmp_path / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "raw", img, str(12 << 20))
    # Each 5000-byte write must end inside the 12 MiB disk, or qemu-io fails it.
    writes = [f"write -P 0x{rng.randrange(1, 256):02x} {rng.randrange(0, (12 << 20) - 5000)} 5000"
              for _ in range(20)]  # fmt: skip
    qemu_io(img, *writes, fmt="qcow2")
    expected = tmp_path / "qemu.raw"
    qemu_img("convert", "-O", "raw", img, expected)
    server = serve(str(img), "--read-only", "--format", "qcow2")
    out = tmp_path / "nbd.raw"
    run(["nbdcopy", "--request-size=4096", server.uri, str(out)])
    assert out.read_bytes() == expected.read_bytes()


def _qemu_io_writeback(uri: str, cmds: list[str]) -> None:
    args = ["qemu-io", "-f", "raw", "-t", "writeback"]
    for c in cmds:
        args += ["-c", c]
    out = run([*args, uri]).stdout
    assert "failed" not in out and "error" not in out.lower(), out


def test_freed_clusters_are_reused_after_the_flush(
    tmp_path: Path, serve: Callable[..., Server]
) -> None:
    """Write, discard, flush, write elsewhere: new clusters, single or a write's several
    in a row, are freed ones where they fit, so the file grows only for the rest;
    qemu-io doing the same on a copy reads the same."""
    need("qemu-img", "qemu-io")
    img = tmp_path / "reuse.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(SIZE))
    ref = tmp_path / "ref.qcow2"
    seed = random.randrange(1 << 32)
    print("seed", seed)
    rng = random.Random(seed)
    first = [f"write -P 0x{rng.randrange(1, 256):02x} {i * CLUSTER + 512} 4096" for i in range(24)]
    server = serve(str(img), "--format", "qcow2")
    _qemu_io_writeback(server.uri, [*first, "flush"])
    assert server.stop() == 0
    size = img.stat().st_size
    shutil.copy(img, ref)
    # 16 freed clusters (in a row in the file), then 16 new ones: three in one write,
    # and 13 single ones written 4k at a time, a few of them partly. A freed cluster holds
    # old data unless it was punched, and must read as zeros around the new data.
    second = [
        f"discard 0 {16 * CLUSTER}",
        "flush",
        f"write -P 0x33 {200 * CLUSTER} {3 * CLUSTER}",
    ] + [
        f"write -P 0x{rng.randrange(1, 256):02x} {(100 + i) * CLUSTER + rng.randrange(0, 60000)} 4096"
        for i in range(13)
    ]
    # Then 6 freed: one alone, then 5 in a row. A write of 5 clusters takes the 5 (a
    # write's clusters stay in one run, so the lone one does not do), and one of 3 finds
    # no run of 3 left and appends.
    third = [
        f"discard {16 * CLUSTER} {CLUSTER}",
        f"discard {18 * CLUSTER} {5 * CLUSTER}",
        "flush",
        f"write -P 0x44 {300 * CLUSTER + 4096} {5 * CLUSTER - 8192}",
        f"write -P 0x55 {310 * CLUSTER} {3 * CLUSTER}",
    ]
    for cmds, growth in ((second, 0), (third, 3 * CLUSTER)):
        server = serve(str(img), "--format", "qcow2")
        _qemu_io_writeback(server.uri, [*cmds, "flush"])
        assert server.stop() == 0
        qemu_io(ref, *cmds, fmt="qcow2")
        qemu_img("compare", "-f", "qcow2", "-F", "qcow2", img, ref)
        check_clean(img)
        assert img.stat().st_size == size + growth
        size = img.stat().st_size


def _host_of(img: Path, guest: int) -> int:
    """Where qemu-img map (-U: the image is open) says a guest cluster's data lies."""
    for e in json.loads(qemu_img("map", "-U", "--output=json", img)):
        if e["start"] <= guest < e["start"] + e["length"] and "offset" in e:
            return int(e["offset"]) + guest - int(e["start"])
    raise AssertionError(f"guest offset {guest} is not allocated")


class _NoPunch(FilterDriver):
    """A file that cannot punch holes: a freed cluster keeps its old bytes."""

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise OSError(errno.ENOTSUP, "no hole punching here")

    def grow(self, length: int, *, allocate: bool = False) -> None:
        assert isinstance(self.child, RawDriver)
        self.child.grow(length, allocate=allocate)


async def test_a_reused_cluster_reads_as_zeros_around_new_data(tmp_path: Path) -> None:
    need("qemu-img")
    img = tmp_path / "nopunch.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(SIZE))
    token = file_filter.set(lambda d: _NoPunch(d) if isinstance(d, RawDriver) else d)
    try:
        d = await open_qcow2(str(img), False)
    finally:
        file_filter.reset(token)
    assert isinstance(d, Qcow2Driver)
    try:
        await d.pwrite(0, b"\xaa" * CLUSTER)
        await d.flush()
        host = _host_of(img, 0)
        await d.trim(0, CLUSTER)
        await d.flush()  # host cluster of guest cluster 0: refcount 0, durable, not punched
        await d.pwrite(10 * CLUSTER + 8192, b"\x55" * 4096)  # takes it back
        await d.flush()
        assert _host_of(img, 10 * CLUSTER) == host
        want = bytes(8192) + b"\x55" * 4096 + bytes(CLUSTER - 8192 - 4096)
        assert bytes(await d.pread(10 * CLUSTER, CLUSTER)) == want
        assert bytes(await d.pread(0, CLUSTER)) == bytes(CLUSTER)
        # A write of several clusters into a run of freed ones, unpunched: the bytes
        # around its data read as zeros too, never what the clusters held before.
        await d.pwrite(20 * CLUSTER, b"\xbb" * (3 * CLUSTER))
        await d.flush()
        run = _host_of(img, 20 * CLUSTER)
        await d.trim(20 * CLUSTER, 3 * CLUSTER)
        await d.flush()
        await d.pwrite(30 * CLUSTER + 8192, b"\x66" * (3 * CLUSTER - 16384))
        await d.flush()
        assert _host_of(img, 30 * CLUSTER) == run
        want = bytes(8192) + b"\x66" * (3 * CLUSTER - 16384) + bytes(8192)
        assert bytes(await d.pread(30 * CLUSTER, 3 * CLUSTER)) == want
    finally:
        await d.close()
    check_clean(img)
