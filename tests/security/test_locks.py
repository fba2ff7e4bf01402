"""Tools that write an image take its lock first (issue 11).

A server holds QEMU's writer locks on every image it has open for writing, raw ones
included (formats.locks; tests/security/test_qemu_locks.py has QEMU as the referee).
``create`` and ``convert`` take the same locks before they change a byte, so an image
in use is refused and left byte-for-byte as it was.
"""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import pytest

from tests.helpers import qemu_io, run, start_server, tapnbd_cmd

MiB = 1 << 20


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def live(tmp_path: Path) -> tuple[Path, Path]:
    """A qcow and a raw image, each with data in it."""
    qcow, raw = tmp_path / "live.qcow", tmp_path / "live.raw"
    run(tapnbd_cmd("create", "-f", "qcow", "-s", "8M", str(qcow)))
    run(tapnbd_cmd("create", "-f", "raw", "-s", "8M", str(raw)))
    qemu_io(qcow, "write -P 0x5c 1M 64k", fmt="qcow")
    qemu_io(raw, "write -P 0x5c 1M 64k")
    return qcow, raw


@pytest.mark.parametrize(
    "tool",
    [
        "create-qcow",
        "create-raw",
        "convert-qcow",
        "convert-raw",
    ],
)
def test_tools_refuse_a_served_image_and_leave_it_intact(
    tmp_path: Path, live: tuple[Path, Path], tool: str
) -> None:
    qcow, raw = live
    src = tmp_path / "src.raw"
    src.write_bytes(b"S" * MiB)
    server = start_server([str(qcow), str(raw)], tmp_path / "serve.log", exports=2)
    try:
        before = {p: digest(p) for p in (qcow, raw)}
        for target in (qcow, raw):
            cmd = {
                "create-qcow": ["create", "-f", "qcow", "-s", "1M", str(target)],
                "create-raw": ["create", "-f", "raw", "-s", "1M", str(target)],
                "convert-qcow": ["convert", "-q", "-f", "raw", str(src), str(target)],
                "convert-raw": ["convert", "-q", "-f", "raw", "-O", "raw", str(src), str(target)],
            }[tool]
            proc = run(tapnbd_cmd(*cmd), check=False)
            assert proc.returncode == 1, proc.stdout
            assert "in use" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert {p: digest(p) for p in (qcow, raw)} == before
        qemu_io(server.uris[0], "read -P 0x5c 1M 64k")  # still served, still there
    finally:
        assert server.stop() == 0


def test_second_writer_is_refused_until_the_first_exits(
    tmp_path: Path, live: tuple[Path, Path]
) -> None:
    """Raw images are locked too; a reader is refused as well, unless it shares (as
    --share does for a writer too); once the first server has exited, its successor
    opens the image (the handover)."""
    _, raw = live
    first = start_server([str(raw)], tmp_path / "first.log")
    try:
        proc = run(tapnbd_cmd("serve", str(raw), "--port", "0"), check=False, timeout=60)
        assert proc.returncode == 1 and "in use" in proc.stderr, proc.stderr
        proc = run(tapnbd_cmd("serve", str(raw), "-r", "--port", "0"), check=False, timeout=60)
        assert proc.returncode == 1 and "in use" in proc.stderr, proc.stderr
        reader = start_server([str(raw), "--read-only", "--share"], tmp_path / "reader.log")
        assert reader.stop() == 0
        shared = start_server([str(raw), "--share"], tmp_path / "shared.log")
        assert shared.stop() == 0
        qemu_io(first.uri, "write -P 0x77 0 4k")
    finally:
        assert first.stop(signal.SIGTERM) == 0
    second = start_server([str(raw)], tmp_path / "second.log")
    try:
        qemu_io(second.uri, "read -P 0x77 0 4k")
    finally:
        assert second.stop() == 0


def test_force_share_skips_the_lock(tmp_path: Path, live: tuple[Path, Path]) -> None:
    """``-U`` is the admin saying "I know": create then rewrites the image in use."""
    _, raw = live
    server = start_server([str(raw)], tmp_path / "serve.log")
    try:
        run(tapnbd_cmd("create", "-f", "raw", "-s", "2M", "-U", str(raw)))
        assert raw.stat().st_size == 2 * MiB
    finally:
        server.stop()


def test_convert_onto_a_new_file_still_works(tmp_path: Path, live: tuple[Path, Path]) -> None:
    qcow, _ = live
    out = tmp_path / "copy.raw"
    run(tapnbd_cmd("convert", "-q", "-f", "qcow", "-O", "raw", str(qcow), str(out)))
    qemu_io(out, "read -P 0x5c 1M 64k")
