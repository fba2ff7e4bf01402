"""The client side of the NBD protocol, sans I/O: the same codec serves both ends (as h11).

``ClientHandshake`` is fed the server's bytes and returns what to send next, until it
reaches ``Connected`` (or raises ``ProtocolError`` naming what went wrong). It asks for
what tapnbd's nbd driver uses: fixed newstyle with NO_ZEROES, STARTTLS when asked,
structured replies, the ``base:allocation`` context and the server's dirty bitmaps
(``qemu:dirty-bitmap:*``, listed first: "qemu:dirty-bitmap:" is a wildcard for LIST
only), and GO with the block size info.

``encode_request`` builds a request; ``ReplyDecoder`` turns the server's bytes into
``Reply`` events, one per simple reply or structured chunk. A simple reply to a READ
carries data whose length only the client knows, so the decoder is told each READ's
length when it is sent (``expect_read``), as every NBD client must be.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from tapnbd.errors import ProtocolError
from tapnbd.protocol import wire
from tapnbd.protocol.consts import (
    BASE_ALLOCATION,
    DIRTY_BITMAP,
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyType,
)

#: The largest option reply we accept (a description is at most 4 KiB).
MAX_OPTION_REPLY = 64 * 1024
#: The largest structured chunk payload: a READ's data, at most 32 MiB plus its offset.
MAX_CHUNK = (32 << 20) + 64
#: The extents a BLOCK_STATUS chunk may hold. NBD spec: a server "SHOULD NOT" send
#: more than 2^20 per chunk; the few hundred MiB of Python tuples a 32 MiB chunk of
#: them would parse into is what a hostile server would have us spend.
MAX_STATUS_EXTENTS = 1 << 20
MAX_STATUS_CHUNK = 4 + 8 * MAX_STATUS_EXTENTS
#: The server's dirty bitmaps selected at most: each one is a chunk in every
#: BLOCK_STATUS reply, and a hostile server may list any number.
MAX_BITMAPS = 16


@dataclass(frozen=True)
class Connected:
    """The handshake is done: the export's facts, and what was negotiated."""

    size: int
    flags: int
    structured: bool
    meta_id: int | None  # the base:allocation context id, if the server has it
    minimum: int = 1
    preferred: int = 4096
    maximum: int = 32 << 20
    #: The server's dirty bitmaps selected: (bitmap name, context id).
    bitmaps: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class StartTLS:
    """Wrap the connection in TLS now, then keep feeding the handshake."""


