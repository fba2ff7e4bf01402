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
import os
import subprocess
from pathlib import Path

import pytest

from formats import open_image
from formats.qcow2.meta import Qcow2Meta, read_meta
from tests.helpers import qemu_io, run, start_server

CS = 65536
COPIED = 1 << 63


def _qcow2(tmp: Path, *extra: str, size: str = "64M") -> Path:
    img = tmp / "o.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", img, size],
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
    error = _refused_for_writing(img, tmp_path, before, "read -P 0x11 0 64k")
    assert "bitmap 'b0': table entry 0" in error, error
    assert "points at the image's metadata" in error, error


def _refused_for_writing(img: Path, tmp: Path, before: bytes, *reads: str) -> str:
    """The error a writable serve of ``img`` fails with; a read-only serve then does
    ``reads``, and the file stays ``before``."""
    try:
        server = start_server([str(img), "--format", "qcow2"], tmp / "serve.log")
    except AssertionError as e:
        error = str(e)
    else:
        server.stop()
        pytest.fail("a writable open was allowed")
    assert "Traceback" not in error, error
    assert img.read_bytes() == before
    server = start_server([str(img), "--format", "qcow2", "-r"], tmp / "ro.log")
    try:
        qemu_io(server.uri, *reads, read_only=True)
    finally:
        server.stop()
    assert img.read_bytes() == before
    return error


def _meta(img: Path) -> Qcow2Meta:
    async def go() -> Qcow2Meta:
        d = await open_image(str(img), fmt="raw", read_only=True)
        try:
            return await read_meta(d)
        finally:
            await d.close()

    return asyncio.run(go())


#: Where L1 entry 1 (guest 512M-1G, unallocated) is pointed, by the name the refusal
#: gives that table.
SHARED = [
    "refcount table entry 0's refcount block",
    "the snapshot table",
    "snapshot 's1''s L1 table",
    "the bitmap directory",
    "bitmap 'b{0}''s table",  # (braces: a name from the image is no template)
]


def _offset_of(meta: Qcow2Meta, name: str) -> int:
    ext = meta.bitmaps_ext
    assert ext is not None
    return {
        SHARED[0]: meta.reftable[0],
        SHARED[1]: meta.header.snapshots_offset,
        SHARED[2]: meta.snapshots[0].l1_table_offset,
        SHARED[3]: ext.directory_offset,
        SHARED[4]: meta.bitmaps[0].table_offset,
    }[name]


@pytest.mark.parametrize("name", SHARED)
def test_an_l2_table_on_other_metadata_is_refused_for_writing(tmp_path: Path, name: str) -> None:
    """An L1 entry whose L2 table is another table's cluster: the guest's allocations
    there would write mapping entries into it (and its updates would rewrite the
    mapping). A writable open is refused naming both; read-only opens, and the rest
    of the image reads."""
    img = _qcow2(
        tmp_path,
        "qemu-img snapshot -c s1 IMG",
        "qemu-img bitmap --add IMG b{0}",
        "qemu-img bitmap --disable IMG b{0}",
        size="1G",
    )
    # A cluster past the tables: the directory ends the file, and an L2 table there
    # would otherwise be refused as running past its end.
    os.truncate(img, img.stat().st_size + CS)
    meta = _meta(img)
    before = _patch(img, meta.header.l1_table_offset + 8, _offset_of(meta, name) | COPIED)
    error = _refused_for_writing(img, tmp_path, before, "read -P 0x11 0 64k", "read -P 0x22 1M 64k")
    message = error.split(f"{img}: ", 1)[-1]
    assert message.endswith("a write to one would rewrite the other\n"), error
    assert {"L1 entry 1's L2 table", name} == set(message.split(" share ")[0].split(" and "))


def test_a_freed_cluster_two_entries_name_never_holds_a_table(tmp_path: Path) -> None:
    """A hostile image names one data cluster X from two L2 entries (refcount 1). The
    guest discards one: X's refcount drops to 0 and X is free for reuse. A new L2 table
    put there would be rewritten by the guest's writes through the other entry; new
    tables are only ever appended, so the guest rewrites no more than its own data."""
    img = _qcow2(tmp_path, size="2G")
    l2 = _offsets(img)["l2"]
    x = int.from_bytes(img.read_bytes()[l2 : l2 + 8], "big") & ((1 << 56) - 512)
    _patch(img, l2 + 8, x | COPIED)  # guest 64k names guest 0's cluster too
    server = start_server([str(img), "--format", "qcow2"], tmp_path / "serve.log")
    try:
        qemu_io(server.uri, "discard 0 64k", "flush")  # X is freed
        # Guest 1G needs a new L2 table (and a data cluster), then guest 64k writes X.
        qemu_io(server.uri, "write -P 0x33 1G 64k", "flush", "write -P 0x44 64k 64k", "flush")
    finally:
        server.stop()
    data = img.read_bytes()
    l1 = int.from_bytes(data[40:48], "big")
    table = int.from_bytes(data[l1 + 16 : l1 + 24], "big") & ((1 << 56) - 512)
    assert table and table != x, (hex(table), hex(x))
    # The tables read as they were written: qemu finds every mapping sound.
    out = run(["qemu-io", "-r", "-f", "qcow2", "-c", "read 1G 64k", "-c", "read 0 64k", str(img)])
    assert "error" not in out.stdout.lower(), out.stdout
    qemu_io(img, "read -P 0x44 64k 64k", "read -P 0 0 64k", "read -P 0x22 1M 64k", fmt="qcow2")
