"""The client codec, sans I/O: it talks to the server codec with no socket in between."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapnbd.errors import ProtocolError
from tapnbd.protocol import transmission as tx
from tapnbd.protocol.client import (
    MAX_STATUS_EXTENTS,
    ClientHandshake,
    Connected,
    ReplyDecoder,
    parse_extents,
)
from tapnbd.protocol.consts import ReplyType, TransmissionFlag
from tapnbd.protocol.handshake import (
    NEED_DATA,
    Catalog,
    ExportInfo,
    Handshake,
    Ready,
    TLSMode,
)

DISK = ExportInfo(
    "disk",
    5 << 20,
    TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_TRIM,
    "d",
    (1, 512, 1 << 20),
)


class OneExport(Catalog):
    def lookup(self, name: str) -> ExportInfo | None:
        return DISK if name == "disk" else None

    def exports(self) -> list[ExportInfo]:
        return [DISK]


def converse(client: ClientHandshake, server: Handshake, split: int = 0) -> Connected:
    """Run both codecs against each other; ``split`` > 0 feeds bytes in pieces that big."""
    to_client = server.greeting()
    for _ in range(100):
        pieces = (
            [to_client]
            if not split
            else [to_client[i : i + split] for i in range(0, len(to_client), split)] or [b""]
        )
        to_server = b""
        for piece in pieces:
            out, event = client.receive(piece)
            to_server += out
            if isinstance(event, Connected):
                return event
        server.receive_data(to_server)
        while (ev := server.next_event()) is not NEED_DATA:
            if isinstance(ev, Ready):
                break
        to_client = server.data_to_send()
    raise AssertionError("the handshake did not finish")


def test_client_and_server_codecs_agree() -> None:
    done = converse(ClientHandshake("disk"), Handshake(OneExport()))
    assert done.size == 5 << 20
    assert done.flags & TransmissionFlag.SEND_TRIM
    assert done.structured and done.meta_id is not None
    assert (done.minimum, done.preferred, done.maximum) == (1, 512, 1 << 20)


@given(st.integers(min_value=1, max_value=40))
@settings(max_examples=40, deadline=None)
def test_any_split_of_the_servers_bytes(split: int) -> None:
    done = converse(ClientHandshake("disk"), Handshake(OneExport()), split)
    assert done.size == 5 << 20


def test_unknown_export_names_the_export() -> None:
    with pytest.raises(ProtocolError, match=r"'nope'.*ERR_UNKNOWN"):
        converse(ClientHandshake("nope"), Handshake(OneExport()))


def test_tls_required_server_refuses_a_plain_client() -> None:
    with pytest.raises(ProtocolError, match="ERR_TLS_REQD"):
        converse(ClientHandshake("disk"), Handshake(OneExport(), tls=TLSMode.REQUIRE))


def test_not_an_nbd_server() -> None:
    with pytest.raises(ProtocolError, match="not an NBD server"):
        ClientHandshake("disk").receive(b"HTTP/1.1 400 Bad Request\r\n\r\n")


def test_reply_decoder_reassembles_every_kind_in_any_split() -> None:
    seed = random.randrange(1 << 30)
    print(f"seed={seed}")
    rng = random.Random(seed)
    data = rng.randbytes(3000)
    stream = (
        tx.simple_reply(1)
        + tx.simple_reply(2)
        + data
        + tx.data_chunk(3, 4096, len(data), done=False)
        + data
        + tx.hole_chunk(3, 4096 + len(data), 1000, done=True)
        + tx.error_chunk(4, 5, "boom")
        + tx.block_status_chunk(5, 1, [(4096, 3), (8192, 0)])
    )
    for _ in range(20):
        dec = ReplyDecoder()
        dec.expect_read(2, len(data))
        replies = []
        pos = 0
        while pos < len(stream):
            n = rng.randrange(1, 200)
            replies += dec.feed(stream[pos : pos + n])
            pos += n
        assert [(r.cookie, r.kind, r.done) for r in replies] == [
            (1, None, True),
            (2, None, True),
            (3, ReplyType.OFFSET_DATA, False),
            (3, ReplyType.OFFSET_HOLE, True),
            (4, ReplyType.ERROR, True),
            (5, ReplyType.BLOCK_STATUS, True),
        ]
        assert replies[1].data == data and replies[2].data == data
        assert replies[2].offset == 4096 and replies[3].length == 1000
        assert replies[4].error == 5 and replies[4].message == "boom"
        assert parse_extents(replies[5].data) == (1, [(4096, 3), (8192, 0)])


def test_reply_decoder_refuses_garbage_and_huge_chunks() -> None:
    with pytest.raises(ProtocolError, match="bad reply magic"):
        ReplyDecoder().feed(b"\xde\xad\xbe\xef" * 4)
    huge = tx.data_chunk(1, 0, 1 << 30)  # a header claiming 1 GiB of data
    with pytest.raises(ProtocolError, match="too long"):
        ReplyDecoder().feed(huge)


def test_a_block_status_chunk_is_held_to_the_spec_and_read_only_as_far_as_needed() -> None:
    """The attacker: an upstream that answers a BLOCK_STATUS with millions of one-byte
    extents running far past the request. NBD spec: a chunk "SHOULD NOT" hold more than
    2^20 extents, so a longer one is refused; within that, only the extents that cover
    the request (or the first ``most``) are parsed, not a Python tuple per extent."""
    limit = MAX_STATUS_EXTENTS
    at_limit = tx.block_status_chunk(1, 1, [(1, i & 1) for i in range(limit)])
    assert len(ReplyDecoder().feed(at_limit)) == 1
    over = tx.block_status_chunk(1, 1, [(1, i & 1) for i in range(limit + 1)])
    with pytest.raises(ProtocolError, match="too long"):
        ReplyDecoder().feed(over)
    (reply,) = ReplyDecoder().feed(at_limit)
    assert parse_extents(reply.data, covering=3) == (1, [(1, 0), (1, 1), (1, 0)])
    assert parse_extents(reply.data, most=2) == (1, [(1, 0), (1, 1)])
    assert len(parse_extents(reply.data)[1]) == limit  # unbounded when asked so


class WithBitmaps(Catalog):
    def __init__(self, names: list[str]) -> None:
        self.info = ExportInfo(
            "disk",
            1 << 20,
            TransmissionFlag(0),
            contexts=tuple(f"qemu:dirty-bitmap:{n}" for n in names),
        )

    def lookup(self, name: str) -> ExportInfo | None:
        return self.info if name == "disk" else None

    def exports(self) -> list[ExportInfo]:
        return [self.info]


def test_the_servers_dirty_bitmaps_are_listed_then_selected() -> None:
    catalog = WithBitmaps(["b0", "b1"])
    done = converse(ClientHandshake("disk"), Handshake(catalog))
    assert done.meta_id is not None
    assert dict(done.bitmaps) == {
        "b0": catalog.info.context_id("qemu:dirty-bitmap:b0"),
        "b1": catalog.info.context_id("qemu:dirty-bitmap:b1"),
    }


def test_a_server_listing_many_bitmaps_gets_at_most_max_bitmaps_selected() -> None:
    from tapnbd.protocol.client import MAX_BITMAPS

    names = [f"b{i}" for i in range(MAX_BITMAPS * 3)]
    done = converse(ClientHandshake("disk"), Handshake(WithBitmaps(names)))
    assert [n for n, _ in done.bitmaps] == names[:MAX_BITMAPS]


def test_a_server_without_bitmaps_still_gets_base_allocation() -> None:
    done = converse(ClientHandshake("disk"), Handshake(OneExport()))
    assert done.meta_id is not None and done.bitmaps == ()
