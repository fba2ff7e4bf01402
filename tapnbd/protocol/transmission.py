"""Transmission phase: request decoding and reply encoding, with no I/O.

``RequestDecoder`` turns the client's byte stream into ``Request`` tuples, WRITE
payloads included. It keeps the stream in sync whatever the request says: a WRITE whose
payload is too large to serve is still read to its end and handed up with
``payload=None`` so the server can refuse it ("always drain a WRITE payload, even when
rejecting the request", nbdkit skip_over_write_buffer). Only a bad magic, or a payload
so large that reading it would be a denial of service, breaks the connection.

The encoders return ``bytes`` headers; payloads are passed alongside so that a reply is
written with one ``writelines`` call and never copied into a bigger buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from tapnbd import buffers
from tapnbd.driver import MAX_PAYLOAD
from tapnbd.errors import ProtocolError
from tapnbd.protocol import wire
from tapnbd.protocol.consts import (
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    ReplyFlag,
    ReplyType,
)

#: WRITE payloads above MAX_PAYLOAD but at most this are read and discarded, then
#: refused; larger ones drop the connection ("Either side MAY treat a huge payload as
#: DoS and hard-disconnect", proto.md "Size constraints").
MAX_DRAIN = 2 * MAX_PAYLOAD

# Plain ints for the encoders: enum member access costs on every reply.
_DONE = int(ReplyFlag.DONE)
_T_NONE, _T_DATA, _T_HOLE = (
    int(ReplyType.NONE),
    int(ReplyType.OFFSET_DATA),
    int(ReplyType.OFFSET_HOLE),
)
_T_ERROR, _T_BS = int(ReplyType.ERROR), int(ReplyType.BLOCK_STATUS)
_SIMPLE = wire.SIMPLE_REPLY.pack
_CHUNK_OFFSET = wire.CHUNK_OFFSET.pack
_CHUNK_HOLE = wire.CHUNK_HOLE.pack

_REQ = wire.REQUEST
_REQ_SIZE = _REQ.size
_COMPACT_AT = 1 << 20
_WRITE = int(Cmd.WRITE)
#: Receive buffer for headers and small payloads.
_SCRATCH = 256 * 1024
#: WRITE payloads from this size are received in place (see RequestDecoder).
_DIRECT_MIN = 64 * 1024
#: RequestDecoder.next_small_write takes WRITEs with payloads below this.
SMALL_WRITE = _DIRECT_MIN


class Request(NamedTuple):
    """One decoded request. ``payload`` is set for WRITE (None if it was too big)."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int
    payload: bytes | memoryview | None = None


#: Asked ``(type, length)`` before a request is taken; False leaves it unread for now.
Admit = Callable[[int, int], bool]


