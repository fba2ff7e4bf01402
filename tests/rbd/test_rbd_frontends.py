"""An rbd: name through every front end that takes an image: export add, attach, ring serve."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tapnbd.xen.frontend import BlkFront
from tests.control.tap import Tapnbd, need_devices
from tests.helpers import qemu_io
from tests.kernel.vm import ext4_files
from tests.rbd import cluster as ceph
from tests.xen.ringproc import start_ring

pytestmark = pytest.mark.slow


@pytest.fixture
def tap(ceph_cluster: ceph.Cluster) -> Iterator[Tapnbd]:
    """The CLI with a private state directory; its daemon sees the test cluster."""
    t = Tapnbd(Path(tempfile.mkdtemp(prefix="tnbd-", dir="/tmp")))
    try:
        yield t
    finally:
        t.cleanup()


def test_export_add_serves_rbd(tap: Tapnbd, rbd_image: str, ceph_cluster: ceph.Cluster) -> None:
    tap.ok("export", "add", rbd_image, "--name", "vm")
    listed = {e["name"]: e for e in tap.list()["exports"]}
    assert listed["vm"]["format"] == "rbd"
    uri = f"nbd+unix:///vm?socket={tap.state / 'nbd.sock'}"
    qemu_io(uri, "write -P 0x3c 2M 1M", "flush")
    tap.ok("export", "remove", "vm")
    qemu_io(rbd_image, "read -P 0x3c 2M 1M")


def test_attach_rbd_and_mount(
    tap: Tapnbd, rbd_image: str, ceph_cluster: ceph.Cluster, tmp_path: Path
) -> None:
    need_devices()
    device = tap.ok("attach", rbd_image).strip()
    subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True)
    point = tap.mount(device)
    (point / "d").mkdir()
    (point / "d" / "hello").write_bytes(b"on rbd\n" * 1000)
    tap.umount(point)
    tap.ok("detach", device)
    raw = tmp_path / "export.raw"
    ceph_cluster.rbd("export", "--no-progress", rbd_image.removeprefix("rbd:"), str(raw))
    files = ext4_files(raw, "/d", tmp_path)
    assert set(files) == {"hello"}


def test_ring_serve_on_rbd(rbd_image: str, tmp_path: Path) -> None:
    qemu_io(rbd_image, "write -P 0x5d 1M 64k")
    backend = start_ring(rbd_image, tmp_path / "vbd", tmp_path / "ring.log")
    try:
        with BlkFront(backend.path) as front:
            assert front.read(1 << 20, 65536) == b"\x5d" * 65536
            front.write(4 << 20, b"\x6e" * 8192)
            front.flush()
    finally:
        backend.stop()
    qemu_io(rbd_image, "read -P 0x6e 4M 8k")
