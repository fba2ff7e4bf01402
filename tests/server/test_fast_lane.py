"""Small WRITEs in the connection's fast lane (NBDConnection._process).

A plain WRITE under SMALL_WRITE bytes whose payload is all buffered is written and
answered as it is decoded, with no Request and no admission, but only while the
connection has room for it: replies not backed up, requests and payload in flight
under their bounds, and the server's payload budget able to hold it. A write the driver
does not take at once (backing off, read-only, out of range) goes the usual way and gets
the usual answer. Each case counts the writes the lane took, and checks every byte.

The server runs in-process on a socket pair (tests/server/inproc.py), so what is queued
in its socket when it next runs is exactly what the test queued.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tapnbd.protocol.transmission import SMALL_WRITE, RequestDecoder
from tests.server import rawclient as rc
from tests.server.inproc import Client, Reads, Served, header, loops, run, serve

SIZE = 4 << 20
FUA = 1


class Lane:
    """Counts the writes RequestDecoder.next_small_write handed to the fast lane."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.taken = 0
        original = RequestDecoder.next_small_write

        def counted(decoder: RequestDecoder) -> tuple[int, int, bytes] | None:
            small = original(decoder)
            self.taken += small is not None
            return small

        monkeypatch.setattr(RequestDecoder, "next_small_write", counted)


class Disk:
    """The image and what it must hold.

    Writes in flight together never overlap: "overlapping commands in flight are
    undefined territory" (NBD spec), and a server may well finish them out of order, as
    this one does when the lane hands a write to the thread pool and takes the next one
    inline. So the expected bytes are the same whatever the order.
    """

    def __init__(self, path: Path, seed: int) -> None:
        self.path = path
        self.rng = random.Random(seed)
        self.expect = bytearray(self.rng.randbytes(SIZE))
        path.write_bytes(self.expect)
        self.cookies = iter(range(1, 100_000))
        self.flying: list[tuple[int, int]] = []  # writes not answered yet: [start, end)

    def write(self, flags: int = 0, length: int = 0, offset: int = -1) -> tuple[int, bytes]:
        """A WRITE request at a random place (or ``offset``); what it writes is expected."""
        length = length or self.rng.choice((4096, 512, self.rng.randrange(1, SMALL_WRITE)))
        if offset < 0:
            for _ in range(10_000):
                offset = self.rng.randrange(0, SIZE - length + 1)
                if not any(offset < end and start < offset + length for start, end in self.flying):
                    break
            else:
                raise AssertionError("no room for a write that overlaps none in flight")
        cookie, data = next(self.cookies), self.rng.randbytes(length)
        if offset + length <= SIZE:
            self.expect[offset : offset + length] = data
            self.flying.append((offset, offset + length))
        return cookie, header(rc.CMD_WRITE, cookie, offset, length, flags) + data

    def check(self) -> None:
        assert self.path.read_bytes() == bytes(self.expect)


async def _replies(client: Client, n: int, disk: Disk) -> dict[int, int]:
    """The next ``n`` simple replies (any order): cookie -> error. Then nothing of
    ``disk``'s is in flight."""
    out = {}
    for _ in range(n):
        error, cookie, _ = await asyncio.to_thread(rc.simple_reply, client.sock, 0)
        out[cookie] = error
    disk.flying.clear()
    return out


async def _read_back(served: Served, disk: Disk) -> None:
    """Every byte through the server, in 1 MiB READs."""
    for offset in range(0, SIZE, 1 << 20):
        cookie = next(disk.cookies)
        served.client.queue(header(rc.CMD_READ, cookie, offset, 1 << 20))
        got = await served.client.reply(cookie, 1 << 20)
        assert got == (0, bytes(disk.expect[offset : offset + (1 << 20)])), offset


def _idle(served: Served) -> None:
    """Nothing in flight and nothing charged once every reply is in."""
    assert served.conn.in_flight == 0 and served.conn.payload == 0
    assert served.server.budget.used == 0


Body = Callable[[Served, Disk, Lane, Reads], Awaitable[None]]
Case = Callable[..., None]


def _case(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    seed: int,
    body: Body,
    **serve_args: Any,
) -> None:
    """Serve a random image, run ``body``; then nothing may be in flight or charged,
    and the file must hold exactly what the test expects."""
    disk = Disk(tmp_path / "disk.raw", seed)
    lane, reads = Lane(monkeypatch), Reads(monkeypatch)

    async def main() -> None:
        served = await serve(disk.path, **serve_args)
        try:
            await body(served, disk, lane, reads)
            _idle(served)
        finally:
            await served.close()
        disk.check()

    run(loop_factory, main)


