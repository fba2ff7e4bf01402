"""Big READs served by a connection's I/O threads (tapnbd.server.iothreads, issue 15).

Each test waits for the server's "big reads go to I/O threads" line, so it knows the
threads, not the loop, served what it checks. Clients are fio, nbdcopy and a raw
socket whose strict reply parser would see any reply interleaved with another's bytes.
"""

from __future__ import annotations

import filecmp
import os
import random
import signal
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from formats.raw import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from tests.helpers import Server, fio_verify, nbdsh_script, need, run, tapnbd_cmd
from tests.server import rawclient as rc
from tests.server.flood import MiB, open_flood, vm_kib

THREADED = "big reads go to I/O threads"


def seeded_image(path: Path, size: int) -> bytes:
    """Seeded random bytes, with runs of zeros and a real hole (punched) in the middle,
    so structured replies carry HOLE chunks and the threads answer a hole unread."""
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(size))
    for _ in range(8):
        n = rnd.choice((64 << 10, 1 * MiB, 2 * MiB))
        at = rnd.randrange(0, size - n)
        data[at : at + n] = bytes(n)
    hole = size // 2
    data[hole : hole + 4 * MiB] = bytes(4 * MiB)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, hole, 4 * MiB)
    finally:
        os.close(fd)
    return bytes(data)


def test_fio_verify_1m_mixed_qd8(serve: Callable[..., Server], tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(128 * MiB))
    server = serve(str(disk), "--format", "raw", "--verbose")
    job = fio_verify(
        server.uri,
        "--rw=randrw",
        "--rwmixread=50",
        "--bs=1m",
        "--iodepth=8",
        "--numjobs=2",
        "--size=64m",
        "--offset_increment=64m",
        "--randseed=1515",
    )
    assert job["error"] == 0
    assert job["read"]["io_bytes"] >= 64 * MiB  # every block read back, and verified
    server.wait_for_log(THREADED)


def test_nbdcopy_round_trip(serve: Callable[..., Server], tmp_path: Path) -> None:
    need("nbdcopy")
    src, out = tmp_path / "src.img", tmp_path / "out.img"
    seeded_image(src, 48 * MiB)
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\xa5" * (48 * MiB))  # everything must be overwritten
    server = serve(str(disk), "--verbose")  # probed: the raw guard's reads go too
    run(["nbdcopy", "--request-size=1048576", str(src), server.uri])
    run(["nbdcopy", "--request-size=1048576", server.uri, str(out)])
    assert filecmp.cmp(src, out, shallow=False)
    server.wait_for_log(THREADED)


