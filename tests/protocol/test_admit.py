"""RequestDecoder's admit hook: a request is offered before it is taken, a WRITE before
its payload buffer exists, and one refused stays in the buffer for later."""

from __future__ import annotations

import struct

from tapnbd.protocol.consts import REQUEST_MAGIC, Cmd
from tapnbd.protocol.transmission import RequestDecoder


def header(typ: int, cookie: int, length: int, offset: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, typ, cookie, offset, length)


def test_refused_requests_stay_until_admitted() -> None:
    offered: list[tuple[int, int]] = []
    allow = False

    def admit(typ: int, length: int) -> bool:
        offered.append((typ, length))
        return allow

    dec = RequestDecoder(admit=admit)
    dec.feed(header(Cmd.READ, 1, 4096) + header(Cmd.READ, 2, 8192))
    assert dec.next_request() is None and dec.next_request() is None
    assert offered == [(Cmd.READ, 4096)] * 2  # the same request, offered again
    allow = True
    assert [dec.next_request().cookie, dec.next_request().cookie] == [1, 2]  # type: ignore[union-attr]


def test_small_write_is_offered_once_its_payload_is_here() -> None:
    offered: list[int] = []

    def admit(typ: int, length: int) -> bool:
        offered.append(length)
        return True

    dec = RequestDecoder(admit=admit)
    dec.feed(header(Cmd.WRITE, 1, 512) + b"x" * 100)
    assert dec.next_request() is None and offered == []
    dec.feed(b"x" * 412)
    req = dec.next_request()
    assert req is not None and req.payload == b"x" * 512 and offered == [512]


def test_big_write_is_offered_before_its_buffer_is_allocated() -> None:
    allow = False
    dec = RequestDecoder(admit=lambda t, n: allow)
    dec.feed(header(Cmd.WRITE, 7, 1 << 20) + b"y" * 1000)
    assert dec.next_request() is None and dec.taken() is None  # nothing allocated
    allow = True
    assert dec.next_request() is None  # admitted: the rest arrives into its own buffer
    taken = dec.taken()
    assert taken is not None and taken.cookie == 7 and taken.length == 1 << 20
    allow = False  # already admitted: not asked again
    dec.feed(b"y" * ((1 << 20) - 1000))
    req = dec.next_request()
    assert req is not None and bytes(req.payload or b"") == b"y" * (1 << 20)
    assert dec.taken() is None
