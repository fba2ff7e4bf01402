"""Writes through ``tapnbd serve`` on qcow2, with qemu as the referee.

The same qemu-io commands go to tapnbd over NBD and straight to a copy of the image
through qemu's own qcow2 driver; afterwards ``qemu-img compare`` must find the two images
equal and ``qemu-img check`` must find ours clean (no leaks, no corruption).
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from formats.filters import FilterDriver
from formats.qcow import file_filter
from formats.qcow2 import open_qcow2
from formats.raw import RawDriver
from tests.formats.qcow2_util import PATTERNS, SIZE, check_clean, make_image
from tests.formats.qcow_util import need, qemu_img
from tests.helpers import Server, fio_verify, qemu_io

KINDS = [
    "cluster-65536",
    "cluster-512",
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
]


def _commands(seed: int, cluster: int) -> list[str]:
    """Seeded writes of every shape, zeroes and cluster-aligned discards."""
    rng = random.Random(seed)
    cmds = []
    for _ in range(40):
        what = rng.random()
        off = rng.randrange(0, SIZE - 300_000)
        if what < 0.6:
            n = rng.choice([1, 512, 4096, 65536, 200_000, rng.randrange(1, 300_000)])
            cmds.append(f"write -P 0x{rng.randrange(1, 256):02x} {off} {n}")
        elif what < 0.8:
            n = rng.choice([4096, 65536, 3 * cluster, rng.randrange(1, 300_000)])
            cmds.append(f"write -z {off} {min(n, SIZE - off)}")
        else:
            a = off // cluster * cluster
            n = min(cluster * rng.randrange(1, 4), SIZE - a)
            cmds.append(f"discard {a} {n}")
    return cmds


def _cluster(kind: str) -> int:
    if kind.startswith("cluster-"):
        return 2 << 20 if kind.endswith("2M") else int(kind[8:])
    return 4096 if kind == "chain" else 65536


@pytest.mark.parametrize("kind", KINDS)
def test_writes_match_qemu(tmp_path: Path, serve: Callable[..., Server], kind: str) -> None:
    need("qemu-img", "qemu-io")
    img = make_image(tmp_path, kind)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    for f in tmp_path.iterdir():  # the image and its backing files
        if f.is_file():
            shutil.copy(f, ref_dir / f.name)
    ref = ref_dir / img.name
    seed = random.randrange(1 << 32)
    print("seed", seed)
    cmds = _commands(seed, _cluster(kind))
    server = serve(str(img), "--format", "qcow2")
    qemu_io(server.uri, *cmds, "flush")
    assert server.stop() == 0
    qemu_io(ref, *cmds, fmt="qcow2")
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", img, ref)
    check_clean(img)
    if kind.startswith("snapshot"):  # the snapshot still reads as it did when it was taken
        for f in (img, ref):
            qemu_img("convert", "-l", "snapshot.name=snap1", "-O", "raw", f, f"{f}.snap")
        assert Path(f"{img}.snap").read_bytes() == Path(f"{ref}.snap").read_bytes()


def test_fio_verify_on_qcow2(tmp_path: Path, serve: Callable[..., Server]) -> None:
    need("qemu-img", "fio")
    img = tmp_path / "fio.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", img, "64M")
    server = serve(str(img))
    job = fio_verify(
        server.uri, "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=32M", "--randseed=7"
    )
    assert job["error"] == 0
    assert server.stop() == 0
    check_clean(img)


@pytest.mark.parametrize("refcount_bits", [1, 16])
def test_refcount_table_grows(
    tmp_path: Path, serve: Callable[..., Server], refcount_bits: int
) -> None:
    """512 B clusters: a refcount block covers 128 KiB (16-bit) and the first refcount
    table 8 MiB of file, so filling 24 MiB makes new blocks and moves the table."""
    need("qemu-img", "nbdcopy")
    img = tmp_path / "grow.qcow2"
    qemu_img(
        "create", "-f", "qcow2", "-o", f"cluster_size=512,refcount_bits={refcount_bits}",
        img, "24M",
    )  # fmt: skip
    src = tmp_path / "src.raw"
    rng = random.Random(5)
    print("seed 5")
    src.write_bytes(rng.randbytes(24 << 20))
    server = serve(str(img))
    from tests.formats.qcow_util import run

    run("nbdcopy", src, server.uri)
    assert server.stop() == 0
    qemu_img("compare", "-f", "qcow2", "-F", "raw", img, src)
    check_clean(img)


def test_snapshot_survives_in_place_sized_writes(
    tmp_path: Path, serve: Callable[..., Server]
) -> None:
    """Small writes into clusters a snapshot shares, once their table is in memory (the
    synchronous fast path): each must copy the cluster, never write it in place."""
    img = make_image(tmp_path, "snapshot-shared")
    before = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", img, before)
    server = serve(str(img))
    # The first write loads (and copies) the L2 table; the rest find it in memory.
    cmds = [f"write -P 0x{i + 1:02x} {off + 512} 512" for i, (_, off, _) in enumerate(PATTERNS)]
    qemu_io(server.uri, "write -P 0x01 0 512", *cmds, "write -P 0x09 5243392 4096")
    assert server.stop() == 0
    snap = tmp_path / "snap.raw"
    qemu_img("convert", "-l", "snapshot.name=snap1", "-O", "raw", img, snap)
    assert snap.read_bytes() == before.read_bytes()
    check_clean(img)


class _InlineWrites(FilterDriver):
    """A file whose synchronous write path always works (the raw driver's, on file
    systems that refuse RWF_NOWAIT for buffered writes)."""

    def pwrite_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        assert isinstance(self.child, RawDriver)
        os.pwrite(self.child.fd, data, offset)
        return True


async def test_fast_write_path_never_writes_a_shared_cluster(tmp_path: Path) -> None:
    img = make_image(tmp_path, "snapshot-shared")
    token = file_filter.set(_InlineWrites)
    try:
        d = await open_qcow2(str(img), False)
    finally:
        file_filter.reset(token)
    try:
        await d.pwrite(0, b"\x01" * 512)  # copies the L2 table and cluster 0
        off = PATTERNS[1][1]
        assert not d.pwrite_nowait(off, b"\x02" * 512)  # shared with snap1: no
        assert d.pwrite_nowait(512, b"\x03" * 512)  # cluster 0 is ours now: yes
        assert bytes(await d.pread(0, 1024)) == b"\x01" * 512 + b"\x03" * 512
    finally:
        await d.close()
    check_clean(img)
