"""The Linux kernel's nbd client mounts ext4 on an RBD-backed export (in the kernel VM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import start_server
from tests.kernel.vm import ext4_files, need_vm, run_guest
from tests.rbd import cluster as ceph

pytestmark = [pytest.mark.vm, pytest.mark.slow]

SCRIPT = """
t boot
nbd-client $S $P /dev/nbd0 -N {name} -t 30 >/dev/null || fail attach
mkfs.ext4 -q -F /dev/nbd0 && mount -t ext4 /dev/nbd0 /mnt || fail mkfs
tree /mnt/t 4 || fail tree
sync
sums /mnt/t guest
umount /mnt && fsck.ext4 -fn /dev/nbd0 >/dev/null || fail fsck
nbd-client -d /dev/nbd0 || fail detach
t end
"""


def test_ext4_on_rbd_through_the_kernel_client(ceph_cluster: ceph.Cluster, tmp_path: Path) -> None:
    need_vm()
    image = f"{ceph.POOL}/kvm{tmp_path.name[-6:]}"
    ceph_cluster.rbd("create", "--size", "256M", image)
    sock = tmp_path / "s.sock"
    server = start_server([f"rbd:{image}", "--socket", str(sock)], tmp_path / "server.log")
    name = image.split("/")[1]
    try:
        result = run_guest(sock, SCRIPT.format(name=name), tmp_path)
    finally:
        assert server.stop() == 0
    assert result.rc == 0, result.console()
    guest = result.sums("guest")
    assert len(guest) >= 10
    # The referee: rbd export of the image, read by e2fsck and debugfs on the host.
    raw = tmp_path / "export.raw"
    ceph_cluster.rbd("export", "--no-progress", image, str(raw))
    assert ext4_files(raw, "/t", tmp_path) == guest