def test_replies_never_interleave(serve: Callable[..., Server], tmp_path: Path) -> None:
    """Pipelined READs of every size (loop and threads) and small WRITEs (replied by
    the loop while threads send): each reply is parsed strictly, in arrival order."""
    disk = tmp_path / "disk.img"
    data = bytearray(seeded_image(disk, 64 * MiB))
    server = serve(str(disk), "--format", "raw", "--verbose")
    u = server.uri.split("/")[2].rsplit(":", 1)
    sock = rc.connect(u[0], int(u[1]))
    rc.greet(sock)
    rc.go(sock, "disk.img")
    rnd = random.Random(len(data))
    expect: dict[int, tuple[int, int]] = {}  # cookie: (offset, length) of a READ
    writes: set[int] = set()
    burst = bytearray()
    # Writes land where no READ of this burst looks (the last MiB), each 4 KiB slot once:
    # overlapping commands in flight are unordered (NBD spec), so they never overlap.
    slots = rnd.sample(range(MiB // 4096), MiB // 4096)
    for cookie in range(300):
        if rnd.random() < 0.3:
            payload = rnd.randbytes(4096)
            off = len(data) - MiB + slots.pop() * 4096
            data[off : off + 4096] = payload
            burst += struct.pack(">IHHQQI", rc.REQUEST_MAGIC, 0, rc.CMD_WRITE, cookie, off, 4096)
            burst += payload
            writes.add(cookie)
        else:
            length = rnd.choice((4096, 65536, 128 << 10, 1 * MiB, 3 * MiB))
            off = rnd.randrange(0, len(data) - MiB - length)
            burst += struct.pack(">IHHQQI", rc.REQUEST_MAGIC, 0, rc.CMD_READ, cookie, off, length)
            expect[cookie] = (off, length)
    sock.settimeout(60)
    sender = sock.dup()  # send while we read, or both sides block
    t = threading.Thread(target=sender.sendall, args=(bytes(burst),))
    t.start()
    seen: set[int] = set()
    while len(seen) < len(expect) + len(writes):
        magic, err, cookie = struct.unpack(">IIQ", rc.recv_exact(sock, 16))
        assert magic == rc.SIMPLE_MAGIC, f"reply {len(seen)}: bad magic {magic:#x}"
        assert err == 0 and cookie not in seen
        seen.add(cookie)
        if cookie in expect:
            off, length = expect[cookie]
            got = rc.recv_exact(sock, length)
            assert got == data[off : off + length], f"cookie {cookie}: wrong bytes"
        else:
            assert cookie in writes
    t.join()
    sender.close()
    server.wait_for_log(THREADED)
    # And the writes are there.
    rc.request(sock, rc.CMD_READ, len(data) - MiB, MiB, cookie=999)
    assert rc.simple_reply(sock, MiB)[2] == data[len(data) - MiB :]
    rc.request(sock, rc.CMD_DISC, 0, 0)
    assert rc.closed_by_peer(sock)


NBDSH_READS = r"""
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
n = 0
for i in range(8):
    n += len(h.pread(4 << 20, i << 20))
print(json.dumps(n))
"""


def test_stalled_readers_hold_no_budget(serve: Callable[..., Server], tmp_path: Path) -> None:
    """Clients that stop reading while big reads are queued for the threads: memory
    stays bounded, another client is served meanwhile, and once they are gone the
    whole budget is back (a charge leaked would make a 4 MiB read wait for ever)."""
    disk = tmp_path / "disk.img"
    seeded_image(disk, 64 * MiB)
    server = serve(str(disk), "--format", "raw", "--verbose", "--payload-budget", "4M")
    floods = [open_flood(server.uri, reads=200, length=1 * MiB) for _ in range(3)]
    for s in floods:
        server.wait_for_log(f"{s.getsockname()}: decoding paused: reply backlog")
    assert server.stderr().count(THREADED) == 3
    # Served on its own threads meanwhile, with reads of the whole budget each.
    assert nbdsh_script(NBDSH_READS, server.uri) == 32 * MiB
    peak = vm_kib(server.proc.pid, "VmHWM") * MiB // 1024
    print(f"3 stalled connections x 200 x 1 MiB READs: VmHWM {peak / MiB:.0f} MiB")
    assert peak < 256 * MiB
    for s in floods:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # reset: the threads' sends fail mid-reply
    assert nbdsh_script(NBDSH_READS, server.uri) == 32 * MiB
    assert server.stderr().count(THREADED) == 5


def test_sigterm_with_threads_blocked_in_send(serve: Callable[..., Server], tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    seeded_image(disk, 64 * MiB)
    server = serve(str(disk), "--format", "raw", "--verbose")
    floods = [open_flood(server.uri, reads=100, length=4 * MiB) for _ in range(2)]
    for s in floods:
        server.wait_for_log(f"{s.getsockname()}: decoding paused: reply backlog")
    # The shutdown drops the clients that read nothing, instead of waiting them out
    # (the 30 s drain timeout would log "did not drain").
    assert server.stop(signal.SIGTERM, timeout=60) == 0
    assert "did not drain" not in server.stderr()
    for s in floods:
        s.close()


def test_sigterm_with_every_read_handed_over(serve: Callable[..., Server], tmp_path: Path) -> None:
    """Nothing in flight, both threads blocked sending to a client that reads nothing:
    the shutdown still drops it and ends."""
    disk = tmp_path / "disk.img"
    seeded_image(disk, 64 * MiB)
    server = serve(str(disk), "--format", "raw", "--verbose")
    flood = open_flood(server.uri, reads=2, length=16 * MiB)
    server.wait_for_log(f"{flood.getsockname()}: socket full: replies wait for the client")
    assert server.stop(signal.SIGTERM, timeout=60) == 0
    assert "did not drain" not in server.stderr()
    flood.close()


@pytest.mark.parametrize("optimise", [True, False], ids=["optimised", "overlay"])
def test_qcow_big_reads_on_the_threads(
    serve: Callable[..., Server], tmp_path: Path, optimise: bool
) -> None:
    """QCOW v1 over the raw driver: READs of allocated data go to the threads at the
    data's offsets in the file (Driver.read_at), the rest to the loop (an overlay's
    backing file, an optimised image's unallocated slots); nbdcopy reads back what it
    wrote, over the backing bytes or zeros."""
    need("nbdcopy")
    base, src, out = tmp_path / "base.raw", tmp_path / "src.img", tmp_path / "out.img"
    backing = seeded_image(base, 24 * MiB)
    written = seeded_image(src, 10 * MiB)  # ends inside an L1 slot: both paths in one read
    image = tmp_path / "disk.qcow"
    if optimise:
        run(tapnbd_cmd("create", "-f", "qcow", "--optimise", "-s", "24M", str(image)))
        rest = bytes(len(backing) - len(written))
        server = serve(str(image), "--format", "qcow", "--verbose")
    else:
        run(tapnbd_cmd("create", "-f", "qcow", "-b", str(base), "-F", "raw", str(image)))
        rest = backing[len(written) :]
        server = serve(str(image), "--format", "qcow", "-F", "raw", "--verbose")
    run(["nbdcopy", "--request-size=1048576", str(src), server.uri])
    run(["nbdcopy", "--request-size=1048576", server.uri, str(out)])
    assert out.read_bytes() == written + rest
    server.wait_for_log(THREADED)
