"""Fuzzing the qcow2 header and tables with hypothesis.

Starting from a small qemu-made image, hypothesis overwrites a few bytes of the header
cluster and the metadata clusters after it. Whatever it does, opening either fails with
an ImageError or succeeds; reading, block status and a write then succeed or fail with
an OSError (EIO), never anything else, and each open is quick and bounded.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats.qcow2 import open_qcow2
from tapnbd.errors import ImageError
from tests.formats.qcow_util import need, qemu_img
from tests.helpers import qemu_io

CS = 4096


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("qemu-img", "qemu-io")
    img = tmp_path_factory.mktemp("fuzz") / "pristine.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={CS}", img, "4M")
    qemu_io(img, "write -P 0x61 0 20k", "write -z 1M 8k", "write -P 0x62 3M 4k", fmt="qcow2")
    return img


#: (offset, bytes): some in the header's first 112 bytes, some anywhere in the metadata.
PATCH = st.one_of(
    st.tuples(st.integers(0, 111), st.binary(min_size=1, max_size=8)),
    st.tuples(st.integers(0, 6 * CS - 1), st.binary(min_size=1, max_size=8)),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(patches=st.lists(PATCH, min_size=1, max_size=4), writable=st.booleans())
async def test_fuzzed_images_fail_cleanly(
    pristine: Path, tmp_path: Path, patches: list[tuple[int, bytes]], writable: bool
) -> None:
    img = tmp_path / "fuzz.qcow2"
    shutil.copy(pristine, img)
    with open(img, "r+b") as f:
        for off, data in patches:
            f.seek(off)
            f.write(data)
    t0 = time.monotonic()
    try:
        d = await open_qcow2(str(img), not writable)
    except ImageError:
        assert time.monotonic() - t0 < 5
        return
    assert time.monotonic() - t0 < 5
    try:
        size = d.size()
        for off in range(0, min(size, 8 << 20), 1 << 20):
            try:
                await d.pread(off, min(1 << 20, size - off))
            except OSError:
                pass
        try:
            await d.extents(0, min(size, 1 << 30))
        except OSError:
            pass
        if writable and size > 8192:
            try:
                await d.pwrite(4096, b"\x77" * 8192)
                await d.flush()
            except OSError:
                pass
    finally:
        try:
            await d.close()
        except OSError:
            pass


@pytest.fixture(scope="module")
def with_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("qemu-img", "qemu-io")
    img = tmp_path_factory.mktemp("fuzz") / "snap.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={CS}", img, "4M")
    qemu_io(img, "write -P 0x61 0 20k", "write -c -P 0x63 2M 8k", fmt="qcow2")
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 0x62 3M 4k", "write -z 8k 4k", fmt="qcow2")
    return img


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(
    patches=st.lists(PATCH, min_size=1, max_size=4),
    op=st.sampled_from(["create", "delete", "apply", "v2", "v3", "lazy"]),
)
async def test_fuzzed_images_are_amended_or_snapshotted_or_refused(
    with_snapshot: Path, tmp_path: Path, patches: list[tuple[int, bytes]], op: str
) -> None:
    """amend and snapshot read every table of a hostile image: each either refuses it
    with an ImageError, quickly, or leaves an image whose metadata still opens."""
    from formats.qcow2 import snapshot_edit
    from formats.qcow2.amend import amend_qcow2

    img = tmp_path / "fuzz.qcow2"
    shutil.copy(with_snapshot, img)
    with open(img, "r+b") as f:
        for off, data in patches:
            f.seek(off)
            f.write(data)
    path = str(img)
    t0 = time.monotonic()
    try:
        if op == "create":
            await snapshot_edit.create_snapshot(path, "s2")
        elif op == "delete":
            await snapshot_edit.delete_snapshot(path, "s1")
        elif op == "apply":
            await snapshot_edit.apply_snapshot(path, "s1")
        else:
            opts = {"v2": "compat=0.10", "v3": "compat=1.1", "lazy": "lazy_refcounts=on"}[op]
            await amend_qcow2(path, dict([opts.split("=")]))
    except ImageError:
        assert time.monotonic() - t0 < 10
        return
    assert time.monotonic() - t0 < 10
    await snapshot_edit.list_snapshots(path)  # what it wrote parses
