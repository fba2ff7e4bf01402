"""An in-process server on one end of a unix socket pair, for tests that must know
exactly what is queued in the server's socket when it next runs.

The test writes whole requests into the socket from the loop's own thread
(``Client.queue``), so the server cannot read any of them before the test yields.
``Reads`` wakes the test each time the server has taken bytes from its socket.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from formats.raw import RawDriver
from tapnbd.backend import Backend
from tapnbd.driver import Driver
from tapnbd.server.connection import NBDConnection
from tapnbd.server.exports import Export, ExportRegistry
from tapnbd.server.listener import NBDServer
from tests.server import rawclient as rc

TIMEOUT = 20.0


def loops() -> list[Any]:
    """pytest params: the asyncio loop and uvloop's."""
    params: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        params.append(pytest.param(None, id="uvloop", marks=pytest.mark.skip("no uvloop")))
    else:
        params.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    return params


def header(cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", rc.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


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


class Wakes:
    """Wakes the test each time the server has run ``NBDConnection.<method>``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
        self.event = asyncio.Event()
        original = getattr(NBDConnection, method)

        def noticed(conn: NBDConnection, *args: Any) -> None:
            original(conn, *args)
            self.event.set()

        # On the class: uvloop binds the protocol's method when the connection starts.
        monkeypatch.setattr(NBDConnection, method, noticed)

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self.event.clear()
            await asyncio.wait_for(self.event.wait(), TIMEOUT)


class Reads(Wakes):
    """Wakes the test each time the server has taken bytes from its socket."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(monkeypatch, "buffer_updated")


@dataclass
class Served:
    server: NBDServer
    conn: NBDConnection
    driver: RawDriver  # the image file's driver
    client: Client
    top: Driver  # the export's driver: ``driver`` itself, or a format over it

    async def close(self) -> None:
        self.client.sock.close()
        await self.server.shutdown(timeout=TIMEOUT)
        await self.top.close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of TCP sockets on 127.0.0.1 (client, server)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


async def serve(
    image: Path,
    *,
    read_only: bool = False,
    top: Driver | None = None,
    pair: Callable[[], tuple[socket.socket, socket.socket]] = socket.socketpair,
    **server_args: Any,
) -> Served:
    """A raw export of ``image`` and one connection to it (a unix socket pair, or
    ``pair``'s), past the handshake; or an export of ``top``, a driver over the raw
    driver of ``image``."""
    if top is None:
        driver = RawDriver(str(image))
        top = driver
    else:
        child = getattr(top, "child", None)
        assert isinstance(child, RawDriver), "top must be a format over the raw driver"
        driver = child
    registry = ExportRegistry()
    registry.add(Export("", Backend(top, read_only=read_only)), default=True)
    server = NBDServer(registry, **server_args)
    ours, theirs = pair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    ours.settimeout(TIMEOUT)
    loop = asyncio.get_running_loop()
    await loop.connect_accepted_socket(server._factory, theirs)
    (conn,) = server.connections
    await asyncio.to_thread(rc.greet, ours)
    await asyncio.to_thread(rc.go, ours)
    return Served(server, conn, driver, Client(ours), top)


def run(loop_factory: Callable[[], asyncio.AbstractEventLoop], main: Any) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