@dataclass
class ClientHandshake:
    export: str
    tls: bool = False
    _buf: bytearray = field(default_factory=bytearray)
    _step: str = "greeting"
    _structured: bool = False
    _meta_id: int | None = None
    _listed: list[str] = field(default_factory=list)
    _bitmaps: dict[str, int] = field(default_factory=dict)
    _size: int | None = None
    _flags: int = 0
    _block: tuple[int, int, int] = (1, 4096, 32 << 20)
    _progress: bool = False

    def receive(self, data: bytes) -> tuple[bytes, Connected | StartTLS | None]:
        """Feed the server's bytes; return (bytes to send, event or None if more is needed)."""
        self._buf += data
        out = bytearray()
        while True:
            event = self._advance(out)
            if event is not None or not self._progress:
                return bytes(out), event

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        return chunk

    def _option(self, out: bytearray, opt: Opt, payload: bytes = b"") -> None:
        out += wire.OPTION.pack(IHAVEOPT, opt, len(payload)) + payload

    def _meta_payload(self, queries: list[str]) -> bytes:
        name = self.export.encode()
        out = wire.U32.pack(len(name)) + name + wire.U32.pack(len(queries))
        for q in queries:
            out += wire.U32.pack(len(q.encode())) + q.encode()
        return out

    def _go_payload(self) -> bytes:
        name = self.export.encode()
        return wire.U32.pack(len(name)) + name + wire.U16.pack(1) + wire.U16.pack(Info.BLOCK_SIZE)

    def _reply(self) -> tuple[int, int, bytes] | None:
        """One option reply (option, type, payload), or None if incomplete."""
        size = wire.OPTION_REPLY.size
        if len(self._buf) < size:
            return None
        magic, opt, rep, length = wire.OPTION_REPLY.unpack_from(self._buf)
        if magic != REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic {magic:#x}")
        if length > MAX_OPTION_REPLY:
            raise ProtocolError(f"option reply of {length} bytes is too long")
        if len(self._buf) < size + length:
            return None
        payload = bytes(self._buf[size : size + length])
        del self._buf[: size + length]
        return opt, rep, payload

    def _advance(self, out: bytearray) -> Connected | StartTLS | None:
        self._progress = False
        if self._step == "greeting":
            head = self._take(wire.GREETING.size)
            if head is None:
                return None
            magic, opt_magic, flags = wire.GREETING.unpack(head)
            if magic != NBDMAGIC:
                raise ProtocolError("not an NBD server (bad magic)")
            if opt_magic != IHAVEOPT:
                raise ProtocolError("the server speaks oldstyle NBD, which is not supported")
            if not flags & HandshakeFlag.FIXED_NEWSTYLE:
                raise ProtocolError("the server does not offer fixed newstyle negotiation")
            cflags = ClientFlag.FIXED_NEWSTYLE
            if flags & HandshakeFlag.NO_ZEROES:
                cflags |= ClientFlag.NO_ZEROES
            out += wire.CLIENT_FLAGS.pack(cflags)
            if self.tls:
                self._option(out, Opt.STARTTLS)
                self._step = "starttls"
            else:
                self._after_tls(out)
            self._progress = True
            return None
        if self._step == "tls-done":  # TLS is up: negotiation goes on inside it
            self._after_tls(out)
            self._progress = True
            return None
        reply = self._reply()
        if reply is None:
            return None
        self._progress = True
        opt, rep, payload = reply
        if self._step == "starttls":
            if rep != Rep.ACK:
                raise ProtocolError(f"the server refused STARTTLS ({_rep_name(rep)})")
            if self._buf:  # bytes after the ACK would be injected in the clear
                raise ProtocolError("the server sent data after its STARTTLS reply")
            self._step = "tls-done"
            return StartTLS()
        if self._step == "structured":
            if rep == Rep.ACK:
                self._structured = True
            elif not rep & (1 << 31):
                raise ProtocolError(f"unexpected reply {_rep_name(rep)} to STRUCTURED_REPLY")
            if self._structured:
                self._option(out, Opt.LIST_META_CONTEXT, self._meta_payload([DIRTY_BITMAP]))
                self._step = "list"
            else:
                self._option(out, Opt.GO, self._go_payload())
                self._step = "go"
            return None
        if self._step == "list":
            if rep == Rep.META_CONTEXT and len(payload) >= 4:
                name = payload[4:].decode(errors="replace")
                wanted = name.startswith(DIRTY_BITMAP) and len(name) > len(DIRTY_BITMAP)
                if wanted and len(self._listed) < MAX_BITMAPS and name not in self._listed:
                    self._listed.append(name)
                return None
            # ACK, or an error from a server without the qemu namespace: select anyway.
            if rep != Rep.ACK and not rep & (1 << 31):
                raise ProtocolError(f"unexpected reply {_rep_name(rep)} to LIST_META_CONTEXT")
            queries = [BASE_ALLOCATION, *self._listed]
            self._option(out, Opt.SET_META_CONTEXT, self._meta_payload(queries))
            self._step = "meta"
            return None
        if self._step == "meta":
            if rep == Rep.META_CONTEXT and len(payload) >= 4:
                ctx_id = wire.U32.unpack_from(payload)[0]
                name = payload[4:].decode(errors="replace")
                if name == BASE_ALLOCATION:
                    self._meta_id = ctx_id
                elif name in self._listed:  # only what was asked for
                    self._bitmaps[name.removeprefix(DIRTY_BITMAP)] = ctx_id
                return None
            if rep != Rep.ACK and not rep & (1 << 31):
                raise ProtocolError(f"unexpected reply {_rep_name(rep)} to SET_META_CONTEXT")
            self._option(out, Opt.GO, self._go_payload())
            self._step = "go"
            return None
        if self._step == "go":
            if rep == Rep.INFO:
                self._info(payload)
                return None
            if rep == Rep.ACK:
                if self._size is None:
                    raise ProtocolError("the server finished GO without NBD_INFO_EXPORT")
                return Connected(
                    self._size,
                    self._flags,
                    self._structured,
                    self._meta_id,
                    *self._block,
                    bitmaps=tuple(self._bitmaps.items()),
                )
            message = payload.decode(errors="replace")[:MAX_STRING]
            raise ProtocolError(
                f"export {self.export!r}: {_rep_name(rep)}" + (f": {message}" if message else "")
            )
        raise ProtocolError(f"reply {_rep_name(rep)} to option {opt} in step {self._step}")

    def _after_tls(self, out: bytearray) -> None:
        self._option(out, Opt.STRUCTURED_REPLY)
        self._step = "structured"

    def _info(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise ProtocolError("empty NBD_REP_INFO")
        kind = wire.U16.unpack_from(payload)[0]
        if kind == Info.EXPORT and len(payload) >= wire.INFO_EXPORT.size:
            _, self._size, self._flags = wire.INFO_EXPORT.unpack_from(payload)
        elif kind == Info.BLOCK_SIZE and len(payload) >= wire.INFO_BLOCK_SIZE.size:
            _, minimum, preferred, maximum = wire.INFO_BLOCK_SIZE.unpack_from(payload)
            self._block = (minimum, preferred, maximum)


def _rep_name(rep: int) -> str:
    try:
        return Rep(rep).name
    except ValueError:
        return f"reply {rep:#x}"


def encode_request(flags: int, cmd: int, cookie: int, offset: int, length: int) -> bytes:
    """A request header (its WRITE payload follows it on the wire)."""
    return wire.REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


@dataclass(frozen=True)
class Reply:
    """One simple reply or structured chunk.

    ``kind`` is None for a simple reply, else the chunk's ReplyType. ``offset`` is the
    chunk's offset (OFFSET_DATA and OFFSET_HOLE); ``data`` the read data, the hole's
    length in ``length``, or the raw BLOCK_STATUS payload.
    """

    cookie: int
    done: bool
    error: int = 0
    kind: int | None = None
    offset: int = 0
    length: int = 0
    data: bytes = b""
    message: str = ""


_CHUNK = wire.CHUNK
_SIMPLE = wire.SIMPLE_REPLY
_U64 = wire.U64
_U32 = wire.U32


class ReplyDecoder:
    """Bytes from the server in, ``Reply`` events out."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._reads: dict[int, int] = {}  # cookie -> length, for simple replies to READ

    def expect_read(self, cookie: int, length: int) -> None:
        self._reads[cookie] = length

    def forget(self, cookie: int) -> None:
        self._reads.pop(cookie, None)

    def feed(self, data: bytes | memoryview) -> list[Reply]:
        self._buf += data
        out: list[Reply] = []
        while True:
            reply = self._one()
            if reply is None:
                return out
            out.append(reply)

    def _one(self) -> Reply | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        magic = _U32.unpack_from(buf)[0]
        if magic == SIMPLE_REPLY_MAGIC:
            if len(buf) < _SIMPLE.size:
                return None
            _, error, cookie = _SIMPLE.unpack_from(buf)
            n = 0 if error else self._reads.get(cookie, 0)
            if len(buf) < _SIMPLE.size + n:
                return None
            data = bytes(buf[_SIMPLE.size : _SIMPLE.size + n])
            del buf[: _SIMPLE.size + n]
            self._reads.pop(cookie, None)
            return Reply(cookie, True, error, None, 0, n, data)
        if magic != STRUCTURED_REPLY_MAGIC:
            raise ProtocolError(f"bad reply magic {magic:#x}")
        if len(buf) < _CHUNK.size:
            return None
        _, flags, kind, cookie, length = _CHUNK.unpack_from(buf)
        if length > MAX_CHUNK or (kind == ReplyType.BLOCK_STATUS and length > MAX_STATUS_CHUNK):
            raise ProtocolError(f"structured chunk of {length} bytes is too long")
        if len(buf) < _CHUNK.size + length:
            return None
        payload = bytes(buf[_CHUNK.size : _CHUNK.size + length])
        del buf[: _CHUNK.size + length]
        done = bool(flags & 1)
        if done:
            self._reads.pop(cookie, None)
        return _chunk(cookie, done, kind, payload)


def _chunk(cookie: int, done: bool, kind: int, payload: bytes) -> Reply:
    if kind == ReplyType.NONE:
        return Reply(cookie, done, kind=kind)
    if kind == ReplyType.OFFSET_DATA:
        if len(payload) < 8:
            raise ProtocolError("OFFSET_DATA chunk shorter than its offset")
        offset = _U64.unpack_from(payload)[0]
        return Reply(
            cookie, done, kind=kind, offset=offset, length=len(payload) - 8, data=payload[8:]
        )
    if kind == ReplyType.OFFSET_HOLE:
        if len(payload) != 12:
            raise ProtocolError("OFFSET_HOLE chunk of the wrong size")
        offset, length = struct.unpack(">QI", payload)
        return Reply(cookie, done, kind=kind, offset=offset, length=length)
    if kind == ReplyType.BLOCK_STATUS:
        return Reply(cookie, done, kind=kind, data=payload)
    if kind & (1 << 15):  # an error chunk: error, message length, message[, offset]
        if len(payload) < 6:
            raise ProtocolError("error chunk too short")
        error, mlen = struct.unpack_from(">IH", payload)
        message = payload[6 : 6 + mlen].decode(errors="replace")
        return Reply(cookie, done, error=error or 5, kind=kind, message=message)
    raise ProtocolError(f"unknown structured reply type {kind}")


def parse_extents(
    payload: bytes, covering: int | None = None, most: int | None = None
) -> tuple[int, list[tuple[int, int]]]:
    """A BLOCK_STATUS payload: (context id, [(length, flags), ...]), stopping once the
    extents cover ``covering`` bytes or number ``most``: what lies past them would be
    dropped anyway, and a chunk may hold 2^20 of them."""
    if len(payload) < 4 or (len(payload) - 4) % 8:
        raise ProtocolError("BLOCK_STATUS chunk of the wrong size")
    ctx = _U32.unpack_from(payload)[0]
    out: list[tuple[int, int]] = []
    total = 0
    for o in range(4, len(payload), 8):
        n, flags = wire.EXTENT.unpack_from(payload, o)
        out.append((n, flags))
        total += n
        if (covering is not None and total >= covering) or (most is not None and len(out) >= most):
            break
    return ctx, out
