"""Bounded memory against hostile clients (issue 11).

A client that pipelines 100 READs of 32 MiB and never reads a reply used to drive the
server to 3.2 GiB (four of them to 9.9 GiB; nbdkit and qemu-nbd stop at ~520 MiB). The
server now stops decoding a connection's requests while its reply backlog is over a
bound, and charges every request's payload to a server-wide budget. These tests flood
a real ``tapnbd serve`` over raw sockets, wait until the server says it has stopped
decoding each flooding connection (its log), and read its peak RSS (VmHWM).
"""

from __future__ import annotations

import random
import signal
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.helpers import Server, nbdsh_script, need, run
from tests.server import rawclient as rc
from tests.server.flood import MiB, open_flood, vm_kib

#: The goal: one hostile connection costs at most this much RSS, whole process included.
ONE_CONN_BOUND = 256 * MiB
#: Four of them, with the default 256 MiB budget shared between them.
FOUR_CONN_BOUND = 512 * MiB
#: What is left once the flooders are gone (baseline ~45 MiB and the buffer pool, 64).
AFTER_BOUND = 160 * MiB

NBDSH_READ = r"""
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print(json.dumps(len(h.pread(1 << 20, 0))))
"""


@pytest.fixture
def data_image(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    """A 64 MiB raw image of seeded random bytes (no holes: every read is real data)."""
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    data = random.Random(seed).randbytes(64 * MiB)
    path = tmp_path / "data.img"
    path.write_bytes(data)
    yield path, data


def hwm(server: Server) -> int:
    return vm_kib(server.proc.pid, "VmHWM") * 1024


def wait_paused(server: Server, socks: list[socket.socket], why: str = "reply backlog") -> None:
    """Wait until the server logs that it stopped decoding each of ``socks``."""
    for s in socks:
        server.wait_for_log(f"{s.getsockname()}: decoding paused: {why}")


def test_one_flooding_connection_is_bounded(
    serve: Callable[..., Server], data_image: tuple[Path, bytes]
) -> None:
    need("nbdinfo")
    server = serve(str(data_image[0]), "--format", "raw", "--verbose")
    flood = open_flood(server.uri, reads=100, length=32 * MiB)
    wait_paused(server, [flood])
    # The loop is not busy building replies: another client is served meanwhile.
    assert nbdsh_script(NBDSH_READ, server.uri) == 1 << 20
    peak = hwm(server)
    print(f"one connection, 100 x 32 MiB READs unread: VmHWM {peak / MiB:.0f} MiB")
    assert peak < ONE_CONN_BOUND
    flood.close()
    # After the client leaves nothing more is built for it, and RSS comes back down.
    run(["nbdinfo", server.uri])
    rss = vm_kib(server.proc.pid, "VmRSS") * 1024
    print(f"after it left: VmRSS {rss / MiB:.0f} MiB")
    assert rss < AFTER_BOUND


def test_four_flooding_connections_then_sigterm(
    serve: Callable[..., Server], data_image: tuple[Path, bytes]
) -> None:
    need("nbdinfo")
    server = serve(str(data_image[0]), "--format", "raw", "--verbose")
    floods = [open_flood(server.uri, reads=100, length=32 * MiB) for _ in range(4)]
    wait_paused(server, floods)
    run(["nbdinfo", server.uri])
    peak = hwm(server)
    print(f"four connections, 4 x 100 x 32 MiB READs unread: VmHWM {peak / MiB:.0f} MiB")
    assert peak < FOUR_CONN_BOUND
    # SIGTERM with the flooders still connected, replies unread: the server still ends
    # (the wait is only a hang guard; the drain itself is bounded by the in-flight cap).
    assert server.stop(signal.SIGTERM, timeout=60) == 0
    for s in floods:
        s.close()


def read_reply(sock: socket.socket, length: int) -> tuple[int, int, bytearray]:
    """(error, cookie, data) of a simple reply to a READ of ``length`` bytes."""
    magic, err, cookie = struct.unpack(">IIQ", rc.recv_exact(sock, 16))
    assert magic == rc.SIMPLE_MAGIC, hex(magic)
    buf = bytearray(length if err == 0 else 0)
    view = memoryview(buf)
    while view:
        n = sock.recv_into(view)
        if not n:
            raise ConnectionError("closed mid-reply")
        view = view[n:]
    return err, cookie, buf


def test_paused_connections_answer_every_request(
    serve: Callable[..., Server], data_image: tuple[Path, bytes]
) -> None:
    """Stopping and resuming decoding loses nothing: under a budget of 16 MiB shared by
    three connections that each pipeline 24 READs of 8 MiB, every READ is answered
    with the right bytes, each connection read to the end in turn."""
    path, data = data_image
    # Reads take 20 ms (a slow disk), so they are in flight long enough to spend it.
    server = serve(
        str(path), "--format", "raw", "--verbose", "--payload-budget", "16M", "--delay", "read=20ms"
    )
    length, reads = 8 * MiB, 24
    socks = [open_flood(server.uri, reads=reads, length=length) for _ in range(3)]
    wait_paused(server, socks[1:], why="server's payload budget")
    for s in socks:
        s.settimeout(60)
        got = {}
        for _ in range(reads):
            err, cookie, buf = read_reply(s, length)
            assert err == 0
            off = (cookie % (len(data) // length)) * length
            got[cookie] = buf == data[off : off + length]
        assert sorted(got) == list(range(reads)) and all(got.values())
        rc.request(s, rc.CMD_DISC, 0, 0)
        assert rc.closed_by_peer(s)


@pytest.mark.parametrize("structured", [True, False])
def test_hole_reads_do_not_allocate(serve: Callable[..., Server], structured: bool) -> None:
    """READs of a hole are answered from the driver's extents: an OFFSET_HOLE chunk, or
    the shared zeros, never a fresh 32 MiB buffer each."""
    server = serve("ram:4G", "--verbose")
    base = hwm(server)
    reads = 100 if structured else 10
    s = open_flood(server.uri, reads=reads, length=32 * MiB, structured=structured)
    s.settimeout(60)
    for _ in range(reads):
        if structured:
            magic, flags, typ, _cookie, n = struct.unpack(">IHHQI", rc.recv_exact(s, 20))
            assert (magic, flags, typ, n) == (rc.STRUCTURED_MAGIC, 1, 2, 12)  # DONE, HOLE
            _offset, size = struct.unpack(">QI", rc.recv_exact(s, 12))
            assert size == 32 * MiB
        else:
            err, _cookie, buf = read_reply(s, 32 * MiB)
            assert err == 0 and buf.count(0) == len(buf)
            del buf
    peak = hwm(server)
    print(
        f"{reads} x 32 MiB hole READs, structured={structured}: "
        f"VmHWM {base / MiB:.0f} -> {peak / MiB:.0f} MiB"
    )
    # Without the hole path every READ allocates (and fills) 32 MiB, ram's bytearray.
    assert peak - base < 16 * MiB
    rc.request(s, rc.CMD_DISC, 0, 0)
    assert rc.closed_by_peer(s)


def test_write_payloads_wait_for_the_budget(serve: Callable[..., Server], tmp_path: Path) -> None:
    """WRITE payloads being received are charged before their buffers exist: a client
    that pipelines twelve 32 MiB WRITEs to a slow disk (100 ms a write) has at most the
    budget's worth of them in memory, and every one is still done."""
    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        f.truncate(12 * 32 * MiB)
    server = serve(
        str(image),
        "--format",
        "raw",
        "--verbose",
        "--payload-budget",
        "48M",
        "--delay",
        "write=100ms",
    )
    base = hwm(server)
    u = urlparse(server.uri)
    assert u.hostname and u.port
    s = rc.connect(u.hostname, u.port, timeout=60)
    rc.greet(s)
    rc.go(s, "big.img")
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    payload = random.Random(seed).randbytes(32 * MiB)

    def send() -> None:
        for i in range(12):
            rc.request(s, rc.CMD_WRITE, i * 32 * MiB, 32 * MiB, cookie=i, payload=payload)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    server.wait_for_log(f"{s.getsockname()}: decoding paused: server's payload budget")
    replies = sorted(rc.simple_reply(s)[:2] for _ in range(12))
    assert replies == [(0, i) for i in range(12)]
    sender.join(60)
    peak = hwm(server)
    print(f"12 x 32 MiB WRITEs, 48 MiB budget: VmHWM {base / MiB:.0f} -> {peak / MiB:.0f} MiB")
    # The budget (48) and the pool (64 at most) over the baseline; all twelve would be 384.
    assert peak - base < 160 * MiB
    with open(image, "rb") as written:
        written.seek(11 * 32 * MiB)
        assert written.read(32 * MiB) == payload


def test_sigterm_with_a_write_half_received(serve: Callable[..., Server]) -> None:
    """A WRITE admitted while its payload is still arriving is not waited for at
    shutdown: the server stops reading, so it would never complete (it held the drain
    for its whole 30 s timeout)."""
    server = serve("ram:64M", "--verbose")
    u = urlparse(server.uri)
    assert u.hostname and u.port
    s = rc.connect(u.hostname, u.port)
    rc.greet(s)
    rc.go(s, "ram")
    rc.request(s, rc.CMD_READ, 0, 4096, cookie=1)
    assert rc.simple_reply(s, 4096)[0] == 0  # in transmission, served
    rc.request(s, rc.CMD_WRITE, 0, 1 << 20, cookie=2, payload=b"x" * 1000)  # 1 MiB promised
    assert server.stop(signal.SIGTERM, timeout=60) == 0
    assert "did not drain" not in server.stderr()
    s.close()


def test_injected_read_faults_still_reach_hole_reads(serve: Callable[..., Server]) -> None:
    """The hole path answers from extents without reading, but not past a fault filter
    that must see every read: a 1 MiB READ of a hole still gets the injected EIO."""
    server = serve("ram:64M", "--inject-error", "EIO:100%:read")
    script = r"""
import errno, json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
try:
    h.pread(1 << 20, 0)
    print(json.dumps("OK"))
except nbd.Error as e:
    print(json.dumps(errno.errorcode.get(e.errno, str(e.errno))))
"""
    assert nbdsh_script(script, server.uri) == "EIO"
