"""The ``serve`` command: transports, URIs, pidfile, errors, and clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, urlparse

from tests.helpers import Server, nbdsh_script, need, run, tapnbd_cmd


def test_unix_socket_and_pidfile(
    serve: Callable[..., Server], raw_image: Path, tmp_path: Path
) -> None:
    need("nbdinfo")
    sock = tmp_path / "nbd.sock"
    pid = tmp_path / "tapnbd.pid"
    server = serve(str(raw_image), "--socket", str(sock), "--pidfile", str(pid), "--name", "disk")
    assert server.uri == f"nbd+unix:///disk?socket={sock}"
    assert int(pid.read_text()) == server.proc.pid
    assert run(["nbdinfo", "--size", server.uri]).stdout.strip() == str(64 << 20)
    assert server.stop() == 0
    assert not pid.exists() and not sock.exists()


def test_a_socket_path_with_odd_characters_is_encoded_in_the_uri(
    serve: Callable[..., Server], raw_image: Path, tmp_path: Path
) -> None:
    """libnbd and QEMU unescape ``?socket=``, and ``&`` or ``#`` would end it."""
    need("nbdinfo", "qemu-img")
    where = tmp_path / "my disks & 100%20+#1"
    where.mkdir()
    sock = where / "nbd.sock"
    server = serve(str(raw_image), "--socket", str(sock), "--name", "disk")
    assert server.uri == f"nbd+unix:///disk?socket={quote(str(sock), safe='/')}"
    assert run(["nbdinfo", "--size", server.uri]).stdout.strip() == str(64 << 20)
    info = json.loads(run(["qemu-img", "info", "--output=json", server.uri]).stdout)
    assert info["virtual-size"] == 64 << 20
    assert server.stop() == 0


def test_unix_and_tcp_together(serve: Callable[..., Server], tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    server = serve("ram:1M", "--socket", str(sock), "--port", "0", exports=2)
    assert server.uris[0].startswith("nbd+unix://") and server.uris[1].startswith("nbd://")


def test_sigterm_finishes_requests_and_flushes(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    need("qemu-io")
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(8 << 20))
    server = serve(str(disk))
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 0 4M", server.uri])
    assert server.stop(signal.SIGTERM) == 0
    assert disk.read_bytes()[: 4 << 20] == b"\x42" * (4 << 20)
    server2 = serve(str(disk))
    assert server2.stop(signal.SIGINT) == 0


def test_shutdown_while_clients_are_connected(serve: Callable[..., Server]) -> None:
    need("fio")
    server = serve("ram:64M")
    fio = subprocess.Popen(
        [
            "fio",
            "--name=j",
            "--ioengine=nbd",
            f"--uri={server.uri}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=64m",
            "--time_based",
            "--runtime=30",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        threading.Event().wait(1.0)
        assert server.stop(signal.SIGTERM, timeout=20) == 0
    finally:
        fio.kill()
        fio.wait()


def test_port_zero_picks_a_free_port(serve: Callable[..., Server]) -> None:
    server = serve("ram:1M", "--port", "0")
    assert (urlparse(server.uri).port or 0) > 0


def test_errors_are_one_line_and_nonzero(tmp_path: Path) -> None:
    def fails(*args: str) -> str:
        proc = run(tapnbd_cmd("serve", *args), check=False, timeout=30)
        assert proc.returncode != 0, proc
        return proc.stderr.strip()

    assert "no such file" in fails(str(tmp_path / "missing.img"), "--port", "0")
    unreadable = tmp_path / "dir.img"
    unreadable.mkdir()
    assert "dir.img" in fails(str(unreadable), "--port", "0")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        assert "cannot listen" in fails("ram:1M", "--port", str(port))
    finally:
        taken.close()
    assert "--name" in fails("ram:1M", "ram:2M", "--name", "x", "--port", "0")
    assert fails("ram:1M", "--tls", "bogus")  # typer's own message
    assert "needs --tls-cert" in fails("ram:1M", "--tls", "require", "--port", "0")
    assert "invalid size" in fails("ram:lots", "--port", "0")
    assert "invalid size" in fails("ram:1M", "--payload-budget", "0", "--port", "0")
    assert "at least 1" in fails("ram:1M", "--max-handshakes", "0", "--port", "0")
    for err in (fails(str(tmp_path / "missing.img"), "--port", "0"),):
        assert len(err.splitlines()) == 1


def test_socket_activation_captive(tmp_path: Path) -> None:
    """nbdinfo's ``[ CMD ]`` form starts the server with LISTEN_FDS (systemd activation)."""
    need("nbdinfo")
    out = run(["nbdinfo", "--json", "--", "[", *tapnbd_cmd("serve", "ram:2M"), "]"]).stdout
    info = json.loads(out)
    assert info["exports"][0]["export-size"] == 2 << 20


def test_read_only_serve_leaves_image_untouched(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    need("qemu-io")
    disk = tmp_path / "ro.img"
    data = os.urandom(1 << 20)
    disk.write_bytes(data)
    server = serve(str(disk), "--read-only")
    proc = run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", server.uri], check=False)
    assert proc.returncode != 0 or "failed" in proc.stdout + proc.stderr
    assert disk.read_bytes() == data


ESHUTDOWN_SCRIPT = """
import errno, json, os, signal, sys, time
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pread(4096, 0)
os.kill(int(sys.argv[2]), signal.SIGTERM)
reads, err = 0, None
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        h.pread(4096, 0)
        reads += 1
    except nbd.Error as e:
        err = e.errno
        break
h.shutdown()
print(json.dumps({"errno": err, "reads": reads}))
"""


def test_requests_during_shutdown_get_eshutdown(serve: Callable[..., Server]) -> None:
    """A request that arrives while the server drains is answered, with ESHUTDOWN."""
    server = serve("ram:1M")
    res = nbdsh_script(ESHUTDOWN_SCRIPT, server.uri, str(server.proc.pid))
    assert isinstance(res, dict)
    assert res["errno"] == "ESHUTDOWN", res  # libnbd names the errno
    assert server.proc.wait(30) == 0


def test_one_writer_per_image(serve: Callable[..., Server], tmp_path: Path) -> None:
    """A second writable open of an image is refused (two qcow writers would corrupt it),
    and so is a reader (its data would change under it) unless it shares (-U, --share,
    as qemu); the lock goes with the process, even on kill -9."""
    need("nbdinfo")
    image = tmp_path / "w.qcow"
    run(tapnbd_cmd("create", str(image), "--size", "16M"))
    first = serve(str(image))
    second = run(tapnbd_cmd("serve", str(image), "--port", "0"), check=False, timeout=30)
    assert second.returncode != 0
    assert "in use" in second.stderr and "w.qcow" in second.stderr
    refused = run(tapnbd_cmd("serve", str(image), "-r", "--port", "0"), check=False)
    assert refused.returncode != 0 and 'shared "write" lock' in refused.stderr, refused.stderr
    reader = serve(str(image), "--read-only", "--share")
    assert run(["nbdinfo", "--size", reader.uri]).stdout.strip() == str(16 << 20)
    assert run(tapnbd_cmd("info", str(image)), check=False).returncode == 1
    assert run(tapnbd_cmd("info", "-U", str(image))).returncode == 0
    first.stop(signal.SIGKILL)
    again = serve(str(image))
    assert run(["nbdinfo", "--size", again.uri]).stdout.strip() == str(16 << 20)
