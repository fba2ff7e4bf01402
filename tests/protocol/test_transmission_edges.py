"""Edges of the transmission codec that mutation testing (make mutate) found untested:
the payload limit's boundary, the flags of chunks that are not the last, and the
decoder's memory staying bounded however many requests pass through it."""

from __future__ import annotations

import struct

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
