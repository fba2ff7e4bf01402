"""The handshake state machine, bytes in and bytes out (no sockets)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapnbd.errors import ProtocolError
from tapnbd.protocol.consts import IHAVEOPT, REPLY_MAGIC, Info, Opt, Rep, TransmissionFlag
from tapnbd.protocol.handshake import (
    NEED_DATA,
    Abort,
    Catalog,
    Event,
    ExportInfo,
    Handshake,
    Ready,
    StartTLS,
    TLSMode,
)

DISK = ExportInfo("disk", 1 << 20, TransmissionFlag.SEND_FLUSH, "a disk")


class OneExport(Catalog):
    def lookup(self, name: str) -> ExportInfo | None:
        return DISK if name in ("", "disk") else None

    def exports(self) -> list[ExportInfo]:
        return [DISK]


def opt(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def go_data(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_data(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        magic, option, rep, length = struct.unpack_from(">QIII", data)
        assert magic == REPLY_MAGIC
        out.append((option, rep, data[20 : 20 + length]))
        data = data[20 + length :]
    return out


def feed(hs: Handshake, data: bytes) -> tuple[list[Event], bytes]:
    hs.receive_data(data)
    events: list[Event] = []
    out = b""
    while True:
        ev = hs.next_event()
        out += hs.data_to_send()
        if ev is NEED_DATA:
            return events, out
        events.append(ev)
        if isinstance(ev, (Ready, Abort, StartTLS)):  # the haggling is over, or paused
            return events, out


def new(tls: TLSMode = TLSMode.OFF) -> Handshake:
    hs = Handshake(OneExport(), tls=tls)
    assert hs.greeting() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    return hs


def test_go_byte_by_byte_equals_all_at_once() -> None:
    stream = (
        struct.pack(">I", 3) + opt(Opt.STRUCTURED_REPLY) + opt(Opt.GO, go_data("disk", Info.NAME))
    )
    whole = new()
    events, out_whole = feed(whole, stream)
    split = new()
    out_split = b""
    got: list[Event] = []
    for i in range(len(stream)):
        evs, out = feed(split, stream[i : i + 1])
        got += evs
        out_split += out
    assert out_whole == out_split
    assert got == events
    (ready,) = events
    assert isinstance(ready, Ready)
    assert ready.structured and ready.flags & TransmissionFlag.SEND_DF
    reps = replies(out_whole)
    assert [r[1] for r in reps] == [Rep.ACK, Rep.INFO, Rep.INFO, Rep.INFO, Rep.ACK]
    assert reps[1][2] == struct.pack(">HQH", Info.EXPORT, 1 << 20, ready.flags)
    assert reps[2][2] == struct.pack(">H", Info.NAME) + b"disk"


def test_no_df_without_structured_replies() -> None:
    events, _ = feed(new(), struct.pack(">I", 1) + opt(Opt.GO, go_data("")))
    (ready,) = events
    assert isinstance(ready, Ready) and not ready.flags & TransmissionFlag.SEND_DF
    assert ready.export is DISK  # the empty name is the default export


def test_meta_context_set_and_list() -> None:
    hs = new()
    _, out = feed(
        hs, struct.pack(">I", 3) + opt(Opt.SET_META_CONTEXT, meta_data("disk", "base:allocation"))
    )
    assert replies(out)[0][1] == Rep.ERR_INVALID  # before structured replies
    _, out = feed(
        hs,
        opt(Opt.STRUCTURED_REPLY)
        + opt(Opt.LIST_META_CONTEXT, meta_data("disk"))
        + opt(Opt.LIST_META_CONTEXT, meta_data("disk", "base:"))
        + opt(Opt.LIST_META_CONTEXT, meta_data("disk", "qemu:dirty-bitmap:x"))
        + opt(Opt.SET_META_CONTEXT, meta_data("disk", "base:", "x-other:thing", "base:allocation"))
        + opt(Opt.SET_META_CONTEXT, b"\x00\x00\x00\x09disk"),  # malformed
    )
    reps = replies(out)
    kinds = [r[1] for r in reps]
    assert kinds == [
        Rep.ACK,
        Rep.META_CONTEXT,
        Rep.ACK,  # zero queries: everything
        Rep.META_CONTEXT,
        Rep.ACK,  # "base:" is a LIST wildcard
        Rep.ACK,  # unknown namespaces are ignored
        Rep.META_CONTEXT,
        Rep.ACK,  # SET selects base:allocation only
        Rep.ERR_INVALID,
    ]
    assert reps[6][2] == struct.pack(">I", 1) + b"base:allocation"
    # The failed SET cleared the selection ("even when it fails").
    events, _ = feed(hs, opt(Opt.GO, go_data("disk")))
    assert isinstance(events[0], Ready) and events[0].meta_contexts == {}


def test_starttls_forgets_everything() -> None:
    hs = new(TLSMode.ON)
    events, out = feed(
        hs,
        struct.pack(">I", 3)
        + opt(Opt.STRUCTURED_REPLY)
        + opt(Opt.SET_META_CONTEXT, meta_data("disk", "base:allocation"))
        + opt(Opt.STARTTLS),
    )
    assert isinstance(events[-1], StartTLS)
    assert [r[1] for r in replies(out)] == [Rep.ACK, Rep.META_CONTEXT, Rep.ACK, Rep.ACK]
    assert hs.structured and hs.meta_contexts
    hs.tls_started()
    assert not hs.structured and not hs.meta_contexts
    events, _ = feed(hs, opt(Opt.GO, go_data("disk")))
    assert isinstance(events[0], Ready) and not events[0].structured


def test_forced_tls_refuses_everything_but_starttls() -> None:
    hs = new(TLSMode.REQUIRE)
    _, out = feed(hs, struct.pack(">I", 3) + opt(Opt.LIST) + opt(Opt.GO, go_data("disk")) + opt(77))
    assert [r[1] for r in replies(out)] == [Rep.ERR_TLS_REQD] * 3
    with pytest.raises(ProtocolError):
        feed(hs, opt(Opt.EXPORT_NAME, b"disk"))


def test_starttls_refused_when_off_and_abort_acked() -> None:
    hs = new()
    events, out = feed(hs, struct.pack(">I", 1) + opt(Opt.STARTTLS) + opt(Opt.ABORT, b"ignored"))
    assert [r[1] for r in replies(out)] == [Rep.ERR_POLICY, Rep.ACK]
    assert isinstance(events[-1], Abort)


def test_data_after_starttls_is_injection() -> None:
    hs = new(TLSMode.ON)
    with pytest.raises(ProtocolError):
        feed(hs, struct.pack(">I", 3) + opt(Opt.STARTTLS) + opt(Opt.GO, go_data("disk")))
    hs = new(TLSMode.ON)
    feed(hs, struct.pack(">I", 3) + opt(Opt.STARTTLS))
    with pytest.raises(ProtocolError):
        hs.receive_data(b"plaintext")


def test_export_name_pads_unless_no_zeroes() -> None:
    _, out = feed(new(), struct.pack(">I", 1) + opt(Opt.EXPORT_NAME, b"disk"))
    assert len(out) == 134 and out[10:] == bytes(124)
    _, out = feed(new(), struct.pack(">I", 3) + opt(Opt.EXPORT_NAME, b"disk"))
    assert len(out) == 10
    with pytest.raises(ProtocolError):
        feed(new(), struct.pack(">I", 3) + opt(Opt.EXPORT_NAME, b"other"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_only_raise_protocol_errors(data: bytes) -> None:
    hs = new(TLSMode.ON)
    try:
        feed(hs, data)
        feed(hs, struct.pack(">I", 3) + data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.binary(max_size=64)), max_size=20))
def test_arbitrary_options_only_raise_protocol_errors(options: list[tuple[int, bytes]]) -> None:
    hs = new(TLSMode.ON)
    try:
        feed(hs, struct.pack(">I", 3) + b"".join(opt(c, d) for c, d in options))
    except ProtocolError:
        pass
