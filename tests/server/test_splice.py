"""Big WRITEs spliced from the socket to the raw file (NBDConnection._splice_write).

An in-process server on one end of a unix socket pair (tests/server/inproc.py): the test
writes whole requests into the socket from the loop's own thread, so when the server
next runs, exactly what the test meant to be queued is queued. Each case checks the
connection's splice count and, at the end, every byte of the file against what was
written.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from formats import PROBE_SIZE, OpenRules, open_image, probe, probe_bytes
from formats.guard import ProbedRawGuard
from formats.qcow.check import check_qcow
from formats.qcow.create import create_qcow
from formats.qcow.driver import QcowDriver
from tapnbd.protocol.transmission import RequestDecoder
from tapnbd.server.connection import SPLICE_MIN
from tests.server import rawclient as rc
from tests.server.inproc import Client, Reads, header, loops, run, serve

KiB = 1024
SIZE = 8 << 20
#: Whole requests of this size fit in the socket pair's buffers (SO_SNDBUF in inproc).
PAYLOAD = SPLICE_MIN + 40 * KiB


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


@pytest.mark.parametrize("loop_factory", loops())
def test_queued_payloads_are_spliced_and_the_rest_is_not(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed = random.randrange(1 << 32)
    print("seed", seed)
    rng = random.Random(seed)
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(SIZE))
    expect = bytearray(SIZE)
    cookies = iter(range(1, 1000))

    def write(offset: int) -> tuple[int, bytes]:
        cookie, data = next(cookies), rng.randbytes(PAYLOAD)
        expect[offset : offset + PAYLOAD] = data
        return cookie, header(rc.CMD_WRITE, cookie, offset, PAYLOAD) + data

    def place() -> int:
        return rng.randrange(0, SIZE - PAYLOAD)

    async def main() -> None:
        reads = Reads(monkeypatch)
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

            # 3. The header and half the payload: a client that stalls mid-payload must
            # not hold the loop, so it is received as usual.
            cookie, req = write(place())
            # (Offered for splicing and refused, then the rest.)
            await send_split(client, reads, decoder, req, 28 + PAYLOAD // 2)
            assert await client.reply(cookie) == (0, b"")
            assert conn.spliced == 1

            # 4. The driver is backing off (a write slept): the payload is spliced
            # into the pipe, refused, read back out and written by the thread pool.
            driver._inline_after = time.monotonic() + 3600
            cookie, req = write(place())
            client.queue(req)
            assert await client.reply(cookie) == (0, b"")
            assert conn.spliced == 1
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
            assert conn.spliced == 1
            for _ in range(3):  # 6. and on as before
                cookie, req = write(place())
                client.queue(req)
                assert await client.reply(cookie) == (0, b"")
            assert conn.spliced == 4

            # Everything reads back, through the server and from the file.
            await read_back(client, cookies, expect)
        finally:
            await served.close()
        assert image.read_bytes() == bytes(expect)

    run(loop_factory, main)


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
        reads = Reads(monkeypatch)
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
        reads = Reads(monkeypatch)
        top = await open_image(str(image), rules=OpenRules(share=True))
        assert isinstance(top, ProbedRawGuard) and top.splices
        served = await serve(image, top=top)
        conn, driver, client = served.conn, served.driver, served.client
        assert conn.decoder is not None
        decoder = conn.decoder

        async def write(offset: int, data: bytes, first: bool = False) -> int:
            cookie = next(cookies)
            req = header(rc.CMD_WRITE, cookie, offset, len(data)) + data
            if first:  # after it the server reads a lone header
                await send_split(client, reads, decoder, req, 28 + 1000)
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
            await read_back(client, cookies, expect)
        finally:
            await served.close()

    run(loop_factory, main)
    assert image.read_bytes() == bytes(expect)
    assert probe(str(image)) == "raw"
