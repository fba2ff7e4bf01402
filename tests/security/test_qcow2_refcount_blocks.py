"""A qcow2 refcount table entry naming a refcount block where a block may not be.

A writer updates refcounts in the block the table names, so a block "at" 0x200 (inside
the header cluster), over the L1 table or over the refcount table itself turns the
guest's allocations into writes over that metadata: with the block at 0x200, one guest
WRITE set two 16-bit words of the header cluster (found by the audit). qemu refuses
the same image ("Refblock offset 0x200 unaligned"). A writable open now refuses it,
naming the entry; a read-only one, which never touches refcounts, still opens; and
``check --repair`` does not write the refcounts it would fix into such a block.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import qemu_io, run, start_server, tapnbd_cmd

CS = 65536


def _image(tmp: Path, where: str) -> tuple[Path, bytes]:
    """A qemu-made image with data, its refcount table entry 0 pointed at ``where``."""
    img = tmp / "r.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", img, "64M"],
        check=True,
    )
    qemu_io(img, "write -P 0x11 0 64k", fmt="qcow2")
    data = bytearray(img.read_bytes())
    l1 = int.from_bytes(data[40:48], "big")
    rt = int.from_bytes(data[48:56], "big")
    target = {"header": 0x200, "l1": l1, "reftable": rt}[where]
    data[rt : rt + 8] = target.to_bytes(8, "big")
    img.write_bytes(bytes(data))
    return img, bytes(data)


@pytest.mark.parametrize(
    ("where", "why"),
    [
        ("header", "not aligned to the cluster size"),
        ("l1", "points into the L1 table"),
        ("reftable", "points into the refcount table"),
    ],
)
def test_guest_writes_never_land_on_metadata_through_a_refcount_block(
    tmp_path: Path, where: str, why: str
) -> None:
    img, before = _image(tmp_path, where)
    try:
        server = start_server([str(img), "--format", "qcow2"], tmp_path / "serve.log")
    except AssertionError as e:  # refused at open: what we want
        assert "refcount table entry 0" in str(e) and why in str(e), e
        assert "Traceback" not in str(e)
    else:
        # Opened: play the guest anyway, to show what the open let through.
        try:
            qemu_io(server.uri, "write -P 0x5a 1M 128k", "flush")
        finally:
            server.stop()
        after = img.read_bytes()
        changed = [hex(i) for i in range(len(before)) if after[i] != before[i]]
        pytest.fail(f"a writable open was allowed; metadata bytes changed: {changed[:8]}")
    assert img.read_bytes() == before
    # Read-only, nothing writes refcounts: it opens and reads.
    server = start_server([str(img), "--format", "qcow2", "-r"], tmp_path / "ro.log")
    try:
        qemu_io(server.uri, "read -P 0x11 0 64k", read_only=True)
    finally:
        server.stop()
    # A repair must not write the refcounts it would fix into that block.
    proc = run(tapnbd_cmd("check", "--repair", str(img)), check=False)
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert img.read_bytes() == before
