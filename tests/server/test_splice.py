"""Big WRITEs spliced from the socket to the raw file (NBDConnection._splice_write).

An in-process server on one end of a unix socket pair (tests/server/inproc.py): the test
writes whole requests into the socket from the loop's own thread, so when the server
next runs, exactly what the test meant to be queued is queued. A payload that is not
all queued is spliced as it arrives: the test sends it in pieces, each once the server
has taken the one before (``Arrivals``). Each case checks the connection's splice count
and, at the end, every byte of the file against what was written.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from formats import PROBE_SIZE, OpenRules, open_image, probe, probe_bytes
from formats.guard import ProbedRawGuard
from formats.qcow.check import check_qcow
from formats.qcow.create import create_qcow
from formats.qcow.driver import QcowDriver
from tapnbd.protocol.transmission import RequestDecoder
from tapnbd.server import pipewriter, splice
from tapnbd.server.connection import SPLICE_MIN, NBDConnection
from tapnbd.server.splice import PART_ALIGN, PayloadPipe, queued
from tests.server import rawclient as rc
from tests.server.inproc import Client, Reads, Wakes, header, loops, run, serve, tcp_pair

KiB = 1024
SIZE = 8 << 20
#: Whole requests of this size fit in the socket pair's buffers (SO_SNDBUF in inproc).
PAYLOAD = SPLICE_MIN + 40 * KiB


def seeded_disk(tmp_path: Path) -> tuple[random.Random, Path, bytearray]:
    """A seeded generator (the seed printed), a zeroed raw disk, and what it holds."""
    seed = random.randrange(1 << 32)
    print("seed", seed)
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(SIZE))
    return random.Random(seed), image, bytearray(SIZE)


@dataclass
class Writes:
    """WRITEs of PAYLOAD random bytes at random places, ``expect`` kept as the disk reads."""

    rng: random.Random
    expect: bytearray
    cookies: Iterator[int] = field(default_factory=lambda: iter(range(1, 1000)))

    def write(self, offset: int) -> tuple[int, bytes]:
        """A cookie and the whole request: header and payload."""
        cookie, data = next(self.cookies), self.rng.randbytes(PAYLOAD)
        self.expect[offset : offset + PAYLOAD] = data
        return cookie, header(rc.CMD_WRITE, cookie, offset, PAYLOAD) + data

    def place(self) -> int:
        return self.rng.randrange(0, SIZE - PAYLOAD)


async def read_back(client: Client, cookies: Iterator[int], expect: bytearray) -> None:
    """Every byte of the disk reads back through the server as ``expect`` says."""
    for offset in range(0, SIZE, 1 << 20):
        cookie = next(cookies)
        client.queue(header(rc.CMD_READ, cookie, offset, 1 << 20))
        got = await client.reply(cookie, 1 << 20)
        assert got == (0, bytes(expect[offset : offset + (1 << 20)])), offset


async def send_split(
    client: Client, reads: Reads, decoder: RequestDecoder, req: bytes, cut: int
) -> None:
    """Send the WRITE ``req`` in two: its first ``cut`` bytes, then the rest once the
    server is receiving the payload into its buffer. With a cut just past the header,
    the server's next read is a lone header, so the next WRITE's payload is still in
    the socket when the connection is offered it."""
    client.queue(req[:cut])
    await reads.until(lambda: decoder.taken() is not None)
    await asyncio.to_thread(client.sock.sendall, req[cut:])


class Arrivals(Wakes):
    """Wakes the test each time the server has taken bytes of an arriving payload."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(monkeypatch, "_payload_more")


async def send_arriving(
    client: Client,
    conn: NBDConnection,
    arrivals: Arrivals,
    req: bytes,
    cuts: list[int],
    rest: bool = True,
) -> None:
    """Send the WRITE ``req`` (after a WRITE spliced or received whole, so the server
    reads its header alone) in pieces ending at ``cuts`` (offsets in the payload), each
    once the server has taken the one before; then the rest, if ``rest``."""
    sent = 0
    for cut in cuts:
        client.queue(req[sent : 28 + cut])
        sent = 28 + cut

        def taken(cut: int = cut) -> bool:
            return conn._arriving is not None and conn._arriving.got == cut

        await arrivals.until(taken)
    if rest:
        client.queue(req[sent:])


