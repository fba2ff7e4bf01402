"""Big WRITEs spliced from the socket to the raw file (NBDConnection._splice_write).

An in-process server on one end of a unix socket pair: the test writes whole requests
into the socket from the loop's own thread, so when the server next runs, exactly what
the test meant to be queued is queued. Each case checks the connection's splice count
and, at the end, every byte of the file against what was written.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from formats.raw import RawDriver
from tapnbd.backend import Backend
from tapnbd.server.connection import SPLICE_MIN, NBDConnection
from tapnbd.server.exports import Export, ExportRegistry
from tapnbd.server.listener import NBDServer
from tests.server import rawclient as rc

KiB = 1024
SIZE = 8 << 20
#: Whole requests of this size fit in the socket pair's buffers (SO_SNDBUF below).
PAYLOAD = SPLICE_MIN + 40 * KiB
TIMEOUT = 20.0


def _loops() -> list[Any]:
    params: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        params.append(pytest.param(None, id="uvloop", marks=pytest.mark.skip("no uvloop")))
    else:
        params.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    return params


def _header(cmd: int, cookie: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", rc.REQUEST_MAGIC, 0, cmd, cookie, offset, length)


class Client:
    """The test's end of the socket pair; blocking calls, made from the loop's thread
    only where the server must not run meanwhile."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def queue(self, data: bytes) -> None:
        """Put ``data`` in the socket while the server cannot read any of it."""
        self.sock.setblocking(False)
        try:
            assert self.sock.send(data) == len(data), "the socket pair's buffer is too small"
        finally:
            self.sock.setblocking(True)

    async def reply(self, cookie: int, data_len: int = 0) -> tuple[int, bytes]:
        error, got, data = await asyncio.to_thread(rc.simple_reply, self.sock, data_len)
        assert got == cookie
        return error, data


class Reads:
    """Wakes the test each time the server has taken bytes from its socket."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.event = asyncio.Event()
        original = NBDConnection.buffer_updated

        def noticed(conn: NBDConnection, nbytes: int) -> None:
            original(conn, nbytes)
            self.event.set()

        # On the class: uvloop binds the protocol's method when the connection starts.
        monkeypatch.setattr(NBDConnection, "buffer_updated", noticed)

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self.event.clear()
            await asyncio.wait_for(self.event.wait(), TIMEOUT)


async def _serve(
    image: Path,
) -> tuple[NBDServer, NBDConnection, RawDriver, Client]:
    driver = RawDriver(str(image))
    registry = ExportRegistry()
    registry.add(Export("", Backend(driver)), default=True)
    server = NBDServer(registry)
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    ours.settimeout(TIMEOUT)
    loop = asyncio.get_running_loop()
    await loop.connect_accepted_socket(server._factory, theirs)
    (conn,) = server.connections
    await asyncio.to_thread(rc.greet, ours)
    await asyncio.to_thread(rc.go, ours)
    return server, conn, driver, Client(ours)


def _run(loop_factory: Callable[[], asyncio.AbstractEventLoop], main: Any) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


@pytest.mark.parametrize("loop_factory", _loops())
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
        return cookie, _header(rc.CMD_WRITE, cookie, offset, PAYLOAD) + data

    def place() -> int:
        return rng.randrange(0, SIZE - PAYLOAD)

    async def main() -> None:
        reads = Reads(monkeypatch)
        server, conn, driver, client = await _serve(image)
        assert conn.decoder is not None
        decoder = conn.decoder

        def receiving() -> bool:  # a WRITE's payload is being received into its buffer
            return decoder.taken() is not None

        try:
            # 1. Part of the payload comes with the header (it is in the socket with
            # it): received as usual, into the payload's buffer. After it the server
            # reads a lone header, so the next WRITE's payload is still in the socket.
            cookie, req = write(place())
            client.queue(req[: 28 + 1000])
            await reads.until(receiving)  # the rest only then
            await asyncio.to_thread(client.sock.sendall, req[28 + 1000 :])
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
            client.queue(req[: 28 + PAYLOAD // 2])
            await reads.until(receiving)  # offered for splicing and refused, then the rest
            await asyncio.to_thread(client.sock.sendall, req[28 + PAYLOAD // 2 :])
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
            client.queue(_header(rc.CMD_WRITE, cookie, failed, PAYLOAD) + bytes(PAYLOAD))
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
            for offset in range(0, SIZE, 1 << 20):
                cookie = next(cookies)
                client.queue(_header(rc.CMD_READ, cookie, offset, 1 << 20))
                got = await client.reply(cookie, 1 << 20)
                assert got == (0, bytes(expect[offset : offset + (1 << 20)])), offset
        finally:
            client.sock.close()
            await server.shutdown(timeout=TIMEOUT)
            await driver.close()
        assert image.read_bytes() == bytes(expect)

    _run(loop_factory, main)
