"""The blkif ring end to end: ``tapnbd ring serve`` in one process, BlkFront in another.

The backend always runs as the real CLI process; the frontend runs in the test process
(or, where it must die, in a child of its own). Data written through the ring is read
back over NBD by qemu-io from ``tapnbd serve`` on the same image: both front ends see
one disk.
"""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tapnbd.xen.blkif import PAGE_SIZE, Op, Status, pack_discard, pack_indirect, pack_request
from tapnbd.xen.frontend import BlkFront, Io, IOFailed
from tapnbd.xen.xenstore import XenbusState
from tests import helpers
from tests.helpers import ROOT, Server, need, run, tapnbd_cmd
from tests.xen.ringproc import RingFactory

MiB = 1 << 20
DISK = 64 * MiB


def qcow_image(tmp_path: Path, size: str = "64M") -> Path:
    path = tmp_path / "disk.qcow"
    run(tapnbd_cmd("create", str(path), "--size", size, "--format", "qcow"))
    return path


def qemu_io(uri: str, cmds: list[str]) -> str:
    out = helpers.qemu_io(uri, *cmds)
    assert out.count("read ") == sum(c.startswith("read") for c in cmds), out
    return out


def pattern(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


@pytest.mark.parametrize("indirect", [256, 0], ids=["indirect", "direct"])
def test_ring_writes_read_back_over_nbd(
    ring: RingFactory, serve: Callable[..., Server], tmp_path: Path, indirect: int
) -> None:
    """Known patterns go in through the ring; qemu-io reads them back through NBD.

    Once with BLKIF_OP_INDIRECT (up to 256 segments a request), once without (11).
    """
    need("qemu-io")
    image = qcow_image(tmp_path)
    backend = ring(str(image), "--once")
    # (offset, length, byte, page_offset): single sectors, a page's last sector, a
    # transfer split over several 11-segment requests and not page aligned, the disk's
    # last pages, and a batch of small writes in flight at once.
    writes = [
        (3584, 512, 0x33, 0),
        (5 * MiB + 512, MiB + 512, 0x22, 512),
        (9 * MiB, 11 * PAGE_SIZE, 0x55, 0),
        (DISK - 8192, 8192, 0x44, 0),
    ] + [(16 * MiB + i * 65536, 4096, 0x80 + i, (i % 8) * 512) for i in range(64)]
    with BlkFront(backend.path, max_indirect_segments=indirect) as front:
        assert front.size == DISK and not front.read_only
        assert front.max_indirect == indirect
        # Requests in flight have no order (blkif promises none), so the page that the
        # 0x33 sector overlaps is written before the batch.
        front.write(0, pattern(0x11, 4096))
        ios = [front.submit_write(off, pattern(b, n), page_offset=po) for off, n, b, po in writes]
        front.wait(ios)
        for io in ios:
            io.result()
        front.flush()
        # 1 MiB + 512 bytes from a page offset of 512 is 257 pages: 2 indirect requests
        # (256 + 1 segments) or 24 of 11 segments; 11 pages are one request either way.
        assert front.requests == 2 + (2 if indirect else 24) + 2 + 64 + 1  # + the flush
        assert front.read(5 * MiB, 1024) == bytes(512) + pattern(0x22, 512)
    assert backend.proc.wait(20) == 0, backend.stderr()

    nbd = serve(str(image))
    cmds = [
        "read -P 0x11 0 3584",
        "read -P 0x33 3584 512",
        "read -P 0 4096 5115392",  # up to 5 MiB + 512
        f"read -P 0x22 {5 * MiB + 512} {MiB + 512}",
        f"read -P 0 {6 * MiB + 1024} 512",
        f"read -P 0x55 {9 * MiB} {11 * PAGE_SIZE}",
        f"read -P 0 {9 * MiB + 11 * PAGE_SIZE} 4096",
        f"read -P 0x44 {DISK - 8192} 8192",
        f"read -P 0 {DISK - MiB} {MiB - 8192}",
    ] + [f"read -P {0x80 + i} {16 * MiB + i * 65536} 4096" for i in range(64)]
    qemu_io(nbd.uri, cmds)


def test_nbd_writes_read_back_through_the_ring(
    ring: RingFactory, serve: Callable[..., Server], tmp_path: Path
) -> None:
    """The other way round: qemu-io writes over NBD, the ring reads the same bytes."""
    need("qemu-io")
    image = qcow_image(tmp_path)
    nbd = serve(str(image))
    run(
        [
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x6b 1M 3M",
            "-c",
            "write -P 0x7c 12k 512",
            "-c",
            "write -P 0x7d 63M 1M",
            nbd.uri,
        ]
    )
    nbd.stop()
    backend = ring(str(image), "--read-only")
    with BlkFront(backend.path) as front:
        assert front.read_only
        assert front.read(MiB, 3 * MiB) == pattern(0x6B, 3 * MiB)
        assert front.read(8192, 8192) == bytes(4096) + pattern(0x7C, 512) + bytes(3584)
        assert front.read(62 * MiB, 2 * MiB) == bytes(MiB) + pattern(0x7D, MiB)
        # Read-only: no flush or barrier offered, writes refused.
        assert not front.features[Op.FLUSH_DISKCACHE] and not front.features[Op.WRITE_BARRIER]
        with pytest.raises(IOFailed) as info:
            front.write(0, bytes(4096))
        assert info.value.status == Status.ERROR
        assert front.read(0, 4096) == bytes(4096)


def test_malformed_requests_get_errors_and_the_ring_keeps_serving(ring: RingFactory) -> None:
    backend = ring("ram:8M")
    # Without feature-persistent, so that a read-only grant is enough for write data
    # (test_ring_persistent.py has the persistent rules).
    with BlkFront(backend.path, persistent=False) as front:
        sectors = front.sectors
        grants = front.grants
        rw = grants.alloc_frame()
        ro = grants.alloc_frame()
        grants.frame(ro)[:] = pattern(0xA5, PAGE_SIZE)
        ref_rw = grants.grant(rw, 0, readonly=False)
        ref_ro = grants.grant(ro, 0, readonly=True)
        never_granted = grants.nr_grefs - 1  # the stack hands this one out last
        bad: list[tuple[str, bytes, Status]] = [
            ("nr_segments 0", pack_request(Op.READ, 0, 0, [], nr_segments=0), Status.ERROR),
            (
                "nr_segments 12",
                pack_request(Op.READ, 0, 0, [(ref_rw, 0, 7)], nr_segments=12),
                Status.ERROR,
            ),
            ("first > last", pack_request(Op.READ, 0, 0, [(ref_rw, 4, 3)]), Status.ERROR),
            ("last > 7", pack_request(Op.READ, 0, 0, [(ref_rw, 0, 8)]), Status.ERROR),
            ("first > 7", pack_request(Op.WRITE, 0, 0, [(ref_ro, 9, 9)]), Status.ERROR),
            (
                "past the end",
                pack_request(Op.READ, 0, sectors - 4, [(ref_rw, 0, 7)]),
                Status.ERROR,
            ),
            ("discard past end", pack_discard(0, sectors - 1, 2), Status.ERROR),
            ("unknown op", pack_request(42, 0, 0, [(ref_rw, 0, 7)]), Status.EOPNOTSUPP),
            ("indirect, 0 segments", pack_indirect(Op.READ, 0, 0, 0, [ref_ro]), Status.ERROR),
            (
                "indirect, 257 segments",
                pack_indirect(Op.READ, 0, 0, 257, [ref_ro]),
                Status.ERROR,
            ),
            ("indirect flush", pack_indirect(Op.FLUSH_DISKCACHE, 0, 0, 1, [ref_ro]), Status.ERROR),
            (
                "indirect page not granted",
                pack_indirect(Op.READ, 0, 0, 1, [never_granted]),
                Status.ERROR,
            ),
            (
                # ref_ro's page holds 0xA5 bytes: segment 0 has first_sect 0xA5.
                "indirect segment bad",
                pack_indirect(Op.WRITE, 0, 0, 1, [ref_ro]),
                Status.ERROR,
            ),
            (
                "gref outside the pool",
                pack_request(Op.READ, 0, 0, [(grants.nr_grefs, 0, 7)]),
                Status.ERROR,
            ),
            (
                "gref 2**32-1",
                pack_request(Op.WRITE, 0, 0, [(2**32 - 1, 0, 7)]),
                Status.ERROR,
            ),
            (
                "gref not granted",
                pack_request(Op.READ, 0, 0, [(never_granted, 0, 7)]),
                Status.ERROR,
            ),
            (
                "read into a read-only grant",
                pack_request(Op.READ, 0, 0, [(ref_ro, 0, 7)]),
                Status.ERROR,
            ),
            ("secure discard", pack_discard(0, 0, 8, flag=1), Status.EOPNOTSUPP),
        ]
        good = pack_request(Op.WRITE, 0, 16, [(ref_ro, 0, 7)])
        # Bad and good requests interleaved, all in flight at once.
        ios: list[tuple[str, Io, Status]] = []
        for name, raw, status in bad:
            ios.append((name, front.submit_raw(raw), status))
            ios.append(("good write", front.submit_raw(good), Status.OKAY))
        front.wait([io for _, io, _ in ios])
        got = {(name, Status(io.status)) for name, io, _ in ios}
        assert got == {(name, status) for name, _, status in ios}
        # The backend is still serving, and the good writes landed.
        assert front.read(16 * 512, 4096) == pattern(0xA5, 4096)
        front.write(MiB, pattern(1, 8192))
        assert front.read(MiB, 8192) == pattern(1, 8192)
        grants.end_access(ref_rw)
        grants.end_access(ref_ro)
    assert backend.proc.poll() is None
    assert "bad request" in backend.stderr()


def test_full_ring_and_event_suppression(ring: RingFactory) -> None:
    backend = ring("ram:16M")
    with BlkFront(backend.path) as front:
        slots = front.ring.nr_ents
        # One request at a time on an idle ring: the backend re-arms req_event after
        # each, so every request costs one kick. (This shows the kicks are counted.)
        k0 = front.notifications
        for i in range(20):
            front.write(i * 4096, pattern(i, 4096))
        assert front.notifications - k0 == 20

        # Five ring's worth of writes without waiting: the ring fills, the frontend
        # waits for slots (blkfront stops its queue), and nothing is lost.
        n = 5 * slots
        full_seen = 0
        k0, e0, r0 = front.notifications, front.events, front.requests
        ios = []
        for i in range(n):
            ios.append(front.submit_write(i * 8192, pattern(i & 0xFF, 8192)))
            if front.ring.full():
                full_seen += 1
            assert front.in_flight <= slots
        front.wait(ios)
        for io in ios:
            io.result()
        assert full_seen > 0
        assert front.requests - r0 == n
        reads = [front.submit_read(i * 8192, 8192) for i in range(n)]
        front.wait(reads)
        for i, io in enumerate(reads):
            assert bytes(io.result() or b"") == pattern(i & 0xFF, 8192), f"block {i}"
        kicks = front.notifications - k0
        requests = front.requests - r0
        # A busy ring runs with far fewer kicks than requests. (Upcalls the other way
        # depend on timing here: a frontend waiting for one free slot re-arms rsp_event
        # after every response it takes, as blkfront does; the next phase pins them.)
        assert requests == 2 * n
        assert kicks * 10 < requests, (kicks, requests)
        assert front.events - e0 < requests

        # Whole batches, exactly: the backend is idle and armed, so a batch of a ring's
        # worth of requests costs one kick; the frontend does not re-arm until it has
        # consumed the batch, so the backend sends one notification for all responses.
        # Counted without sleeping: a notification the backend should not send for batch
        # b would go out before it reads batch b + 1, so it is in the socket by the time
        # the next batch's own one is; a last single request fences batch 9.
        sring, sock = front.ring.sring, front.evtchn.sock
        front.evtchn.consume()  # drop kicks left over from the phases above
        upcalls = 0
        for b in range(11):
            k0 = front.notifications
            n = slots if b < 10 else 1
            batch = [front.submit_read((b * slots + i) * 4096, 4096) for i in range(n)]
            front.push()
            assert front.notifications - k0 == 1
            deadline = time.monotonic() + 10
            while sring.rsp_prod != front.ring.req_prod_pvt:
                assert time.monotonic() < deadline, "the backend did not answer the batch"
                time.sleep(0.001)
            assert select.select([sock], [], [], 10)[0], f"batch {b}: no upcall"
            while True:  # it, and whatever else has arrived
                try:
                    upcalls += len(sock.recv(4096, socket.MSG_DONTWAIT))
                except BlockingIOError:
                    break
            assert upcalls == b + 1, f"batch {b}: {upcalls} upcalls for {b + 1} batches"
            assert front.poll() == n and all(io.done for io in batch)

        # One I/O bigger than the ring (4 MiB: 94 requests of 11 pages) completes once,
        # after its last part: parts answered while the rest wait for slots do not count.
        calls: list[Io] = []
        big = front.submit_write(0, pattern(0x5E, 4 * MiB))
        big.callback = calls.append
        front.wait(big)
        assert calls == [big] and front.in_flight == 0
        assert front.read(4 * MiB - 4096, 8192) == pattern(0x5E, 4096) + bytes(4096)


def test_flush_barrier_and_discard(
    ring: RingFactory, serve: Callable[..., Server], tmp_path: Path
) -> None:
    need("qemu-io")
    image = qcow_image(tmp_path)
    backend = ring(str(image), "--once")
    with BlkFront(backend.path) as front:
        assert front.features == {
            Op.WRITE_BARRIER: True,
            Op.FLUSH_DISKCACHE: True,
            Op.DISCARD: True,
        }
        front.write(0, pattern(0x10, 4 * MiB))
        # A write, then a barrier write to the same place, in one batch: the barrier
        # waits for the write, so its data is what stays.
        first = front.submit_write(8 * MiB, pattern(0x01, 65536))
        barrier = front.submit_write(8 * MiB, pattern(0x02, 65536), op=Op.WRITE_BARRIER)
        after = front.submit_write(8 * MiB + 65536, pattern(0x03, 4096))
        front.wait([first, barrier, after])
        for io in (first, barrier, after):
            io.result()
        # Empty barrier, flush with and without data, plain flush.
        front.wait(empty := front.submit_write(0, b"", op=Op.WRITE_BARRIER))
        empty.result()
        front.wait(fl := front.submit_write(10 * MiB, pattern(0x04, 4096), op=Op.FLUSH_DISKCACHE))
        fl.result()
        front.flush()
        # Discard the middle 2 MiB of the first 4 MiB (whole clusters: they read as zeros).
        front.discard(MiB, 2 * MiB)
        assert front.read(MiB - 512, 1024) == pattern(0x10, 512) + bytes(512)
        front.discard(0, 0)  # an empty discard is fine
    assert backend.proc.wait(20) == 0, backend.stderr()

    nbd = serve(str(image))
    qemu_io(
        nbd.uri,
        [
            "read -P 0x10 0 1M",
            "read -P 0 1M 2M",
            "read -P 0x10 3M 1M",
            "read -P 0x02 8M 64k",
            f"read -P 0x03 {8 * MiB + 65536} 4k",
            "read -P 0x04 10M 4k",
        ],
    )


_DOOMED = """
import sys
from tapnbd.xen.frontend import BlkFront
front = BlkFront(sys.argv[1]).connect()
done = 0
def count(io):
    global done
    done += 1
    if done == 200:
        print("go", flush=True)
i = 0
while True:
    while front.in_flight < 32:
        io = front.submit_write((i % 4096) * 4096, b"x" * 4096)
        io.callback = count
        i += 1
    front.wait_any()
"""


def _doomed_frontend(path: Path) -> subprocess.Popen[str]:
    """A frontend in its own process, busy writing, once it has done 200 writes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _DOOMED, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "go\n"
    return proc


def test_killed_frontend_does_not_wedge_the_backend(ring: RingFactory) -> None:
    backend = ring("ram:16M")
    proc = _doomed_frontend(backend.path)
    assert backend.state() is XenbusState.CONNECTED
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The backend notices (its event channel closes), drains, unmaps and closes.
    backend.wait_state(XenbusState.CLOSED)
    assert "frontend lost" in backend.stderr()
    # ... and a new frontend can connect and do I/O.
    with BlkFront(backend.path) as front:
        front.write(4096, pattern(0x99, 4096))
        assert front.read(0, 8192)[4096:] == pattern(0x99, 4096)
    backend.wait_state(XenbusState.CLOSED)
    assert backend.proc.poll() is None
    assert backend.stop() == 0


def test_killed_frontend_with_once_exits_cleanly(ring: RingFactory) -> None:
    backend = ring("ram:16M", "--once")
    proc = _doomed_frontend(backend.path)
    t0 = time.monotonic()
    proc.kill()
    proc.wait()
    assert backend.proc.wait(10) == 0, backend.stderr()
    assert time.monotonic() - t0 < 5
    assert "frontend lost" in backend.stderr()