@pytest.mark.parametrize("loop_factory", loops())
def test_payloads_are_spliced_whole_or_as_they_arrive(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng, image, expect = seeded_disk(tmp_path)
    writes = Writes(rng, expect)
    write, place, cookies = writes.write, writes.place, writes.cookies

    # The loop's own path: the writer thread's is the next test's.
    monkeypatch.setattr(pipewriter, "ENABLED", False)

    async def main() -> None:
        reads, arrivals = Reads(monkeypatch), Arrivals(monkeypatch)
        served = await serve(image)
        conn, driver, client = served.conn, served.driver, served.client
        assert conn.decoder is not None
        decoder = conn.decoder

        try:
            # 1. Part of the payload comes with the header (it is in the socket with
            # it): received as usual, into the payload's buffer. After it the server
            # reads a lone header, so the next WRITE's payload is still in the socket.
            cookie, req = write(place())
            await send_split(client, reads, decoder, req, 28 + 1000)
            assert await client.reply(cookie) == (0, b"")
            assert conn.spliced == 0
            if driver._nowait_write:
                pytest.skip("this file system takes RWF_NOWAIT writes: they stay pwrites")

            # 2. A WRITE all queued: spliced.
            cookie, req = write(place())
            client.queue(req)
            assert await client.reply(cookie) == (0, b"")
            assert conn.spliced == 1

            # 3. The header and a third of the payload, then more: a client that
            # stalls mid-payload must not hold the loop, so the payload is spliced as it
            # comes, and the whole blocks of it that came are in the file before the
            # rest does.
            offset = place()
            cookie, req = write(offset)
            first = PAYLOAD // 3
            await send_arriving(client, conn, arrivals, req, [first])
            part = conn._arriving
            assert part is not None and part.buf is None
            assert part.put == ((offset + first) & -PART_ALIGN) - offset > 0
            assert os.pread(driver.fd, part.put, offset) == req[28 : 28 + part.put]
            assert await client.reply(cookie) == (0, b"")
            assert conn.spliced == 2 and conn._arriving is None

            # 4. The driver is backing off (a write slept): the payload is spliced
            # into the pipe, refused, read back out and written by the thread pool.
            driver._inline_after = time.monotonic() + 3600
            cookie, req = write(place())
            client.queue(req)
            assert await client.reply(cookie) == (0, b"")
            assert conn.spliced == 2
            # 4b. The same with a payload arriving in three pieces: its first part is
            # refused, so the rest of it is received into a buffer and written there.
            cookie, req = write(place())
            await send_arriving(client, conn, arrivals, req, [PAYLOAD // 4, PAYLOAD // 2])
            assert await client.reply(cookie) == (0, b"")
            assert conn.spliced == 2
            # 4c. The back-off begins part-way through an arriving payload: the parts
            # already written stay, the rest is written the usual way.
            driver._inline_after = 0.0
            offset = place()
            cookie, req = write(offset)
            await send_arriving(client, conn, arrivals, req, [PAYLOAD // 3], rest=False)
            assert conn._arriving is not None and conn._arriving.put > 0
            driver._inline_after = time.monotonic() + 3600
            client.queue(req[28 + PAYLOAD // 3 : 28 + PAYLOAD // 2])
            await arrivals.until(
                lambda: conn._arriving is not None and conn._arriving.buf is not None
            )
            client.queue(req[28 + PAYLOAD // 2 :])
            assert await client.reply(cookie) == (0, b"")
            assert conn.spliced == 2
            driver._inline_after = 0.0

            # 5. The write fails half-way (a read-only descriptor under the driver):
            # EIO, and what the pipe still held must not reach the next WRITE.
            good_fd = driver.fd
            driver.fd = os.open(image, os.O_RDONLY)
            failed = place()
            cookie = next(cookies)
            client.queue(header(rc.CMD_WRITE, cookie, failed, PAYLOAD) + bytes(PAYLOAD))
            error, _ = await client.reply(cookie)
            os.close(driver.fd)
            driver.fd = good_fd
            assert error == 5  # EIO
            assert conn.spliced == 2
            # 5b. The same while the payload arrives: EIO once all of it is read, and
            # the stream stays in step.
            driver.fd = os.open(image, os.O_RDONLY)
            failed = place()
            cookie = next(cookies)
            req = header(rc.CMD_WRITE, cookie, failed, PAYLOAD) + bytes(PAYLOAD)
            await send_arriving(client, conn, arrivals, req, [PAYLOAD // 3])
            error, _ = await client.reply(cookie)
            os.close(driver.fd)
            driver.fd = good_fd
            assert error == 5
            assert conn.spliced == 2
            for _ in range(3):  # 6. and on as before, whole and arriving
                cookie, req = write(place())
                client.queue(req)
                assert await client.reply(cookie) == (0, b"")
                cookie, req = write(place())
                await send_arriving(client, conn, arrivals, req, [rng.randrange(1, PAYLOAD)])
                assert await client.reply(cookie) == (0, b"")
            assert conn.spliced == 8
            assert served.server.budget.used == conn.payload == 0

            # Everything reads back, through the server and from the file.
            await read_back(client, cookies, expect)
        finally:
            await served.close()
        assert image.read_bytes() == bytes(expect)

    run(loop_factory, main)


@pytest.mark.parametrize("loop_factory", loops())
def test_arriving_payloads_are_written_by_the_connections_writer_thread(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over a unix socket an arriving payload goes into a pipe of its own, and once it is
    all in, a thread of the connection's own writes it (tapnbd.server.pipewriter) while
    the loop reads on. If that pipe fills first, the loop writes the parts, as without
    the thread. A failed write is answered with EIO, and the stream stays in step."""
    rng, image, expect = seeded_disk(tmp_path)
    writes = Writes(rng, expect)
    write, place, cookies = writes.write, writes.place, writes.cookies

    async def main() -> None:
        reads, arrivals = Reads(monkeypatch), Arrivals(monkeypatch)
        served = await serve(image)
        conn, driver, client = served.conn, served.driver, served.client
        assert conn.decoder is not None
        try:
            # A WRITE received as usual, so that the next header is read alone.
            cookie, req = write(place())
            await send_split(client, reads, conn.decoder, req, 28 + 1000)
            assert await client.reply(cookie) == (0, b"")
            if driver._nowait_write:
                pytest.skip("this file system takes RWF_NOWAIT writes: they stay pwrites")

            # 1. Nothing reaches the file before the whole payload is in its pipe.
            offset = place()
            cookie, req = write(offset)
            await send_arriving(client, conn, arrivals, req, [PAYLOAD // 3], rest=False)
            a = conn._arriving
            assert a is not None and a.dest == offset and a.pipe is not conn._pipe
            assert a.put == 0 and os.pread(driver.fd, a.got, offset) != req[28 : 28 + a.got]
            client.queue(req[28 + PAYLOAD // 3 :])
            assert await client.reply(cookie) == (0, b"")
            assert conn._writer is not None and conn.spliced == 1 and conn._pipes_out == 0

            # 2. More of them, cut at random: each pipe is used again.
            for _ in range(4):
                cookie, req = write(place())
                await send_arriving(client, conn, arrivals, req, [rng.randrange(1, PAYLOAD)])
                assert await client.reply(cookie) == (0, b"")
            assert conn.spliced == 5 and conn._pipes_out == 0
            assert len(conn._spare_pipes) == 1

            # 3. The pipe is full before the payload is in: the loop puts the parts.
            real_fill = PayloadPipe.fill_some
            full = [True]

            def fill_some(pipe: PayloadPipe, sock_fd: int, want: int) -> int:
                if pipe is not conn._pipe and full and queued(sock_fd):
                    full.clear()
                    return 0
                return real_fill(pipe, sock_fd, want)

            monkeypatch.setattr(PayloadPipe, "fill_some", fill_some)
            offset = place()
            cookie, req = write(offset)
            await send_arriving(client, conn, arrivals, req, [PAYLOAD // 3], rest=False)
            a = conn._arriving
            assert not full and a is not None and a.dest == -1 and a.put > 0
            assert os.pread(driver.fd, a.put, offset) == req[28 : 28 + a.put]
            client.queue(req[28 + PAYLOAD // 3 :])
            assert await client.reply(cookie) == (0, b"")
            assert conn.spliced == 6 and conn._pipes_out == 0

            # 4. A WRITE that runs past the end of the disk is spliced by nobody: the
            # usual path answers ENOSPC and writes none of it (the parts inside the
            # disk were written before, by the loop's path).
            cookie = next(cookies)
            past = SIZE - PAYLOAD // 2
            req = header(rc.CMD_WRITE, cookie, past, PAYLOAD) + rng.randbytes(PAYLOAD)
            decoder = conn.decoder
            client.queue(req[: 28 + PAYLOAD // 3])  # its header read alone, as above
            await reads.until(lambda: decoder.taken() is not None)
            client.queue(req[28 + PAYLOAD // 3 :])
            assert (await client.reply(cookie))[0] == errno.ENOSPC
            assert os.path.getsize(image) == SIZE and conn._pipes_out == 0

            # 5. The thread's write fails (its descriptor is read-only): EIO once the
            # payload is all in, and the pipe is emptied for the next one.
            conn._writer.stop()
            conn._writer, conn._write_fd = None, os.open(image, os.O_RDONLY)
            failed = place()
            cookie = next(cookies)
            req = header(rc.CMD_WRITE, cookie, failed, PAYLOAD) + rng.randbytes(PAYLOAD)
            await send_arriving(client, conn, arrivals, req, [PAYLOAD // 2])
            error, _ = await client.reply(cookie)
            os.close(conn._write_fd)
            assert error == errno.EIO
            cookie = next(cookies)
            client.queue(header(rc.CMD_READ, cookie, failed, PAYLOAD))
            assert await client.reply(cookie, PAYLOAD) == (
                0,
                bytes(expect[failed : failed + PAYLOAD]),
            )
            # (FIONREAD counts what waits in a pipe as in a socket.)
            assert conn._pipes_out == 0 and all(queued(p.read_fd) == 0 for p in conn._spare_pipes)
            assert served.server.budget.used == conn.payload == 0

            await read_back(client, cookies, expect)
        finally:
            await served.close()
        assert image.read_bytes() == bytes(expect)

    run(loop_factory, main)


@pytest.mark.parametrize("loop_factory", loops())
def test_a_tcp_client_on_this_host_is_never_spliced(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over loopback TCP the WRITEs that a unix socket splices (the test above, steps 1
    and 2) take the usual path: spliced, the sender's pages would stay in the pipe
    (splice.same_host)."""
    rng, image, expect = seeded_disk(tmp_path)

    async def main() -> None:
        reads = Reads(monkeypatch)
        served = await serve(image, pair=tcp_pair)
        conn, client = served.conn, served.client
        assert conn.decoder is not None
        try:
            assert conn._local_tcp and conn.decoder.divert is None
            for cookie in (1, 2):
                offset = rng.randrange(0, SIZE - PAYLOAD)
                data = rng.randbytes(PAYLOAD)
                expect[offset : offset + PAYLOAD] = data
                req = header(rc.CMD_WRITE, cookie, offset, PAYLOAD) + data
                if cookie == 1:  # so that the server reads the next header alone
                    await send_split(client, reads, conn.decoder, req, 28 + 1000)
                else:  # all queued: a unix socket splices this one
                    client.queue(req)
                assert await client.reply(cookie) == (0, b"")
            assert conn.spliced == 0
            await read_back(client, iter(range(3, 1000)), expect)
        finally:
            await served.close()

    run(loop_factory, main)


def test_which_peers_are_on_this_host() -> None:
    assert splice.same_host("127.0.0.1", "127.0.0.1")
    assert splice.same_host("10.0.0.5", "127.0.0.2")
    assert splice.same_host("::1", "::1")
    assert splice.same_host("::ffff:10.0.0.5", "::ffff:127.0.0.1")
    assert splice.same_host("10.0.0.5", "10.0.0.5")  # the host's own address: loopback
    assert not splice.same_host("10.0.0.5", "10.0.0.6")
    assert not splice.same_host("fe80::1%eth0", "fe80::2%eth0")


@pytest.mark.parametrize("loop_factory", loops())
def test_optimised_qcow_splices_into_its_extents(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An allocation-optimised QCOW over the raw driver splices a WRITE that lies in one
    extent to the extent's place in the file, allocating the extent first if need be;
    a WRITE over two extents is received and split as usual. qemu-img reads it back."""
    seed = random.randrange(1 << 32)
    print("seed", seed)
    rng = random.Random(seed)
    image = tmp_path / "disk.qcow"
    asyncio.run(create_qcow(str(image), SIZE, optimise=True))
    expect = bytearray(SIZE)
    cookies = iter(range(1, 1000))

    async def main() -> None:
        reads, arrivals = Reads(monkeypatch), Arrivals(monkeypatch)
        top = await open_image(str(image), fmt="qcow")
        assert isinstance(top, QcowDriver) and top.splices
        extent = 1 << top.g.shift
        assert SIZE >= 4 * extent >= 4 * PAYLOAD
        served = await serve(image, top=top)
        conn, driver, client = served.conn, served.driver, served.client

        assert conn.decoder is not None
        decoder = conn.decoder

        async def write(offset: int, first: bool = False) -> None:
            cookie, data = next(cookies), rng.randbytes(PAYLOAD)
            expect[offset : offset + PAYLOAD] = data
            req = header(rc.CMD_WRITE, cookie, offset, PAYLOAD) + data
            if first:  # after it the server reads a lone header
                await send_split(client, reads, decoder, req, 28 + 1000)
            else:
                client.queue(req)
            assert await client.reply(cookie) == (0, b"")

        try:
            # Across the boundary of extents 2 and 1 (allocating both, 2 first): not
            # spliced, received and split as usual.
            await write(2 * extent - rng.randrange(1, PAYLOAD), first=True)
            assert conn.spliced == 0
            if driver._nowait_write:
                pytest.skip("this file system takes RWF_NOWAIT writes: they stay pwrites")
            # A WRITE all queued, across the same boundary: not spliced either.
            await write(2 * extent - rng.randrange(1, PAYLOAD))
            assert conn.spliced == 0
            # Extent 3 before extent 0: allocation order is not guest order, so an
            # extent's place in the file is not its place on the disk.
            for k, e in enumerate([3, 0, 1, 3, 2]):
                await write(e * extent + rng.randrange(0, extent - PAYLOAD + 1))
                assert conn.spliced == k + 1
            # Arriving in pieces across the boundary of extents 0 and 1: the parts in
            # extent 0 are spliced to its place, the one over the boundary is refused,
            # and the rest is received and split as usual.
            offset = extent - PAYLOAD // 2
            cookie, data = next(cookies), rng.randbytes(PAYLOAD)
            expect[offset : offset + PAYLOAD] = data
            req = header(rc.CMD_WRITE, cookie, offset, PAYLOAD) + data
            cuts = [PAYLOAD // 4, 3 * PAYLOAD // 4]
            await send_arriving(client, conn, arrivals, req, cuts, rest=False)
            part = conn._arriving
            assert part is not None and part.put > 0 and part.buf is not None
            client.queue(req[28 + cuts[-1] :])
            assert await client.reply(cookie) == (0, b"")
            # Arriving within one extent: spliced.
            await write(3 * extent)  # (whole: the next header comes alone)
            offset = 3 * extent + rng.randrange(0, extent - PAYLOAD + 1)
            cookie, data = next(cookies), rng.randbytes(PAYLOAD)
            expect[offset : offset + PAYLOAD] = data
            req = header(rc.CMD_WRITE, cookie, offset, PAYLOAD) + data
            await send_arriving(client, conn, arrivals, req, [rng.randrange(1, PAYLOAD)])
            assert await client.reply(cookie) == (0, b"")
            assert conn.spliced == 7
            # Every WRITE counted once, with all its bytes, whichever way it went (the
            # one across extents partly spliced, partly not).
            assert conn.backend is not None
            writes = conn.backend.stats.ops["write"]
            assert (writes.ops, writes.bytes, writes.max_bytes) == (10, 10 * PAYLOAD, PAYLOAD)
            await read_back(client, cookies, expect)
        finally:
            await served.close()

    run(loop_factory, main)
    want = tmp_path / "want.raw"
    want.write_bytes(expect)
    subprocess.run(
        ["qemu-img", "compare", "-f", "qcow", "-F", "raw", str(image), str(want)], check=True
    )
    res = asyncio.run(check_qcow(str(image)))
    assert res.exit_code == 0, res.to_json()


@pytest.mark.parametrize("loop_factory", loops())
def test_a_probed_raw_image_splices_past_its_first_sector_only(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``tapnbd serve disk.img`` probes the image and guards its first sector
    (formats/guard.py). Big WRITEs past it still splice; one that touches it is not
    spliced, so the guard sees its payload: a QCOW header there is refused with EPERM
    and the image still probes as raw."""
    seed = random.randrange(1 << 32)
    print("seed", seed)
    rng = random.Random(seed)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SIZE))
    header_file = tmp_path / "header.qcow"
    asyncio.run(create_qcow(str(header_file), SIZE))
    qcow_header = header_file.read_bytes()[:PROBE_SIZE]
    assert probe_bytes(qcow_header) == "qcow"
    expect = bytearray(SIZE)
    cookies = iter(range(1, 1000))

    async def main() -> None:
        reads, arrivals = Reads(monkeypatch), Arrivals(monkeypatch)
        top = await open_image(str(image), rules=OpenRules(share=True))
        assert isinstance(top, ProbedRawGuard) and top.splices
        served = await serve(image, top=top)
        conn, driver, client = served.conn, served.driver, served.client
        assert conn.decoder is not None
        decoder = conn.decoder

        async def write(
            offset: int, data: bytes, first: bool = False, arriving: bool = False
        ) -> int:
            cookie = next(cookies)
            req = header(rc.CMD_WRITE, cookie, offset, len(data)) + data
            if first:  # after it the server reads a lone header
                await send_split(client, reads, decoder, req, 28 + 1000)
            elif arriving:  # in pieces, after a WRITE that went whole
                await send_arriving(client, conn, arrivals, req, [PROBE_SIZE // 2, PAYLOAD // 2])
            else:
                client.queue(req)
            error, _ = await client.reply(cookie)
            if not error:
                expect[offset : offset + len(data)] = data
            return error

        def payload() -> bytes:
            return bytes(16) + rng.randbytes(PAYLOAD - 16)  # probes as raw

        try:
            assert await write(SIZE - PAYLOAD, payload(), first=True) == 0
            assert conn.spliced == 0
            if driver._nowait_write:
                pytest.skip("this file system takes RWF_NOWAIT writes: they stay pwrites")
            # Past the probed bytes: spliced.
            assert await write(PROBE_SIZE + rng.randrange(SIZE // 2), payload()) == 0
            assert conn.spliced == 1
            # Over them: received, checked and written, not spliced.
            assert await write(0, payload()) == 0
            assert await write(PROBE_SIZE - 1, payload()) == 0
            assert conn.spliced == 1
            # A QCOW header over them: refused, whole.
            assert await write(0, qcow_header + payload()) == errno.EPERM
            assert conn.spliced == 1
            assert await write(PROBE_SIZE, payload()) == 0
            assert conn.spliced == 2
            # The same, arriving in pieces, the first of them all in the probed bytes:
            # over them nothing is spliced, past them it is.
            assert await write(0, qcow_header + payload(), arriving=True) == errno.EPERM
            assert await write(PROBE_SIZE, payload()) == 0
            assert await write(0, payload(), arriving=True) == 0
            assert conn.spliced == 3
            assert await write(PROBE_SIZE, payload()) == 0
            assert await write(PROBE_SIZE + rng.randrange(SIZE // 2), payload(), arriving=True) == 0
            assert conn.spliced == 5
            await read_back(client, cookies, expect)
        finally:
            await served.close()

    run(loop_factory, main)
    assert image.read_bytes() == bytes(expect)
    assert probe(str(image)) == "raw"


@pytest.mark.parametrize("loop_factory", loops())
def test_a_client_gone_mid_payload_leaves_nothing_held(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that sends a big WRITE's header and part of its payload, then hangs up:
    the WRITE's charge, its statistics and the socket's watch all end with it."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(SIZE))
    gone = asyncio.Event()
    lost = NBDConnection.connection_lost

    def noticed(conn: NBDConnection, exc: Exception | None) -> None:
        lost(conn, exc)
        gone.set()

    monkeypatch.setattr(NBDConnection, "connection_lost", noticed)

    async def main() -> None:
        reads, arrivals = Reads(monkeypatch), Arrivals(monkeypatch)
        served = await serve(image)
        conn, driver, client = served.conn, served.driver, served.client
        assert conn.decoder is not None
        try:
            req = header(rc.CMD_WRITE, 1, 0, PAYLOAD) + bytes(PAYLOAD)
            await send_split(client, reads, conn.decoder, req, 28 + 1000)
            assert await client.reply(1) == (0, b"")
            if driver._nowait_write:
                pytest.skip("this file system takes RWF_NOWAIT writes: they stay pwrites")
            req = header(rc.CMD_WRITE, 2, 0, PAYLOAD) + bytes(PAYLOAD)
            await send_arriving(client, conn, arrivals, req, [PAYLOAD // 2], rest=False)
            assert conn._arriving is not None
            assert served.server.budget.used == PAYLOAD
            assert driver.size() == SIZE and conn.backend is not None
            assert conn.backend.stats.in_flight == 1
            client.sock.close()
            await asyncio.wait_for(gone.wait(), 30)
            assert conn._arriving is None and conn._payload_fd == -1
            assert served.server.budget.used == 0 and conn.in_flight == 0
            assert conn.backend is not None and conn.backend.stats.in_flight == 0
        finally:
            await served.close()

    run(loop_factory, main)


def test_a_pipe_fill_that_comes_short_says_so() -> None:
    """PayloadPipe.fill is for a payload that FIONREAD said is all queued: fewer bytes
    than that is an error (the stream is out of step), and the end of the stream is
    EOFError; fill_some takes what there is."""
    a, b = socket.socketpair()
    pipe = PayloadPipe()
    try:
        assert pipe.open()
        a.setblocking(False)
        b.sendall(b"x" * 1000)
        assert queued(a.fileno()) == 1000
        with pytest.raises(OSError) as e:
            pipe.fill(a.fileno(), 1500)
        assert e.value.errno == errno.EAGAIN and "500 bytes" in str(e.value)
        assert bytes(pipe.take_back(1000, bytearray(1000))) == b"x" * 1000
        b.sendall(b"y" * 300)
        assert pipe.fill_some(a.fileno(), 1000) == 300
        pipe.drain()
        b.sendall(b"z" * 200)
        pipe.fill(a.fileno(), 200)
        assert bytes(pipe.take_back(200, bytearray(200))) == b"z" * 200
        b.close()
        with pytest.raises(EOFError):
            pipe.fill(a.fileno(), 10)
    finally:
        pipe.close()
        a.close()
        b.close()
