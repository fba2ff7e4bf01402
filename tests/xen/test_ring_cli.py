"""``tapnbd ring serve`` takes the trust opt-ins ``serve`` takes, with the same meaning.

base.raw <- mid.qcow <- top.qcow: a probed backing file may not name one of its own, so
the ring refuses the chain until the admin names the formats (``-f``/``-F``) or vouches
for it (``--allow-probed-backing-chain``), and then a frontend reads base's bytes.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from formats.qcow.create import create_qcow
from tapnbd.xen.frontend import BlkFront
from tests.helpers import run, tapnbd_cmd
from tests.xen.ringproc import RingFactory

MiB = 1 << 20


async def _chain(tmp_path: Path) -> Path:
    base = tmp_path / "base.raw"
    base.write_bytes(b"B" * MiB)
    mid, top = tmp_path / "mid.qcow", tmp_path / "top.qcow"
    await create_qcow(str(mid), backing=str(base), backing_format="raw")
    await create_qcow(str(top), backing=str(mid), backing_format="qcow")
    return top


def _refused(tmp_path: Path, *args: str) -> str:
    """``ring serve`` with ``args``: it must exit 1 before serving; its stderr."""
    proc = run(
        tapnbd_cmd("ring", "serve", *args, "--path", str(tmp_path / "refused"), "--once"),
        check=False,
        timeout=30,
    )
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    return proc.stderr


async def test_ring_serve_backing_chain_opt_ins(tmp_path: Path, ring: RingFactory) -> None:
    top = await _chain(tmp_path)
    err = _refused(tmp_path, str(top), "-f", "qcow")
    assert f"the format of {tmp_path / 'mid.qcow'} was probed" in err, err
    for extra in (["-f", "qcow", "-F", "qcow"], ["--allow-probed-backing-chain"]):
        server = ring(str(top), "--read-only", *extra)
        with BlkFront(server.path) as front:
            assert front.read(0, 4096) == b"B" * 4096
            assert front.read(MiB - 512, 512) == b"B" * 512
        server.stop()


def test_ring_serve_an_internal_snapshot(tmp_path: Path, ring: RingFactory) -> None:
    """``ring serve --snapshot``: the frontend sees the image as it was at the snapshot,
    read-only (qemu-img convert -l is the referee); an unknown one is refused by name."""
    image = tmp_path / "snap.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 2M", str(image)])
    run(["qemu-img", "snapshot", "-c", "s1", str(image)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 2M", str(image)])
    want = tmp_path / "want.raw"
    run(["qemu-img", "convert", "-l", "s1", "-O", "raw", str(image), str(want)])
    err = _refused(tmp_path, str(image), "--snapshot", "nope")
    assert "nope" in err and "s1" in err, err
    server = ring(str(image), "--snapshot", "s1")
    with BlkFront(server.path) as front:
        assert front.read_only
        assert front.read(0, 4 * MiB) == want.read_bytes()
    server.stop()


def test_ring_serve_backing_block_device_needs_an_option(tmp_path: Path, ring: RingFactory) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root and loop devices")
    base = tmp_path / "base.raw"
    base.write_bytes(b"L" * MiB)
    dev = run(["losetup", "-f", "--show", str(base)]).stdout.strip()
    try:
        over = tmp_path / "over.qcow"
        run(tapnbd_cmd("create", "-f", "qcow", "-b", dev, "-F", "raw", str(over)))
        err = _refused(tmp_path, str(over), "-f", "qcow", "-F", "raw")
        assert "is a block device" in err and "--allow-block-devices" in err, err
        server = ring(str(over), "-f", "qcow", "-F", "raw", "--allow-block-devices", "-r")
        with BlkFront(server.path) as front:
            assert front.read(4096, 4096) == b"L" * 4096
        server.stop()
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
