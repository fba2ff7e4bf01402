"""Request decoding and reply encoding, bytes in and bytes out."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapnbd.errors import ProtocolError
from tapnbd.protocol import transmission as tx
from tapnbd.protocol.consts import REQUEST_MAGIC, Cmd


def req(
    cmd: int, offset: int, length: int, cookie: int = 1, flags: int = 0, payload: bytes = b""
) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


def decode_all(dec: tx.RequestDecoder) -> list[tx.Request]:
    out = []
    while (r := dec.next_request()) is not None:
        out.append(r)
    return out


def test_requests_split_at_every_byte() -> None:
    stream = (
        req(Cmd.WRITE, 512, 5, 7, payload=b"hello")
        + req(Cmd.READ, 0, 4096, 8)
        + req(Cmd.FLUSH, 0, 0, 9)
    )
    dec = tx.RequestDecoder()
    got = []
    for i in range(len(stream)):
        dec.feed(stream[i : i + 1])
        got += decode_all(dec)
    assert got == [
        tx.Request(0, Cmd.WRITE, 7, 512, 5, b"hello"),
        tx.Request(0, Cmd.READ, 8, 0, 4096),
        tx.Request(0, Cmd.FLUSH, 9, 0, 0),
    ]


def test_big_write_payload_is_received_in_place() -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB: over the in-place threshold
    stream = req(Cmd.WRITE, 0, len(payload), 1, payload=payload) + req(Cmd.FLUSH, 0, 0, 2)
    dec = tx.RequestDecoder()
    got = []
    pos = 0
    for size in (10, 30, 1000, 70000, 1 << 20):  # as a BufferedProtocol would
        buf = dec.get_buffer()
        n = min(len(buf), size, len(stream) - pos)
        buf[:n] = stream[pos : pos + n]
        dec.buffer_updated(n)
        pos += n
        got += decode_all(dec)
    dec.feed(stream[pos:])
    got += decode_all(dec)
    assert [(r.type, r.cookie) for r in got] == [(Cmd.WRITE, 1), (Cmd.FLUSH, 2)]
    assert got[0].payload is not None and bytes(got[0].payload) == payload


def test_a_stream_of_big_writes_is_received_without_copies() -> None:
    """After a big WRITE's payload the decoder asks for just the next header, so each
    following payload arrives in its own buffer: no payload byte passes through the
    scratch buffer, however much the socket holds (a BufferedProtocol fills whatever
    get_buffer returns, up to what is there)."""
    payload = bytes(range(256)) * 4096  # 1 MiB
    n = 6
    stream = b"".join(req(Cmd.WRITE, i << 20, len(payload), i, payload=payload) for i in range(n))
    dec = tx.RequestDecoder()
    got: list[tx.Request] = []
    pos = scratch_bytes = 0
    while pos < len(stream):
        buf = dec.get_buffer()
        k = min(len(buf), len(stream) - pos)  # the socket always has more than asked
        if not dec._filling():
            scratch_bytes += k
        buf[:k] = stream[pos : pos + k]
        dec.buffer_updated(k)
        pos += k
        got += decode_all(dec)
    assert [r.cookie for r in got] == list(range(n))
    assert all(r.payload is not None and bytes(r.payload) == payload for r in got)
    # The first request's header and the scratch's worth of payload behind it, then
    # headers alone.
    assert scratch_bytes == tx._SCRATCH + (n - 1) * 28


def test_oversized_write_is_drained_not_buffered() -> None:
    dec = tx.RequestDecoder(max_payload=16, max_drain=64)
    dec.feed(req(Cmd.WRITE, 0, 40, 1) + b"x" * 10)
    assert dec.next_request() is None
    dec.feed(b"y" * 30 + req(Cmd.READ, 0, 1, 2))
    assert decode_all(dec) == [
        tx.Request(0, Cmd.WRITE, 1, 0, 40, None),
        tx.Request(0, Cmd.READ, 2, 0, 1),
    ]
    assert dec.buffered() == 0
    dec.feed(req(Cmd.WRITE, 0, 65, 3))
    with pytest.raises(ProtocolError):
        dec.next_request()


def test_bad_magic() -> None:
    dec = tx.RequestDecoder()
    dec.feed(b"\x00" * 28)
    with pytest.raises(ProtocolError):
        dec.next_request()


def test_reply_layouts() -> None:
    assert tx.simple_reply(5, 22) == struct.pack(">IIQ", 0x67446698, 22, 5)
    assert tx.data_chunk(5, 4096, 100) == struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, 5, 108, 4096)
    assert tx.hole_chunk(5, 0, 512, done=False) == struct.pack(
        ">IHHQIQI", 0x668E33EF, 0, 2, 5, 12, 0, 512
    )
    assert tx.none_chunk(5) == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 5, 0)
    assert (
        tx.error_chunk(5, 22, "bad")
        == struct.pack(">IHHQIIH", 0x668E33EF, 1, 32769, 5, 9, 22, 3) + b"bad"
    )
    bs = tx.block_status_chunk(5, 1, [(4096, 3), (512, 0)])
    assert bs == struct.pack(">IHHQII", 0x668E33EF, 1, 5, 5, 20, 1) + struct.pack(
        ">IIII", 4096, 3, 512, 0
    )


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_arbitrary_bytes_only_raise_protocol_errors(chunks: list[bytes]) -> None:
    dec = tx.RequestDecoder(max_payload=1024, max_drain=4096)
    try:
        for c in chunks:
            dec.feed(c)
            decode_all(dec)
    except ProtocolError:
        pass


def test_divert_is_offered_big_writes_whose_payload_has_not_begun() -> None:
    """``divert`` sees a big WRITE only when none of its payload is buffered yet (its
    payload is still in the socket); taking it leaves the decoder waiting for a header."""
    big = 200 * 1024
    offered: list[tx.Request] = []
    take = True

    def divert(req: tx.Request) -> bool:
        offered.append(req)
        return take

    dec = tx.RequestDecoder()
    dec.divert = divert

    def header(cookie: int, length: int, typ: int = Cmd.WRITE) -> bytes:
        return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, typ, cookie, 4096, length)

    # Header and some payload together: not offered, received as usual.
    dec.feed(header(1, big) + b"a" * 1000)
    assert dec.next_request() is None and offered == []
    dec.feed(b"a" * (big - 1000))
    first = dec.next_request()
    assert first is not None and first.payload is not None and bytes(first.payload) == b"a" * big
    # After a big payload the decoder reads a lone header: the next WRITE is offered.
    assert len(dec.get_buffer()) == 28
    dec.feed(header(2, big))
    assert dec.next_request() is None
    assert [(r.cookie, r.length, r.payload) for r in offered] == [(2, big, None)]
    assert dec.taken() is None and dec.buffered() == 0
    assert len(dec.get_buffer()) == 28  # taken: the next bytes are a header again
    # Refused: the payload then arrives into its own buffer.
    take = False
    dec.feed(header(3, big))
    assert dec.next_request() is None and dec.taken() is not None
    dec.feed(b"c" * big)
    third = dec.next_request()
    assert third is not None and third.cookie == 3 and bytes(third.payload or b"") == b"c" * big
    # Small WRITEs and READs are never offered.
    dec.feed(header(4, 0, Cmd.READ)[:-4] + struct.pack(">I", 4096))
    assert dec.next_request() is not None
    dec.feed(header(5, 512) + b"d" * 512)
    assert dec.next_request() is not None
    assert [r.cookie for r in offered] == [2, 3]


def _small_write_stream(rng: random.Random, n: int) -> tuple[bytes, list[tx.Request]]:
    """``n`` random requests, and what next_request alone decodes them to."""
    stream, want = bytearray(), []
    for cookie in range(n):
        kind = rng.randrange(6)
        flags = 1 if kind == 0 else 0  # FUA
        if kind in (0, 1, 2):  # WRITEs: small, and over the lane's limit now and then
            length = rng.choice((0, 1, 512, 4096, tx.SMALL_WRITE - 1, tx.SMALL_WRITE))
            payload = rng.randbytes(length)
            offset = rng.randrange(1 << 30)
            stream += req(Cmd.WRITE, offset, length, cookie, flags, payload)
            want.append(tx.Request(flags, Cmd.WRITE, cookie, offset, length, payload))
        else:
            cmd = (Cmd.READ, Cmd.FLUSH, Cmd.TRIM)[kind - 3]
            length = 0 if cmd == Cmd.FLUSH else rng.randrange(1, 1 << 20)
            stream += req(cmd, 0, length, cookie)
            want.append(tx.Request(0, cmd, cookie, 0, length))
    return bytes(stream), want


def test_small_writes_taken_by_the_fast_lane_keep_the_stream_in_sync() -> None:
    """Asking next_small_write before every next_request, with the bytes arriving in
    random pieces, decodes the same requests as next_request alone, and the lane takes
    exactly the flag-less WRITEs under SMALL_WRITE."""
    seed = random.randrange(1 << 32)
    print("seed", seed)
    rng = random.Random(seed)
    stream, want = _small_write_stream(rng, 300)
    dec = tx.RequestDecoder()
    got: list[tx.Request] = []
    lane = 0
    pos = 0
    while pos < len(stream):
        buf = dec.get_buffer()
        n = min(len(buf), rng.choice((1, 27, 28, 29, 4000, 70000)), len(stream) - pos)
        buf[:n] = stream[pos : pos + n]
        dec.buffer_updated(n)
        pos += n
        while True:
            small = dec.next_small_write()
            if small is not None:
                cookie, offset, payload = small
                got.append(tx.Request(0, Cmd.WRITE, cookie, offset, len(payload), payload))
                lane += 1
                continue
            r = dec.next_request()
            if r is None:
                break
            got.append(r._replace(payload=None if r.payload is None else bytes(r.payload)))
    assert got == want
    assert lane == sum(
        1 for r in want if r.type == Cmd.WRITE and not r.flags and r.length < tx.SMALL_WRITE
    )


def test_the_fast_lane_leaves_a_payload_over_max_payload_to_next_request() -> None:
    """A decoder with a max_payload below SMALL_WRITE: a WRITE between the two is
    drained and reported by next_request (payload None), never taken by the lane."""
    dec = tx.RequestDecoder(max_payload=1024, max_drain=4096)
    dec.feed(
        req(Cmd.WRITE, 0, 2000, 7, 0, bytes(2000)) + req(Cmd.WRITE, 0, 1024, 8, 0, b"x" * 1024)
    )
    assert dec.next_small_write() is None
    assert dec.next_request() == tx.Request(0, Cmd.WRITE, 7, 0, 2000, None)
    assert dec.next_small_write() == (8, 0, b"x" * 1024)  # max_payload itself is taken


def test_the_fast_lane_leaves_a_bad_magic_to_next_request() -> None:
    dec = tx.RequestDecoder()
    dec.feed(struct.pack(">IHHQQI", 0x12345678, 0, Cmd.WRITE, 1, 0, 3) + b"abc")
    assert dec.next_small_write() is None
    with pytest.raises(ProtocolError, match="magic"):
        dec.next_request()
