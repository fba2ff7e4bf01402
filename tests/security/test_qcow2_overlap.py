"""A qcow2 L2 entry or bitmap table entry whose data lies on the image's own metadata.

A stranger's image can map a guest cluster onto its L1 table, its refcount table, a
refcount block or an L2 table. A writer that wrote the guest's data there would let the
guest rewrite the tables (and so the image's mapping); one that copied a shared cluster
on write would drop a reference to the table and later hand its cluster out again; and
a persistent bitmap's clusters of bits, rewritten at close, would overwrite whatever
they lie on. qemu refuses such writes with its overlap check (EIO, "Preventing invalid
write on metadata"). A writable open refuses the entry (EIO for that cluster only, the
rest of the image works) and a bitmap kept up to date is refused at open, naming it;
no byte of the file changes. qemu-io plays the guest through ``tapnbd serve``.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from formats import open_image
from formats.qcow2.meta import read_meta
from tests.helpers import qemu_io, run, start_server

CS = 65536
COPIED = 1 << 63


def _qcow2(tmp: Path, *extra: str) -> Path:
    img = tmp / "o.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", img, "64M"],
        check=True,
    )
    for cmd in extra:
        subprocess.run(cmd.replace("IMG", str(img)).split(), check=True, capture_output=True)
    qemu_io(img, "write -P 0x11 0 64k", "write -P 0x22 1M 64k", fmt="qcow2")
    return img


def _patch(img: Path, at: int, value: int) -> bytes:
    data = bytearray(img.read_bytes())
    data[at : at + 8] = value.to_bytes(8, "big")
    img.write_bytes(bytes(data))
    return bytes(data)


def _offsets(img: Path) -> dict[str, int]:
    data = img.read_bytes()
    l1 = int.from_bytes(data[40:48], "big")
    rt = int.from_bytes(data[48:56], "big")
    l2 = int.from_bytes(data[l1 : l1 + 8], "big") & ((1 << 56) - 512)
    rb = int.from_bytes(data[rt : rt + 8], "big")
    return {"l1": l1, "reftable": rt, "l2": l2, "refblock": rb}


@pytest.mark.parametrize(
    ("target", "flags"),
    [
        ("l1", COPIED),
        ("reftable", COPIED),
        ("l2", COPIED),  # the table that holds the entry itself
        ("refblock", 0),  # shared: a copy-on-write would drop the block's reference
    ],
)
def test_guest_data_never_lands_on_the_tables(tmp_path: Path, target: str, flags: int) -> None:
    img = _qcow2(tmp_path)
    where = _offsets(img)
    before = _patch(img, where["l2"], where[target] | flags)  # guest cluster 0
    server = start_server([str(img), "--format", "qcow2"], tmp_path / "serve.log")
    try:
        out = run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4k", server.uri], check=False
        ).stdout
        assert "Input/output error" in out, out
        # The rest of the image is served: reads and writes elsewhere work.
        qemu_io(server.uri, "read -P 0x22 1M 64k", "write -P 0x33 2M 64k", "flush")
        # Nor is the entry discarded: that would drop a reference to the table.
        out = run(["qemu-io", "-f", "raw", "-c", "discard 0 64k", server.uri], check=False).stdout
        assert "Input/output error" in out, out
        qemu_io(server.uri, "flush")  # a refusal loses nothing: flushes still succeed
    finally:
        server.stop()
    log = (tmp_path / "serve.log").read_text()
    assert "points at the image's own metadata" in log, log
    after = img.read_bytes()
    # Only the new cluster and its table entry and refcount changed, never the tables'
    # bytes the bad entry named (nor, for a shared one, the refcount of its cluster).
    assert after[where[target] : where[target] + CS] == _expected(before, after, where, target)
    qemu_io(img, "read -P 0x33 2M 64k", "read -P 0x22 1M 64k", fmt="qcow2")
    # Read-only, nothing can be written there: the entry reads, as qemu reads it.
    server = start_server([str(img), "--format", "qcow2", "-r"], tmp_path / "ro.log")
    try:
        out = qemu_io(server.uri, "read -v 0 16", read_only=True)
    finally:
        server.stop()
    assert after[where[target] : where[target] + 16].hex() in out.replace(" ", ""), out


def _expected(before: bytes, after: bytes, where: dict[str, int], target: str) -> bytes:
    """The target cluster as it must read after the session: unchanged, except where
    the legitimate write at 2M updated it (its L2 entry, its refcount)."""
    region = bytearray(before[where[target] : where[target] + CS])
    if target == "l2":
        # Entry 32 (guest 2M) was set by the legitimate write; nothing else.
        region[32 * 8 : 33 * 8] = after[where["l2"] + 32 * 8 : where["l2"] + 33 * 8]
    if target == "refblock":
        # Refcounts of the new clusters only: the words past the image's old end.
        end = len(before) // CS
        region[end * 2 :] = after[where["refblock"] + end * 2 : where["refblock"] + CS]
    return bytes(region)


def test_a_bitmap_whose_bits_lie_on_the_tables_is_refused(tmp_path: Path) -> None:
    """The enabled bitmap's clusters of bits are rewritten at close: one that names the
    L1 table is refused at a writable open, naming the bitmap; read-only opens."""
    img = _qcow2(tmp_path, "qemu-img bitmap --add IMG b0")

    async def table_offset() -> int:
        d = await open_image(str(img), fmt="raw", read_only=True)
        try:
            (bm,) = (await read_meta(d)).bitmaps
        finally:
            await d.close()
        return bm.table_offset

    at = asyncio.run(table_offset())
    before = _patch(img, at, _offsets(img)["l1"])
    try:
        server = start_server([str(img), "--format", "qcow2"], tmp_path / "serve.log")
    except AssertionError as e:
        assert "bitmap 'b0': table entry 0" in str(e), e
        assert "points at the image's metadata" in str(e), e
        assert "Traceback" not in str(e)
    else:
        server.stop()
        pytest.fail("a writable open with that bitmap was allowed")
    assert img.read_bytes() == before
    server = start_server([str(img), "--format", "qcow2", "-r"], tmp_path / "ro.log")
    try:
        got = run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x11 0 64k", server.uri])
        assert "Pattern verification failed" not in got.stdout, got.stdout
    finally:
        server.stop()
    assert img.read_bytes() == before
