"""tapnbd and QEMU see each other's use of an image (formats.locks).

QEMU locks an image with OFD byte-range locks that name permissions; tapnbd takes the
same bytes, so that a tapnbd server and a QEMU (qemu-nbd, qemu-img, qemu-io, a VM)
refuse each other's conflicting opens, both ways, as two QEMUs do. QEMU is the referee
here: its own messages say whether it saw tapnbd, and /proc/locks shows that tapnbd
holds exactly the bytes qemu-nbd holds for the same use.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import need, qemu_io, run, start_server, tapnbd_cmd

MiB = 1 << 20


def lock_bytes(path: Path) -> list[tuple[str, int, int]]:
    """The OFD locks on ``path``'s inode: (type, first byte, last byte), sorted."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = []
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if f[1] == "OFDLCK" and f[5] == dev:
            first, last = int(f[6]), int(f[7])
            out += [(f[3], b, b) for b in range(first, last + 1)]  # qemu merges neighbours
    return sorted(out)


@contextmanager
def qemu_nbd(image: Path, *args: str) -> Iterator[int]:
    """qemu-nbd serving ``image`` on a unix socket, ready (its --fork parent exits then)."""
    need("qemu-nbd")
    sock = image.parent / f"qemu-{os.getpid()}.sock"
    pidfile = image.parent / "qemu-nbd.pid"
    proc = subprocess.run(
        ["qemu-nbd", "--fork", "--pid-file", str(pidfile), "-k", str(sock), *args, str(image)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    pid = int(pidfile.read_text())
    pidfd = os.pidfd_open(pid)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGTERM)
        # Its locks go with the process: wait until it is gone (a pidfd turns readable).
        ready = select.select([pidfd], [], [], 30)[0]
        os.close(pidfd)
        assert ready, "qemu-nbd did not exit on SIGTERM"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"])
    qemu_io(img, "write -P 0x3c 0 64k", fmt="qcow2")
    return img


@pytest.mark.parametrize("read_only", [False, True], ids=["writer", "reader"])
def test_the_same_lock_bytes_as_qemu_nbd(tmp_path: Path, image: Path, read_only: bool) -> None:
    flag = ["-r"] if read_only else []
    with qemu_nbd(image, "-f", "qcow2", *flag):
        theirs = lock_bytes(image)
    assert theirs, "qemu-nbd took no OFD locks: nothing to compare with"
    server = start_server([str(image), *(["--read-only"] if read_only else [])], tmp_path / "s.log")
    try:
        assert lock_bytes(image) == theirs
    finally:
        assert server.stop() == 0
    assert lock_bytes(image) == []  # gone with the server


def test_qemu_sees_a_tapnbd_writer(tmp_path: Path, image: Path) -> None:
    server = start_server([str(image)], tmp_path / "s.log")
    try:
        info = run(["qemu-img", "info", str(image)], check=False)
        assert info.returncode != 0 and 'Failed to get shared "write" lock' in info.stderr
        io = run(["qemu-io", "-f", "qcow2", "-c", "write 0 4k", str(image)], check=False)
        assert 'Failed to get "write" lock' in io.stderr + io.stdout
        # -U reads it anyway, as with a VM's image; what it reads is what tapnbd wrote.
        qemu_io(server.uri, "write -P 0x5a 64k 4k")
        run(["qemu-img", "info", "-U", str(image)])
    finally:
        assert server.stop() == 0
    qemu_io(image, "read -P 0x3c 0 64k", "read -P 0x5a 64k 4k", fmt="qcow2")


def test_tapnbd_sees_a_qemu_writer(tmp_path: Path, image: Path) -> None:
    with qemu_nbd(image, "-f", "qcow2"):
        for cmd, words in [
            (["serve", str(image), "--port", "0"], 'Failed to get "write" lock'),
            (["serve", str(image), "--read-only", "--port", "0"], 'shared "write" lock'),
            (["info", str(image)], 'Failed to get shared "write" lock'),
            (["check", str(image)], 'shared "write" lock'),
            (["map", str(image)], 'shared "write" lock'),
            (["convert", "-q", str(image), str(tmp_path / "copy.qcow2")], 'shared "write"'),
            (["resize", str(image), "32M"], '"write" lock'),
        ]:
            proc = run(tapnbd_cmd(*cmd), check=False, timeout=60)
            assert proc.returncode != 0, (cmd, proc.stdout)
            assert words in proc.stderr + proc.stdout, (cmd, proc.stderr)
            assert "Traceback" not in proc.stderr, proc.stderr
        # -U reads beside the writer.
        run(tapnbd_cmd("info", "-U", str(image)))
        run(tapnbd_cmd("check", "-U", str(image)))
    assert run(["qemu-img", "info", "--output=json", str(image)]).stdout.count(
        '"virtual-size": 16777216'
    )


def test_readers_share_and_a_qemu_reader_stops_a_tapnbd_writer(tmp_path: Path, image: Path) -> None:
    with qemu_nbd(image, "-f", "qcow2", "-r"):
        proc = run(tapnbd_cmd("serve", str(image), "--port", "0"), check=False, timeout=60)
        assert proc.returncode == 1 and 'Failed to get "write" lock' in proc.stderr, proc.stderr
        reader = start_server([str(image), "--read-only"], tmp_path / "r.log")
        try:
            out = run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x3c 0 64k", reader.uri])
            assert "verification failed" not in out.stdout, out.stdout
            run(tapnbd_cmd("info", str(image)))
        finally:
            assert reader.stop() == 0


def test_a_served_overlay_protects_its_backing_file(tmp_path: Path, image: Path) -> None:
    """QEMU unshares writes on a backing file: changing it would change the overlay's
    disk under its guest. tapnbd's backing files are locked the same way."""
    top = tmp_path / "top.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "qcow2", str(top)])
    server = start_server([str(top), "--format", "qcow2"], tmp_path / "s.log")
    try:
        io = run(["qemu-io", "-f", "qcow2", "-c", "write 0 4k", str(image)], check=False)
        assert 'Failed to get "write" lock' in io.stderr + io.stdout, io
        proc = run(tapnbd_cmd("resize", str(image), "32M"), check=False)
        assert proc.returncode == 1 and '"write" lock' in proc.stderr, proc.stderr
        run(["qemu-img", "info", str(image)])  # readers share it
    finally:
        assert server.stop() == 0
    run(["qemu-io", "-f", "qcow2", "-c", "write 0 4k", str(image)])


def test_share_stops_nobody_but_shows_its_use(tmp_path: Path, image: Path) -> None:
    """serve's --share (qemu's locking=off for the admin who means it): it opens beside
    a QEMU reader, and a QEMU reader without -U still learns that a writer is there."""
    with qemu_nbd(image, "-f", "qcow2", "-r"):
        shared = start_server([str(image), "--share"], tmp_path / "s.log")
        try:
            qemu_io(shared.uri, "read -P 0x3c 0 64k")
        finally:
            assert shared.stop() == 0
    shared = start_server([str(image), "--share"], tmp_path / "s2.log")
    try:
        info = run(["qemu-img", "info", str(image)], check=False)
        assert 'Failed to get shared "write" lock' in info.stderr, info
    finally:
        assert shared.stop() == 0
