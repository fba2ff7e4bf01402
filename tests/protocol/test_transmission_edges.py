"""Edges of the transmission codec that mutation testing (make mutate) found untested:
the payload limit's boundary, the flags of chunks that are not the last, and the
decoder's memory staying bounded however many requests pass through it."""

from __future__ import annotations

import struct

import pytest

from tapnbd.driver import MAX_PAYLOAD
from tapnbd.errors import ProtocolError
from tapnbd.protocol import transmission as tx
from tapnbd.protocol.consts import STRUCTURED_REPLY_MAGIC, Cmd
from tests.protocol.test_transmission import decode_all, req

DONE = 1  # NBD_REPLY_FLAG_DONE


def test_payload_limit_is_inclusive() -> None:
    """A WRITE of exactly max_payload bytes is served; one byte more is drained."""
    dec = tx.RequestDecoder(max_payload=4096, max_drain=1 << 20)
    dec.feed(req(Cmd.WRITE, 0, 4096, 1, payload=b"a" * 4096))
    dec.feed(req(Cmd.WRITE, 0, 4097, 2, payload=b"b" * 4097))
    dec.feed(req(Cmd.FLUSH, 0, 0, 3))
    got = decode_all(dec)
    assert [(r.cookie, r.payload is not None) for r in got] == [(1, True), (2, False), (3, False)]
    assert bytes(got[0].payload or b"") == b"a" * 4096


def _flags(chunk: bytes) -> int:
    magic, flags = struct.unpack_from(">IH", chunk)
    assert magic == STRUCTURED_REPLY_MAGIC
    return int(flags)


def test_only_the_last_chunk_says_done() -> None:
    for done, flags in ((True, DONE), (False, 0)):
        assert _flags(tx.data_chunk(1, 0, 8, done)) == flags
        assert _flags(tx.hole_chunk(1, 0, 8, done)) == flags
        assert _flags(tx.error_chunk(1, 5, "x", done)) == flags
        assert _flags(tx.block_status_chunk(1, 1, [(512, 0)], done)) == flags


def test_decoder_memory_stays_bounded() -> None:
    """Consumed bytes are dropped: 20 000 requests, cut anywhere, leave no backlog."""
    dec = tx.RequestDecoder()
    one = req(Cmd.READ, 0, 512) + req(Cmd.WRITE, 0, 100, payload=bytes(100))
    largest = 0
    for i in range(10_000):
        cut = 10 + i % (len(one) - 10)  # inside a header, or inside the payload
        dec.feed(one[:cut])
        got = len(decode_all(dec))
        dec.feed(one[cut:])
        assert got + len(decode_all(dec)) == 2
        largest = max(largest, len(dec._buf))
    assert dec.buffered() == 0 and largest < 4 * len(one)


def test_drain_limit_is_inclusive() -> None:
    """An oversized WRITE up to max_drain bytes is drained; beyond, the client is dropped."""
    dec = tx.RequestDecoder(max_payload=16, max_drain=64)
    dec.feed(req(Cmd.WRITE, 0, 64, 1, payload=bytes(64)) + req(Cmd.FLUSH, 0, 0, 2))
    assert [(r.cookie, r.payload) for r in decode_all(dec)] == [(1, None), (2, None)]
    dec.feed(req(Cmd.WRITE, 0, 65, 3))
    with pytest.raises(ProtocolError):
        dec.next_request()


def test_buffered_counts_what_is_not_yet_a_request() -> None:
    dec = tx.RequestDecoder()
    whole = req(Cmd.READ, 0, 512)
    dec.feed(whole + whole[:10])
    assert dec.buffered() == len(whole) + 10
    assert dec.next_request() is not None and dec.buffered() == 10


@pytest.mark.parametrize("size", [tx._DIRECT_MIN - 1, tx._DIRECT_MIN])
def test_payloads_from_direct_min_are_received_in_place(size: int) -> None:
    """From _DIRECT_MIN bytes a WRITE payload that arrives in pieces lands in its own
    buffer (handed over as a memoryview); below, it is copied out of the stream."""
    dec = tx.RequestDecoder()
    stream = req(Cmd.WRITE, 0, size, 1, payload=b"p" * size)
    dec.feed(stream[:100])
    assert dec.next_request() is None
    dec.feed(stream[100:] + req(Cmd.FLUSH, 0, 0, 2))  # the next request right behind it
    got, flush = decode_all(dec)
    assert bytes(got.payload or b"") == b"p" * size and flush.cookie == 2
    assert isinstance(got.payload, memoryview) == (size >= tx._DIRECT_MIN)


def test_default_limits() -> None:
    """32 MiB payloads (the spec's minimum to support); an oversized WRITE is drained up
    to 64 MiB (README, Hardening), past that the client is dropped at its header."""
    assert MAX_PAYLOAD == 32 << 20
    dec = tx.RequestDecoder()
    dec.feed(req(Cmd.WRITE, 0, 64 << 20, 1))
    assert dec.next_request() is None  # draining
    dec = tx.RequestDecoder()
    dec.feed(req(Cmd.WRITE, 0, (64 << 20) + 1, 1))
    with pytest.raises(ProtocolError):
        dec.next_request()
