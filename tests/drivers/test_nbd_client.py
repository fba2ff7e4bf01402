"""The nbd driver: tapnbd as a client of nbdkit, qemu-nbd and another tapnbd (a proxy)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    Server,
    fio_verify,
    need,
    qemu_io,
    run,
    start_server,
    stop_process,
    tapnbd_cmd,
)
from tests.server.test_tls import pki, tls_args  # noqa: F401  (pki is a fixture)

MiB = 1 << 20


def unix_uri(sock: Path, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def stop_all_threads(pid: int, timeout: float = 30) -> None:
    """SIGSTOP ``pid`` and return once every thread of it is stopped: kill(2) returns
    before a thread running on another CPU stops, and meanwhile it may still answer."""
    import time

    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if states and all(st in ("T", "t") for st in states):
            return
        assert time.monotonic() < deadline, f"pid {pid} not stopped: {states}"
        os.sched_yield()


def wait_for_socket(sock: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Until the upstream accepts connections (nbdkit and qemu-nbd print nothing)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"upstream exited {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
                return
        except OSError:
            time.sleep(0.05)  # the upstream gives no readiness signal we can wait on
    raise AssertionError("upstream not listening")


@pytest.fixture
def nbdkit_memory(tmp_path: Path) -> Iterator[Path]:
    need("nbdkit")
    sock = tmp_path / "nbdkit.sock"
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "memory", "64M"])
    wait_for_socket(sock, proc)
    yield sock
    proc.terminate()
    proc.wait(10)


def map_of(uri: str) -> list[tuple[int, int, int]]:
    return [
        (e["offset"], e["length"], e["type"])
        for e in json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    ]


def test_proxy_to_nbdkit(nbdkit_memory: Path, tmp_path: Path) -> None:
    upstream = unix_uri(nbdkit_memory)
    proxy = start_server(
        [upstream, "--name", "up", "--socket", str(tmp_path / "p.sock")], tmp_path / "p.log"
    )
    try:
        qemu_io(proxy.uri, "write -P 0x33 1M 2M", "write -z 8M 1M", "flush")
        qemu_io(proxy.uri, "read -P 0x33 1M 2M", "read -P 0 8M 1M")
        # The writes are upstream, and block status passes through unchanged.
        qemu_io(upstream, "read -P 0x33 1M 2M")
        assert map_of(proxy.uri) == map_of(upstream)
        assert (1 << 20, 2 << 20, 0) in map_of(proxy.uri)
        qemu_io(proxy.uri, "discard 1M 2M")
        assert map_of(proxy.uri) == map_of(upstream)
    finally:
        proxy.stop()


def test_proxy_to_qemu_nbd_qcow2_with_fio_verify(tmp_path: Path) -> None:
    need("qemu-nbd", "qemu-img")
    image = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(image), "64M"])
    sock = tmp_path / "q.sock"
    qemu = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", str(sock), "-x", "q", str(image)])
    try:
        wait_for_socket(sock, qemu)
        proxy = start_server(
            [unix_uri(sock, "q"), "--socket", str(tmp_path / "p.sock")], tmp_path / "p.log"
        )
        try:
            job = fio_verify(proxy.uri, "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=8m")
            assert job["error"] == 0
        finally:
            proxy.stop()
    finally:
        qemu.terminate()
        qemu.wait(10)
    run(["qemu-img", "check", str(image)])


def test_chain_of_two_tapnbd_servers_uses_multi_conn(tmp_path: Path) -> None:
    raw = tmp_path / "base.img"
    raw.write_bytes(bytes(32 * MiB))
    first = start_server([str(raw), "--socket", str(tmp_path / "a.sock")], tmp_path / "a.log")
    second = start_server(
        [first.uri, "--name", "b", "--socket", str(tmp_path / "b.sock")], tmp_path / "b.log"
    )
    seed = random.randrange(1 << 30)
    print(f"seed={seed}")
    rng = random.Random(seed)
    try:
        writes = [(rng.randrange(1, 255), rng.randrange(0, 31) * MiB) for _ in range(8)]
        qemu_io(second.uri, *(f"write -P {p} {o} 64k" for p, o in writes), "flush")
        info = json.loads(run(["nbdinfo", "--json", second.uri]).stdout)["exports"][0]
        assert info["can_multi_conn"] is True
        # The upstream allows multi-conn, so the client side opened several connections.
        facts = json.loads(run(tapnbd_cmd("info", "--json", first.uri)).stdout)
        assert facts["connections"] == 4
    finally:
        second.stop()
        first.stop()
    data = raw.read_bytes()
    expected: dict[int, int] = {}
    for p, o in writes:
        expected[o] = p
    for o, p in expected.items():
        assert data[o : o + 65536] == bytes([p]) * 65536


def test_convert_from_and_to_an_export(nbdkit_memory: Path, tmp_path: Path) -> None:
    upstream = unix_uri(nbdkit_memory)
    qemu_io(upstream, "write -P 0x44 0 1M", "write -P 0x55 40M 64k")
    out = tmp_path / "copy.qcow"
    run(tapnbd_cmd("convert", "-q", upstream, str(out)))
    run(["qemu-img", "compare", "-f", "qcow", "-F", "raw", str(out), upstream])
    # Into an export that already holds data: its zero runs are written too.
    src = tmp_path / "src.img"
    src.write_bytes(b"\x66" * MiB + bytes(63 * MiB))
    run(tapnbd_cmd("convert", "-q", "-f", "raw", str(src), upstream))
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), upstream])


def test_info_and_qcow_backing_over_nbd(nbdkit_memory: Path, tmp_path: Path) -> None:
    upstream = unix_uri(nbdkit_memory)
    qemu_io(upstream, "write -P 0x77 0 2M")
    info = json.loads(run(tapnbd_cmd("info", "--json", upstream)).stdout)
    assert info["format"] == "nbd" and info["virtual-size"] == 64 * MiB
    overlay = tmp_path / "o.qcow"
    run(tapnbd_cmd("create", str(overlay), "-b", upstream))  # the admin's name: opened
    # The header names an NBD export: followed only when the admin says so.
    refused = run(tapnbd_cmd("info", "-f", "qcow", str(overlay)), check=False)
    assert refused.returncode != 0 and "--allow-remote-backing" in refused.stderr
    server = start_server(
        [
            str(overlay),
            "--format",
            "qcow",
            "--allow-remote-backing",
            "--socket",
            str(tmp_path / "o.sock"),
        ],
        tmp_path / "o.log",
    )
    try:
        qemu_io(server.uri, "read -P 0x77 0 2M", "write -P 0x78 0 4k", "flush")
    finally:
        server.stop()
    qemu_io(upstream, "read -P 0x77 0 2M")  # the backing export is untouched


def test_tls_upstream(pki: Path, tmp_path: Path) -> None:  # noqa: F811
    raw = tmp_path / "t.img"
    raw.write_bytes(bytes(4 * MiB))
    upstream = start_server(
        [str(raw), "--bind", "127.0.0.1", "--port", "0", *tls_args(pki, "require")],
        tmp_path / "u.log",
    )
    try:
        port = upstream.uri.split(":")[2].split("/")[0]
        uri = f"nbds://localhost:{port}/t.img?tls-certificates={pki}"
        qemu_io_via = start_server(
            [uri, "--name", "p", "--socket", str(tmp_path / "p.sock")], tmp_path / "p.log"
        )
        try:
            qemu_io(qemu_io_via.uri, "write -P 9 0 64k", "flush", "read -P 9 0 64k")
        finally:
            qemu_io_via.stop()
        # Without the CA the upstream's certificate is not trusted: a one-line error.
        bad = run(tapnbd_cmd("info", f"nbds://localhost:{port}/t.img"), check=False)
        assert bad.returncode == 1 and "certificate" in bad.stderr.lower(), bad.stderr
    finally:
        upstream.stop()
    assert raw.read_bytes()[:65536] == b"\x09" * 65536


def test_hostile_upstream_gives_eio_not_a_crash(tmp_path: Path) -> None:
    """An upstream that answers a READ with garbage: the proxy's client gets EIO, and the
    proxy stays up."""
    sock = tmp_path / "evil.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.listen(4)

    def evil() -> None:
        import struct

        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
                conn.recv(4)  # client flags
                buf = b""
                while True:  # answer every option: ACK, then INFO(EXPORT) + ACK for GO
                    while len(buf) < 16:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        buf += chunk
                    if len(buf) < 16:
                        break
                    _, opt, n = struct.unpack(">QII", buf[:16])
                    buf = buf[16 + n :]
                    if opt == 7:  # GO
                        info = struct.pack(">HQH", 0, 1 << 20, 1 | 4)
                        conn.sendall(
                            struct.pack(">QIII", 0x3E889045565A9, opt, 3, len(info)) + info
                        )
                        conn.sendall(struct.pack(">QIII", 0x3E889045565A9, opt, 1, 0))
                        break
                    conn.sendall(struct.pack(">QIII", 0x3E889045565A9, opt, (1 << 31) + 1, 0))
                conn.recv(28)  # a request
                conn.sendall(b"\xde\xad\xbe\xef" * 8)  # not a reply

    t = threading.Thread(target=evil, daemon=True)
    t.start()
    proxy: Server | None = None
    try:
        proxy = start_server(
            [unix_uri(sock), "--name", "e", "--socket", str(tmp_path / "p.sock")],
            tmp_path / "p.log",
        )
        failed = run(["qemu-io", "-f", "raw", "-c", "read 0 4k", proxy.uri], check=False)
        assert "Input/output error" in failed.stdout + failed.stderr, failed
        assert proxy.proc.poll() is None
    finally:
        if proxy is not None:
            # qemu-io's FLUSH at its exit met the broken upstream too: nothing proves
            # the image consistent, and the exit status says so.
            assert stop_process(proxy.proc, 15, 30) == 1
        listener.close()


def bitmap_map(uri: str, name: str) -> list[tuple[int, int, int]]:
    out = run(["nbdinfo", f"--map=qemu:dirty-bitmap:{name}", "--json", uri]).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def test_proxy_offers_the_upstreams_dirty_bitmap_live(tmp_path: Path) -> None:
    """qemu-nbd -B b0 upstream, tapnbd serve nbd://... -B b0 in front: the bitmap reads
    the same through both, and a write through the proxy shows up dirty in it."""
    need("qemu-nbd", "qemu-img", "qemu-io", "nbdinfo")
    image = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"])
    run(["qemu-img", "bitmap", "--add", str(image), "b0"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 1M 64k", str(image)])
    sock = tmp_path / "q.sock"
    args = ["-t", "-e", "8", "-f", "qcow2", "-B", "b0", "-k", str(sock), "-x", "q", str(image)]
    qemu = subprocess.Popen(["qemu-nbd", *args])
    try:
        wait_for_socket(sock, qemu)
        upstream = unix_uri(sock, "q")
        refused = run(tapnbd_cmd("serve", upstream, "-B", "nope", "--port", "0"), check=False)
        assert refused.returncode != 0 and "'nope'" in refused.stderr, refused.stderr
        proxy = start_server(
            [upstream, "--socket", str(tmp_path / "p.sock"), "-B", "b0"], tmp_path / "p.log"
        )
        try:
            assert bitmap_map(proxy.uri, "b0") == bitmap_map(upstream, "b0")
            assert (1 * MiB, 64 << 10, 1) in bitmap_map(proxy.uri, "b0")
            qemu_io(proxy.uri, "write -P 2 8M 64k", "flush")
            assert (8 * MiB, 64 << 10, 1) in bitmap_map(proxy.uri, "b0")
            assert bitmap_map(proxy.uri, "b0") == bitmap_map(upstream, "b0")
        finally:
            proxy.stop()
    finally:
        qemu.terminate()
        qemu.wait(10)


async def test_an_upstream_that_stops_reading_stops_our_sending(tmp_path: Path) -> None:
    """The attacker: an upstream server that stops reading its socket (here nbdkit,
    stopped with SIGSTOP; a hostile one would also answer each WRITE unread, so that
    our clients' writes complete and send more). Each connection then holds at most
    one request past its transport's high-water mark; the rest wait unsent, with their
    clients' payloads charged to the server's budget, instead of piling up in memory.
    Once it reads again, every write lands."""
    from formats.nbd import NbdDriver

    need("nbdkit")
    sock = tmp_path / "up.sock"
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "memory", "128M"])
    wait_for_socket(sock, proc)
    drv = await NbdDriver.open(unix_uri(sock), read_only=False)
    payload, n = 4 * MiB, 16
    try:
        stop_all_threads(proc.pid)
        tasks = [
            asyncio.create_task(drv.pwrite(i * payload, bytes([i + 1]) * payload)) for i in range(n)
        ]
        for _ in range(3):  # every task runs to its first wait (no clock involved)
            await asyncio.sleep(0)
        conns = drv._conns
        assert len(conns) > 1 and n > 2 * len(conns), "the test needs queued requests"
        for c in conns:
            assert c.transport is not None
            assert c.transport.get_write_buffer_size() <= payload + (64 << 10) + 32
        assert not any(t.done() for t in tasks)
        os.kill(proc.pid, signal.SIGCONT)
        await asyncio.gather(*tasks)
        for i in range(n):
            assert bytes(await drv.pread(i * payload, payload)) == bytes([i + 1]) * payload
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        await drv.close()
        proc.terminate()
        proc.wait(10)


async def test_block_status_gives_at_most_max_extents_and_the_proxy_asks_again(
    tmp_path: Path,
) -> None:
    """An upstream with more extents than one call gives (nbdkit sparse-random): the
    driver parses no more than MAX_EXTENTS of a reply, and a proxy's clients still see
    the upstream's whole map, the server asking again where a call stopped."""
    from formats.nbd import MAX_EXTENTS, NbdDriver

    need("nbdkit", "nbdinfo")
    sock = tmp_path / "up.sock"
    proc = subprocess.Popen(
        ["nbdkit", "-f", "-U", str(sock), "sparse-random", "128M", "runlength=8192", "seed=7"]
    )
    wait_for_socket(sock, proc)
    try:
        upstream = unix_uri(sock)
        assert len(map_of(upstream)) > 2 * MAX_EXTENTS, "the test needs a long map"
        drv = await NbdDriver.open(upstream, read_only=True)
        try:
            got = await drv.extents(0, drv.size())
            assert len(got) == MAX_EXTENTS and got[-1].offset + got[-1].length < drv.size()
        finally:
            await drv.close()
        proxy = start_server([upstream, "--socket", str(tmp_path / "p.sock")], tmp_path / "p.log")
        try:
            assert map_of(proxy.uri) == map_of(upstream)
        finally:
            assert proxy.stop() == 0
    finally:
        proc.terminate()
        proc.wait(10)


async def test_closing_gives_up_on_an_upstream_that_never_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream that never answers the last FLUSH (stopped with SIGSTOP) cannot keep a
    server from exiting: the close is given up at its deadline, with an error logged."""
    from formats.nbd import NbdDriver
    from tapnbd.backend import Backend

    need("nbdkit")
    sock = tmp_path / "up.sock"
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "memory", "16M"])
    wait_for_socket(sock, proc)
    try:
        backend = Backend(await NbdDriver.open(unix_uri(sock), read_only=False))
        await backend.driver.pwrite(0, b"x" * 4096)
        stop_all_threads(proc.pid)
        await backend.close_within("up", timeout=0.5)
        assert "closing did not finish in 0.5 s" in caplog.text
        assert backend.closed
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(10)


def test_exit_status_says_whether_the_last_flush_reached_the_upstream(tmp_path: Path) -> None:
    """A proxy whose upstream is gone by shutdown cannot flush what a client wrote: it
    exits with status 1, naming the export. With the upstream alive, status 0."""
    need("nbdkit", "qemu-io")
    for gone in (False, True):
        sock = tmp_path / f"up{gone}.sock"
        up = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "memory", "16M"])
        wait_for_socket(sock, up)
        try:
            proxy = start_server(
                [unix_uri(sock), "--socket", str(tmp_path / f"p{gone}.sock")],
                tmp_path / f"p{gone}.log",
            )
            qemu_io(proxy.uri, "write -P 0x21 0 64k")
            if gone:
                up.kill()
                up.wait(10)
            proxy.proc.send_signal(signal.SIGTERM)
            assert proxy.proc.wait(60) == (1 if gone else 0), proxy.stderr()
            said = "exiting with status 1: 'nbd' not closed cleanly" in proxy.stderr()
            assert said == gone, proxy.stderr()
        finally:
            if up.poll() is None:
                up.terminate()
            up.wait(10)


def test_sigterm_exits_when_the_upstream_never_answers_the_last_flush(tmp_path: Path) -> None:
    """The attacker, end to end: a proxy's upstream stops answering (nbdkit under
    SIGSTOP) after a write, so the shutdown's last FLUSH never returns. The server gives
    the close up at its deadline (CLOSE_TIMEOUT, 30 s), says so, and exits with status 1:
    what the client wrote may not be in the image."""
    from tapnbd.backend import CLOSE_TIMEOUT

    need("nbdkit")
    sock = tmp_path / "up.sock"
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "memory", "16M"])
    wait_for_socket(sock, proc)
    try:
        proxy = start_server(
            [unix_uri(sock), "--socket", str(tmp_path / "p.sock")], tmp_path / "p.log"
        )
        qemu_io(proxy.uri, "write -P 0x21 0 64k")
        stop_all_threads(proc.pid)
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(CLOSE_TIMEOUT + 60) == 1
        assert f"closing did not finish in {CLOSE_TIMEOUT:g} s" in proxy.stderr()
        assert "exiting with status 1: 'nbd' not closed cleanly" in proxy.stderr()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(10)
