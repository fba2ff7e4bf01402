"""The block-device path: nbdfuse + losetup + mkfs.ext4 + mount, all on a real kernel."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import Server, need, need_root_devices, run


@contextmanager
def fuse_loop(uri: str, where: Path) -> Iterator[str]:
    """Expose ``uri`` as /dev/loopN through nbdfuse, and undo it all afterwards."""
    mnt = where / "fuse"
    mnt.mkdir()
    fuse = subprocess.Popen(["nbdfuse", str(mnt), uri], stderr=subprocess.PIPE)
    dev = ""
    try:
        for _ in range(100):
            if (mnt / "nbd").exists():
                break
            time.sleep(0.1)
        else:
            raise AssertionError("nbdfuse did not come up")
        dev = run(["losetup", "-f", "--show", str(mnt / "nbd")]).stdout.strip()
        yield dev
    finally:
        if dev:
            run(["losetup", "-d", dev], check=False)
        run(["fusermount3", "-u", str(mnt)], check=False)
        fuse.wait(timeout=30)


def tree_checksums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "lost+found" not in p.parts
    }


@pytest.mark.root
@pytest.mark.parametrize("spec", ["file", "ram"])
def test_mkfs_mount_write_fsck(serve: Callable[..., Server], tmp_path: Path, spec: str) -> None:
    need_root_devices()
    need("nbdfuse", "losetup", "mkfs.ext4", "fsck.ext4")
    disk = tmp_path / "fs.img"
    with open(disk, "wb") as f:
        f.truncate(256 << 20)
    server = serve(str(disk) if spec == "file" else "ram:256M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with fuse_loop(server.uri, tmp_path) as dev:
        run(["mkfs.ext4", "-q", "-F", dev])
        run(["mount", dev, str(mnt)])
        try:
            for d in range(4):
                sub = mnt / f"dir{d}"
                sub.mkdir()
                for i in range(8):
                    (sub / f"f{i}").write_bytes(os.urandom(4096 * (i + 1) * (d + 1)))
            (mnt / "big").write_bytes(os.urandom(16 << 20))
            sums = tree_checksums(mnt)
        finally:
            run(["umount", str(mnt)])
        fsck = run(["fsck.ext4", "-f", "-n", dev])
        assert "clean" in fsck.stdout or fsck.returncode == 0
        run(["mount", dev, str(mnt)])
        try:
            assert tree_checksums(mnt) == sums
        finally:
            run(["umount", str(mnt)])


@pytest.mark.root
def test_raw_driver_serves_a_block_device(serve: Callable[..., Server], tmp_path: Path) -> None:
    """The raw driver on /dev/loopN: size from the device, BLKDISCARD and BLKZEROOUT."""
    need_root_devices()
    need("losetup", "qemu-io", "nbdinfo")
    backing = tmp_path / "backing.img"
    backing.write_bytes(os.urandom(16 << 20))
    dev = run(["losetup", "-f", "--show", str(backing)]).stdout.strip()
    try:
        server = serve(dev, "--name", "blk")
        assert run(["nbdinfo", "--size", server.uri]).stdout.strip() == str(16 << 20)
        cmds = [
            "write -P 0x61 0 1M",
            "write -z 1M 1M",
            "discard 2M 1M",
            "flush",
            "read -P 0x61 0 1M",
            "read -P 0 1M 1M",
        ]
        args = ["qemu-io", "-f", "raw"]
        for c in cmds:
            args += ["-c", c]
        out = run([*args, server.uri]).stdout
        assert "failed" not in out
        server.stop()
        with open(backing, "rb") as f:
            head = f.read(2 << 20)
        assert head == b"\x61" * (1 << 20) + bytes(1 << 20)
    finally:
        run(["losetup", "-d", dev], check=False)
