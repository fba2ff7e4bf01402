"""nbd: an image on another NBD server (nbdkit's nbd plugin, qemu's nbd driver).

Names are NBD URIs: ``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``,
and with TLS ``nbds://`` and ``nbds+unix://`` (``?tls-certificates=DIR`` names a
directory with ``ca-cert.pem`` and, for a client certificate, ``client-cert.pem`` and
``client-key.pem``, libnbd's layout). The sans-I/O client codec
(``tapnbd.protocol.client``) does the protocol; this module is its asyncio shell.

Requests are pipelined: each gets a cookie and a future, and replies complete them in
whatever order the server sends. When the server advertises CAN_MULTI_CONN the driver
opens ``CONNECTIONS`` connections and spreads requests over them; a FLUSH then goes to
one connection, which the server's multi-conn promise makes cover the others.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import cast

from formats import NBD_SCHEMES
from formats import is_nbd as is_nbd
from tapnbd.driver import BlockSize, Driver, Extent, ExtentFlags, FuaMode
from tapnbd.errors import ImageError, ProtocolError
from tapnbd.protocol.client import (
    ClientHandshake,
    Connected,
    Reply,
    ReplyDecoder,
    StartTLS,
    encode_request,
    parse_extents,
)
from tapnbd.protocol.consts import Cmd, CmdFlag, ReplyType, TransmissionFlag

DEFAULT_PORT = 10809
#: Connections opened when the server allows multi-conn.
CONNECTIONS = 4
#: Seconds to connect and finish the handshake.
CONNECT_TIMEOUT = 30.0
#: Extents one BLOCK_STATUS gives its caller, as the image formats give (it asks again).
MAX_EXTENTS = 1024


@dataclass(frozen=True)
class NbdUri:
    uri: str
    export: str
    tls: bool
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None
    certificates: str | None = None

    @classmethod
    def parse(cls, uri: str) -> NbdUri:
        u = urllib.parse.urlsplit(uri)
        if u.scheme not in NBD_SCHEMES:
            raise ImageError(f"{uri}: not an NBD URI (nbd://, nbd+unix://, nbds://...)")
        query = urllib.parse.parse_qs(u.query)
        export = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path)
        tls = u.scheme.startswith("nbds")
        certs = query.get("tls-certificates", [None])[0]
        if u.scheme.endswith("+unix"):
            sock = query.get("socket", [None])[0]
            if not sock:
                raise ImageError(f"{uri}: a +unix URI needs ?socket=PATH")
            return cls(uri, export, tls, socket=sock, certificates=certs)
        if not u.hostname:
            raise ImageError(f"{uri}: no host")
        try:
            port = u.port or DEFAULT_PORT
        except ValueError:
            raise ImageError(f"{uri}: invalid port") from None
        return cls(uri, export, tls, host=u.hostname, port=port, certificates=certs)

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context()
        if self.certificates:
            d = self.certificates
            ctx.load_verify_locations(os.path.join(d, "ca-cert.pem"))
            cert, key = os.path.join(d, "client-cert.pem"), os.path.join(d, "client-key.pem")
            if os.path.exists(cert) and os.path.exists(key):
                ctx.load_cert_chain(cert, key)
        if self.socket:
            ctx.check_hostname = False  # a unix socket has no host name to check
        return ctx


class _Connection(asyncio.Protocol):
    """One connection in transmission phase: pipelined requests, replies by cookie."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.decoder = ReplyDecoder()
        self.waiting: dict[int, tuple[asyncio.Future[object], _Request]] = {}
        self.lost: BaseException | None = None
        self.handshake_data: asyncio.Queue[bytes] = asyncio.Queue()
        self.in_handshake = True
        # Set while the transport takes more: a server that stops reading its socket
        # must stop our sending (and so our clients' requests), not fill our memory.
        self.can_send = asyncio.Event()
        self.can_send.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def pause_writing(self) -> None:
        self.can_send.clear()

    def resume_writing(self) -> None:
        self.can_send.set()

    def data_received(self, data: bytes) -> None:
        if self.in_handshake:
            self.handshake_data.put_nowait(data)
            return
        try:
            replies = self.decoder.feed(data)
        except ProtocolError as e:
            self._fail(OSError(errno.EIO, f"NBD server: {e}"))
            assert self.transport is not None
            self.transport.abort()
            return
        for reply in replies:
            self._deliver(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(OSError(errno.EIO, "NBD server closed the connection"))
        self.can_send.set()  # wakes the senders, which find the connection lost
        if self.in_handshake:
            self.handshake_data.put_nowait(b"")

    def _fail(self, exc: BaseException) -> None:
        self.lost = exc
        for fut, _ in self.waiting.values():
            if not fut.done():
                fut.set_exception(exc)
        self.waiting.clear()

    def _deliver(self, reply: Reply) -> None:
        entry = self.waiting.get(reply.cookie)
        if entry is None:
            self._fail(OSError(errno.EIO, f"NBD server replied to unknown cookie {reply.cookie}"))
            return
        fut, req = entry
        req.take(reply)
        if reply.done:
            del self.waiting[reply.cookie]
            if not fut.done():
                if req.error:
                    fut.set_exception(OSError(req.error, req.message or os.strerror(req.error)))
                else:
                    fut.set_result(req.result())


class _Request:
    """What a request collects from its replies."""

    def __init__(self, cmd: int, offset: int, length: int, meta_id: int | None) -> None:
        self.cmd, self.offset, self.length, self.meta_id = cmd, offset, length, meta_id
        self.buf = bytearray(length) if cmd == Cmd.READ else None
        self.covered = 0
        self.extents: list[tuple[int, int]] | None = None
        self.error = 0
        self.message = ""

    def take(self, r: Reply) -> None:
        if r.error:
            self.error = self.error or r.error
            self.message = self.message or r.message
            return
        if self.buf is not None:
            if r.kind is None:
                self.buf[:] = r.data
                self.covered = self.length
            elif r.kind in (ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE):
                start = r.offset - self.offset
                if start < 0 or start + r.length > self.length:
                    self.error, self.message = errno.EIO, "NBD server sent a chunk out of range"
                    return
                if r.kind == ReplyType.OFFSET_DATA:
                    self.buf[start : start + r.length] = r.data
                # the buffer starts zeroed, so a hole needs no copy
                self.covered += r.length
        elif r.kind == ReplyType.BLOCK_STATUS:
            # As the formats' extents, at most MAX_EXTENTS per call (the caller asks again).
            ctx, extents = parse_extents(r.data, covering=self.length, most=MAX_EXTENTS)
            if ctx == self.meta_id:
                self.extents = extents

    def result(self) -> object:
        if self.buf is not None:
            if self.covered < self.length:
                return OSError(errno.EIO, "NBD server sent less data than asked for")
            return self.buf
        return self.extents


class NbdDriver(Driver):
    """An export on another NBD server."""

    name = "nbd"

    def __init__(self, uri: NbdUri, conns: list[_Connection], info: Connected) -> None:
        self.uri = uri
        self._conns = conns
        self._info = info
        self._cookies = itertools.count(1)
        self._next = itertools.cycle(range(len(conns)))
        self._flags = TransmissionFlag(info.flags)
        self._bitmap_ctx = dict(info.bitmaps)  # bitmap name -> its context id

    @classmethod
    async def open(cls, spec: str, read_only: bool) -> NbdDriver:
        uri = NbdUri.parse(spec)
        first, info = await _connect(uri)
        conns = [first]
        if info.flags & TransmissionFlag.CAN_MULTI_CONN:
            try:
                for _ in range(CONNECTIONS - 1):
                    conns.append((await _connect(uri))[0])
            except (OSError, ImageError):
                pass  # fewer connections still work
        drv = cls(uri, conns, info)
        drv._read_only = read_only or bool(info.flags & TransmissionFlag.READ_ONLY)
        return drv

    _read_only = False

    async def _request(
        self,
        cmd: int,
        offset: int,
        length: int,
        flags: int = 0,
        payload: bytes | memoryview = b"",
        ctx: int | None = None,
    ) -> object:
        conn = self._conns[next(self._next)] if len(self._conns) > 1 else self._conns[0]
        if not conn.can_send.is_set():
            await conn.can_send.wait()
        if conn.lost is not None:
            lost = conn.lost
            raise OSError(errno.EIO, getattr(lost, "strerror", None) or str(lost))
        cookie = next(self._cookies)
        req = _Request(cmd, offset, length, self._info.meta_id if ctx is None else ctx)
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        conn.waiting[cookie] = (fut, req)
        if cmd == Cmd.READ:
            conn.decoder.expect_read(cookie, length)
        assert conn.transport is not None
        header = encode_request(flags, cmd, cookie, offset, length)
        if payload:
            conn.transport.writelines([header, payload])
        else:
            conn.transport.write(header)
        result = await fut
        if isinstance(result, OSError):
            raise result
        return result

    def size(self) -> int:
        return self._info.size

    async def pread(self, offset: int, length: int) -> bytearray:
        data = await self._request(Cmd.READ, offset, length)
        assert isinstance(data, bytearray)
        return data

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        # The transport may keep the buffer after we return; data is only lent to us.
        await self._request(Cmd.WRITE, offset, len(data), CmdFlag.FUA if fua else 0, bytes(data))

    async def flush(self) -> None:
        await self._request(Cmd.FLUSH, 0, 0)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._request(Cmd.TRIM, offset, length, CmdFlag.FUA if fua else 0)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        if fast and not self._flags & TransmissionFlag.SEND_FAST_ZERO:
            raise OSError(errno.ENOTSUP, "the upstream server has no fast zero")
        flags = (0 if may_trim else CmdFlag.NO_HOLE) | (CmdFlag.FUA if fua else 0)
        flags |= CmdFlag.FAST_ZERO if fast else 0
        await self._request(Cmd.WRITE_ZEROES, offset, length, flags)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return await self._status(offset, length, None, 3)

    def bitmaps(self) -> list[str]:
        return list(self._bitmap_ctx)

    async def bitmap_extents(self, name: str, offset: int, length: int) -> list[Extent]:
        ctx = self._bitmap_ctx.get(name)
        if ctx is None:
            raise OSError(errno.ENOTSUP, f"the upstream server has no bitmap {name!r}")
        return await self._status(offset, length, ctx, 1)  # bit 0: dirty

    async def _status(self, offset: int, length: int, ctx: int | None, mask: int) -> list[Extent]:
        """One BLOCK_STATUS: the runs of context ``ctx`` (None: base:allocation), their
        flags masked to the bits that context defines."""
        length = min(length, 0xFFFFFFFF - 0xFFFFFFFF % 512, self.size() - offset)
        found = await self._request(Cmd.BLOCK_STATUS, offset, length, ctx=ctx)
        if not found:
            return [Extent(offset, length)]
        out, pos = [], offset
        assert isinstance(found, list)
        for n, flags in found:
            if n == 0:
                break
            out.append(Extent(pos, n, ExtentFlags(flags & mask)))
            pos += n
        return out or [Extent(offset, length)]

    async def cache(self, offset: int, length: int) -> None:
        await self._request(Cmd.CACHE, offset, length)

    def can_write(self) -> bool:
        return not self._read_only

    def can_flush(self) -> bool:
        return bool(self._flags & TransmissionFlag.SEND_FLUSH)

    def can_fua(self) -> FuaMode:
        if self._flags & TransmissionFlag.SEND_FUA:
            return FuaMode.NATIVE
        return FuaMode.EMULATE if self.can_flush() else FuaMode.NONE

    def can_trim(self) -> bool:
        return not self._read_only and bool(self._flags & TransmissionFlag.SEND_TRIM)

    def can_fast_zero(self) -> bool:
        return not self._read_only and bool(self._flags & TransmissionFlag.SEND_FAST_ZERO)

    def can_extents(self) -> bool:
        return self._info.meta_id is not None

    def can_cache(self) -> bool:
        return bool(self._flags & TransmissionFlag.SEND_CACHE)

    def can_multi_conn(self) -> bool:
        return bool(self._flags & TransmissionFlag.CAN_MULTI_CONN)

    def is_rotational(self) -> bool:
        return bool(self._flags & TransmissionFlag.ROTATIONAL)

    def block_size(self) -> BlockSize:
        i = self._info
        return BlockSize(i.minimum, i.preferred, min(i.maximum, 32 << 20))

    def describe(self) -> dict[str, object]:
        facts = super().describe()
        facts.update({"filename": self.uri.uri, "connections": len(self._conns)})
        return facts

    async def close(self) -> None:
        for conn in self._conns:
            if conn.transport is not None and conn.lost is None:
                conn.transport.write(encode_request(0, Cmd.DISC, 0, 0, 0))
                conn.transport.close()


async def _connect(uri: NbdUri) -> tuple[_Connection, Connected]:
    try:
        return await asyncio.wait_for(_handshake(uri), CONNECT_TIMEOUT)
    except TimeoutError:
        raise ImageError(f"{uri.uri}: no answer within {CONNECT_TIMEOUT:g} s") from None
    except ProtocolError as e:
        raise ImageError(f"{uri.uri}: {e}") from None
    except OSError as e:
        raise ImageError(f"{uri.uri}: {e.strerror or e}") from None


async def _handshake(uri: NbdUri) -> tuple[_Connection, Connected]:
    loop = asyncio.get_running_loop()
    if uri.socket:
        transport, conn = await loop.create_unix_connection(_Connection, uri.socket)
    else:
        assert uri.host is not None
        transport, conn = await loop.create_connection(_Connection, uri.host, uri.port)
    hs = ClientHandshake(uri.export, tls=uri.tls)
    try:
        while True:
            data = await conn.handshake_data.get()
            if not data:
                raise OSError(errno.ECONNRESET, "the server closed the connection")
            out, event = hs.receive(data)
            if out:
                conn.transport.write(out)  # type: ignore[union-attr]
            if isinstance(event, StartTLS):
                ctx = uri.ssl_context()
                assert ctx is not None
                new = await loop.start_tls(
                    transport, conn, ctx, server_hostname=uri.host or "localhost"
                )
                assert new is not None
                transport = conn.transport = new
                out, event = hs.receive(b"")
                if out:
                    transport.write(out)
            if isinstance(event, Connected):
                conn.in_handshake = False
                if not conn.handshake_data.empty():  # the server said more already
                    raise ProtocolError("the server sent data before any request")
                return conn, event
    except BaseException:
        transport.abort()
        raise


async def open_nbd(spec: str, read_only: bool) -> Driver:
    return await NbdDriver.open(spec, read_only)