class RequestDecoder:
    """Incremental decoder of compact requests (28-byte header + WRITE payload).

    With ``admit``, each request is offered to it before it is taken: once its header
    is here, and for a WRITE once its payload is here or is about to be received into
    a buffer of its own (allocated only after ``admit`` said yes). A request refused is
    left in the buffer and offered again on the next ``next_request`` call, so a
    server can stop decoding when it has no room, and go on later.

    Two ways in. ``feed(data)`` takes bytes (tests, the handshake's leftovers). The
    ``get_buffer``/``buffer_updated`` pair serves asyncio's BufferedProtocol: a large
    WRITE payload is then received straight into its own buffer, with no copy in
    user space, which halves the cost of sequential writes.
    """

    def __init__(
        self, max_payload: int = MAX_PAYLOAD, max_drain: int = MAX_DRAIN, admit: Admit | None = None
    ) -> None:
        self.admit = admit
        self.max_payload = max_payload
        # next_small_write's bound: a payload over max_payload is never taken there
        # (next_request drains it and reports it), whatever max_payload is.
        self._small_below = min(SMALL_WRITE, max_payload + 1)
        self.max_drain = max_drain
        self._buf = bytearray()
        self._pos = 0
        self._discard = 0  # bytes of an oversized WRITE payload still to skip
        self._pending: Request | None = None  # an oversized WRITE, reported once drained
        self._scratch = memoryview(bytearray(_SCRATCH))
        # After a big WRITE's payload, receive just the next header: if another big
        # WRITE follows, its payload then comes straight into its own buffer, instead of
        # its first 256 KiB landing in the scratch buffer and being copied twice.
        self._header_next = False
        # A big WRITE payload being filled in place: the request, its buffer, bytes in.
        self._direct: Request | None = None
        self._direct_buf = bytearray()
        self._direct_fill = 0
        # Offered each admitted big WRITE whose payload has not begun to arrive: True
        # when it took the payload off the wire itself (and served the request).
        self.divert: Callable[[Request], bool] | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            buf = self.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes should go (never an empty buffer)."""
        if self._filling():
            return memoryview(self._direct_buf)[self._direct_fill :]
        # A complete payload not yet collected: what follows it queues up behind it
        # (an empty buffer would hang feed() and is an error to asyncio).
        if self._header_next and self._direct is None and self._pos == len(self._buf):
            return self._scratch[:_REQ_SIZE]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last ``get_buffer()``."""
        if self._filling():
            self._direct_fill += nbytes
            return
        self._header_next = False
        data = self._scratch[:nbytes]
        if self._discard:
            skip = min(self._discard, nbytes)
            self._discard -= skip
            data = data[skip:]
        self._buf += data

    def _filling(self) -> bool:
        return self._direct is not None and self._direct_fill < len(self._direct_buf)

    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def taken(self) -> Request | None:
        """A request admitted and taken but not returned yet: a WRITE whose payload is
        still arriving (or being skipped)."""
        return self._direct or self._pending

    def drop_taken(self) -> Request | None:
        """Forget the ``taken()`` request (the server reads no more), and its buffer."""
        req = self.taken()
        self._direct, self._direct_buf, self._direct_fill = None, bytearray(), 0
        self._pending, self._discard = None, 0
        return req

    def next_request(self) -> Request | None:
        """The next complete request, or None when more bytes are needed."""
        if self._direct is not None:
            if self._direct_fill < len(self._direct_buf):
                return None
            req = self._direct._replace(payload=memoryview(self._direct_buf))
            self._direct, self._direct_buf = None, bytearray()
            self._header_next = True
            return req
        if self._pending is not None:
            if self._discard:
                return None
            req, self._pending = self._pending, None
            return req
        buf, pos = self._buf, self._pos
        if len(buf) - pos < _REQ_SIZE:
            self._compact()
            return None
        magic, flags, typ, cookie, offset, length = _REQ.unpack_from(buf, pos)
        if magic != REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic {magic:#x}")
        admit = self.admit
        if typ != _WRITE:
            if admit is not None and not admit(typ, length):
                return None
            self._pos = pos + _REQ_SIZE
            return Request(flags, typ, cookie, offset, length)
        if length > self.max_payload:
            if length > self.max_drain:
                raise ProtocolError(f"WRITE payload of {length} bytes is too large to drain")
            if admit is not None and not admit(typ, length):
                return None
            # Skip what is buffered, then what is still to come.
            self._pos = pos + _REQ_SIZE
            have = min(length, len(buf) - self._pos)
            self._pos += have
            self._compact()  # hold no consumed bytes while the rest is skipped
            self._discard = length - have
            self._pending = Request(flags, typ, cookie, offset, length, None)
            return self.next_request()
        start = pos + _REQ_SIZE
        end = start + length
        if len(buf) < end:
            if length >= _DIRECT_MIN:
                if admit is not None and not admit(typ, length):
                    return None
                # Take what is here; the rest arrives straight into the payload buffer.
                have = len(buf) - start
                if not have and self.divert is not None:
                    self._pos = start
                    self._compact()
                    req = Request(flags, typ, cookie, offset, length)
                    if self.divert(req):
                        self._header_next = True
                        return self.next_request()
                    buf, start = self._buf, self._pos
                payload = buffers.take(length)  # filled to the end before it is used
                payload[:have] = memoryview(buf)[start:]
                self._pos = len(buf)
                self._compact()
                self._direct = Request(flags, typ, cookie, offset, length)
                self._direct_buf, self._direct_fill = payload, have
            else:
                self._compact()  # a small payload: offered once it is all here
            return None
        if admit is not None and not admit(typ, length):
            return None
        with memoryview(buf) as view:  # one copy, not a bytearray slice and then bytes
            data = bytes(view[start:end])
        self._pos = end
        return Request(flags, typ, cookie, offset, length, data)

    def next_small_write(self) -> tuple[int, int, bytes] | None:
        """The next request if it is a WRITE with no flags, a payload under
        ``SMALL_WRITE`` bytes (and not over ``max_payload``) and all of it buffered:
        ``(cookie, offset, payload)``, taken without asking ``admit`` (the caller has
        room for it). Anything else is left for ``next_request``, untouched.

        The server's fast lane for small writes: no Request, no admission round trip.
        """
        buf, pos = self._buf, self._pos
        end = pos + _REQ_SIZE
        # The type's low byte first (big-endian u16 at 6): a READ costs one index.
        if len(buf) < end or buf[pos + 7] != _WRITE or self._direct or self._pending:
            return None
        magic, flags, typ, cookie, offset, length = _REQ.unpack_from(buf, pos)
        if typ != _WRITE or flags or magic != REQUEST_MAGIC or length >= self._small_below:
            return None
        if len(buf) < end + length:
            return None
        with memoryview(buf) as view:
            data = bytes(view[end : end + length])
        self._pos = end + length
        return cookie, offset, data

    def _compact(self) -> None:
        if self._pos:
            if self._pos == len(self._buf):
                self._buf.clear()
            elif self._pos >= _COMPACT_AT or self._pos * 2 >= len(self._buf):
                del self._buf[: self._pos]
            else:
                return
            self._pos = 0


# Replies.


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return _SIMPLE(SIMPLE_REPLY_MAGIC, error, cookie)


def data_chunk(cookie: int, offset: int, length: int, done: bool = True) -> bytes:
    """Header of an OFFSET_DATA chunk; ``length`` bytes of data follow it."""
    return _CHUNK_OFFSET(
        STRUCTURED_REPLY_MAGIC, _DONE if done else 0, _T_DATA, cookie, 8 + length, offset
    )


def hole_chunk(cookie: int, offset: int, length: int, done: bool = True) -> bytes:
    return _CHUNK_HOLE(
        STRUCTURED_REPLY_MAGIC, _DONE if done else 0, _T_HOLE, cookie, 12, offset, length
    )


def none_chunk(cookie: int) -> bytes:
    return wire.CHUNK.pack(STRUCTURED_REPLY_MAGIC, _DONE, _T_NONE, cookie, 0)


def error_chunk(cookie: int, error: int, message: str = "", done: bool = True) -> bytes:
    msg = wire.string(message)
    return (
        wire.CHUNK_ERROR.pack(
            STRUCTURED_REPLY_MAGIC,
            _DONE if done else 0,
            _T_ERROR,
            cookie,
            6 + len(msg),
            error,
            len(msg),
        )
        + msg
    )


def block_status_chunk(
    cookie: int, context_id: int, extents: Iterable[tuple[int, int]], done: bool = True
) -> bytes:
    """A BLOCK_STATUS chunk: context id, then (length, flags) pairs."""
    body = b"".join(wire.EXTENT.pack(length, flags) for length, flags in extents)
    return (
        wire.CHUNK.pack(
            STRUCTURED_REPLY_MAGIC,
            _DONE if done else 0,
            _T_BS,
            cookie,
            4 + len(body),
        )
        + wire.U32.pack(context_id)
        + body
    )