@pytest.fixture(params=loops())
def case(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> Case:
    """``case(body, **serve_args)``: _case on the asyncio loop, then on uvloop's."""
    return functools.partial(_case, request.param, tmp_path, monkeypatch, seed)


def test_small_writes_take_the_fast_lane_and_land(case: Case) -> None:
    async def body(served: Served, disk: Disk, lane: Lane, reads: Reads) -> None:
        writes = [disk.write() for _ in range(60)]
        served.client.queue(b"".join(req for _, req in writes))
        assert await _replies(served.client, 60, disk) == {c: 0 for c, _ in writes}
        if served.driver._nowait_write:
            pytest.skip("this file system takes RWF_NOWAIT writes: no inline pwrite")
        assert lane.taken == 60
        # FUA, or a payload of SMALL_WRITE: the usual way.
        writes = [disk.write(FUA), disk.write(length=SMALL_WRITE), disk.write()]
        served.client.queue(b"".join(req for _, req in writes))
        assert await _replies(served.client, 3, disk) == {c: 0 for c, _ in writes}
        assert lane.taken == 61
        await _read_back(served, disk)

    case(body)


def test_writes_the_driver_refuses_go_the_usual_way(case: Case) -> None:
    async def body(served: Served, disk: Disk, lane: Lane, reads: Reads) -> None:
        cookie, req = disk.write()  # the first write finds out how the file takes them
        served.client.queue(req)
        assert await served.client.reply(cookie) == (0, b"")
        if served.driver._nowait_write:
            pytest.skip("this file system takes RWF_NOWAIT writes: no inline pwrite")
        lane.taken = 0
        # The driver backs off (a write slept): the lane takes each write, hands it on
        # admitted, and the thread pool writes it.
        served.driver._inline_after = time.monotonic() + 3600
        writes = [disk.write() for _ in range(20)]
        served.client.queue(b"".join(req for _, req in writes))
        assert await _replies(served.client, 20, disk) == {c: 0 for c, _ in writes}
        assert lane.taken == 20
        _idle(served)
        served.driver._inline_after = 0.0
        # Past the end: "ENOSPC", as a FUA write (never in the lane) gets it, and the
        # stream stays in sync.
        past = SIZE - 100
        (c1, r1), (c2, r2) = disk.write(length=4096, offset=past), disk.write(FUA, 4096, past)
        c3, r3 = disk.write()
        served.client.queue(r1 + r2 + r3)
        got = await _replies(served.client, 3, disk)
        assert got == {c1: errno.ENOSPC, c2: errno.ENOSPC, c3: 0}
        assert lane.taken == 22
        await _read_back(served, disk)

    case(body)


async def _refused(served: Served, disk: Disk, err: int) -> None:
    """Five small WRITEs, each answered ``err``, none written."""
    before = bytes(disk.expect)
    writes = [disk.write() for _ in range(5)]
    served.client.queue(b"".join(req for _, req in writes))
    assert await _replies(served.client, 5, disk) == {c: err for c, _ in writes}
    disk.expect[:] = before


def test_read_only_export_answers_eperm_in_sync(case: Case) -> None:
    async def body(served: Served, disk: Disk, lane: Lane, reads: Reads) -> None:
        backend = served.conn.backend
        assert backend is not None and not backend.writes_inline  # so the lane stays shut
        await _refused(served, disk, errno.EPERM)
        assert lane.taken == 0
        await _read_back(served, disk)

    case(body, read_only=True)


def test_a_server_shutting_down_answers_eshutdown(case: Case) -> None:
    """ "ESHUTDOWN: the server is shutting down" (NBD spec, "Error values"): new WRITEs
    during a soft disconnect are answered so, small ones too, and not written."""

    async def body(served: Served, disk: Disk, lane: Lane, reads: Reads) -> None:
        # As NBDServer.shutdown leaves it while it drains, without its timers.
        served.server.shutting_down = True
        try:
            await _refused(served, disk, errno.ESHUTDOWN)
        finally:
            served.server.shutting_down = False
        assert lane.taken == 0

    case(body)


def test_no_fast_lane_while_replies_back_up(case: Case) -> None:
    """A client that does not read its replies makes the transport pause us: small
    WRITEs then wait in the buffer like every other request."""

    async def body(served: Served, disk: Disk, lane: Lane, reads: Reads) -> None:
        conn, decoder = served.conn, served.conn.decoder
        assert decoder is not None
        # As pause_writing would leave it, with the transport still reading, as it is
        # when the pause comes in the middle of a batch of requests.
        conn._write_paused = True
        cookie, req = disk.write()
        served.client.queue(req)
        await reads.until(lambda: decoder.buffered() >= len(req))
        assert lane.taken == 0 and conn.in_flight == 0
        conn.resume_writing()
        assert await served.client.reply(cookie) == (0, b"")
        assert lane.taken == 1

    case(body)


def test_no_fast_lane_without_budget_room(case: Case) -> None:
    """A payload budget smaller than SMALL_WRITE: every write is admitted the usual
    way, so the budget's bound holds for them as for everything else."""

    async def body(served: Served, disk: Disk, lane: Lane, reads: Reads) -> None:
        writes = [disk.write(length=4096) for _ in range(30)]
        served.client.queue(b"".join(req for _, req in writes))
        assert await _replies(served.client, 30, disk) == {c: 0 for c, _ in writes}
        assert lane.taken == 0
        assert 0 < served.server.budget.peak <= SMALL_WRITE // 2

    case(body, payload_budget=SMALL_WRITE // 2)
