"""The control codec (msgspec): every message round-trips, and decoding refuses anything
off-spec, too long or nested too deeply, with a MessageError naming the field."""

from __future__ import annotations

import json

import msgspec
import pytest

from tapnbd.control.messages import (
    MAX_LINE,
    MESSAGES,
    Attachment,
    AttachReply,
    AttachRequest,
    DetachReply,
    DetachRequest,
    ErrorReply,
    ExportAddReply,
    ExportAddRequest,
    ExportRecord,
    ExportRemoveReply,
    ExportRemoveRequest,
    ExportStats,
    ListReply,
    ListRequest,
    Message,
    MessageError,
    OpCounters,
    Reply,
    Request,
    ShutdownReply,
    ShutdownRequest,
    StatsReply,
    StatsRequest,
    StatusReply,
    StatusRequest,
    decode,
    encode,
    message_type,
)

ATT = Attachment(
    id="1", export="disk", image="/srv/disk.img", via="fuse", read_only=False, device="/dev/loop3"
)
EXP = ExportRecord(
    name="disk",
    image="/srv/disk.img",
    format="raw",
    size=1 << 30,
    read_only=False,
    clients=2,
    devices=["/dev/loop3"],
    uris=["nbd+unix:///disk?socket=/run/tapnbd/nbd.sock"],
    origin="export",
)
COUNTERS = OpCounters(ops=3, bytes=12288, errors=1, p50_us=8.192, p99_us=16.384, max_us=20.0)
STATS = ExportStats(
    name="disk",
    image="/srv/disk.img",
    format="raw",
    ops={"read": COUNTERS, "write": COUNTERS},
    errors_by_errno={"5": 1},
    in_flight=0,
    connections=1,
    uptime_s=12.5,
    enabled=True,
)

EXAMPLES: list[Message] = [
    ErrorReply("no export named 'x'"),
    StatusRequest(),
    StatusReply(
        pid=42,
        version="0.1.0",
        state_dir="/run/tapnbd",
        log="/run/tapnbd/tapnbd.log",
        started=1.5,
        listen=["unix:/run/tapnbd/nbd.sock", "tcp:127.0.0.1:10809"],
        metrics=None,
        exports=1,
        attachments=1,
        stats_enabled=True,
        notes=["restored export 'disk'"],
        poll_us=50,
    ),
    ExportAddRequest(image="/srv/disk.img", name=None, read_only=True, format="qcow"),
    ExportAddReply(EXP),
    ExportRemoveRequest(name="disk", force=True),
    ExportRemoveReply(name="disk", detached=["/dev/loop3"], disconnected=2),
    ListRequest(),
    ListReply(exports=[EXP], attachments=[ATT]),
    StatsRequest(name=None),
    StatsRequest(name="disk"),
    StatsReply([STATS]),
    AttachRequest(image="ram:64M", name="scratch", read_only=False, format="auto", via="fuse"),
    AttachReply(ATT, reason="nbdfuse + losetup", created_export=True),
    DetachRequest(target="/dev/loop3"),
    DetachReply(ATT, removed_export=False),
    ShutdownRequest(force=False),
    ShutdownReply(detached=["/dev/loop3"], flushed=["disk"]),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    line = encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["type"] == message_type(msg)
    assert decode(line) == msg


def test_every_message_has_an_example_and_every_request_a_reply() -> None:
    assert {type(m) for m in EXAMPLES} == set(MESSAGES.values())
    requests = [c for c in MESSAGES.values() if issubclass(c, Request)]
    assert len(requests) == 8
    for req in requests:
        assert issubclass(req.REPLY, Reply) and req.REPLY is not Reply
        assert message_type(req.REPLY) == message_type(req) + "_reply"


def test_defaults_may_be_left_out() -> None:
    assert decode(b'{"type":"export_add","image":"/a"}') == ExportAddRequest(image="/a")
    assert decode('{"type": "stats"}') == StatsRequest()


def _line(**fields: object) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"not json", "not a JSON message"),
        (b"[1, 2]", "Expected `object`, got `array`"),
        (b"{}", "missing required field `type`"),
        (_line(type="format_disk"), "Invalid value 'format_disk' - at `\\$.type`"),
        (_line(type="export_remove"), "missing required field `name`"),
        (_line(type="export_remove", name="x", bogus=1), "unknown field `bogus`"),
        (_line(type="export_remove", name=7), "Expected `str`, got `int` - at `\\$.name`"),
        (_line(type="export_remove", name="x", force=1), "Expected `bool`, got `int`"),
        (_line(type="attach", image="/a", via="usb"), "Invalid enum value 'usb' - at `\\$.via`"),
        (_line(type="stats", name=["x"]), "Expected `str \\| null`, got `array`"),
        (
            _line(type="detach_reply", attachment={"device": "/dev/loop0"}, removed_export=False),
            "missing required field `id` - at `\\$.attachment`",
        ),
        (
            _line(type="shutdown_reply", detached=[1], flushed=[]),
            r"Expected `str`, got `int` - at `\$.detached\[0\]`",
        ),
    ],
)
def test_strict_decoding(line: bytes, error: str) -> None:
    with pytest.raises(MessageError, match=error):
        decode(line)


def test_bool_is_not_an_int_and_ints_are_floats() -> None:
    good = msgspec.to_builtins(STATS)
    assert decode(_line(type="stats_reply", exports=[good])) == StatsReply([STATS])
    bad = {**good, "in_flight": True}
    with pytest.raises(
        MessageError, match=r"Expected `int`, got `bool` - at `\$.exports\[0\].in_flight`"
    ):
        decode(_line(type="stats_reply", exports=[bad]))
    as_int = {**good, "uptime_s": 12}
    assert decode(_line(type="stats_reply", exports=[as_int])).exports[0].uptime_s == 12.0  # type: ignore[attr-defined]


def test_expect_accepts_its_reply_or_an_error() -> None:
    assert decode(encode(ListReply([], [])), expect=ListReply) == ListReply([], [])
    assert isinstance(decode(encode(ErrorReply("no")), expect=ListReply), ErrorReply)
    with pytest.raises(MessageError, match="expected 'list_reply', got 'status_reply'"):
        decode(encode(EXAMPLES[2]), expect=ListReply)


def test_too_long() -> None:
    with pytest.raises(MessageError, match="longer than"):
        decode(b" " * (MAX_LINE + 1))


@pytest.mark.parametrize("depth", [10, 1000, 100_000])
def test_deep_nesting_is_a_message_error(depth: int) -> None:
    """Nesting where the schema expects a scalar is refused at the first level."""
    nested = b"[" * depth + b"]" * depth
    with pytest.raises(MessageError, match="Expected `str \\| null`, got `array`"):
        decode(b'{"type":"stats","name":' + nested + b"}")
    with pytest.raises(MessageError):
        decode(b'{"type":"stats","x":' + nested + b"}")
    with pytest.raises(MessageError):
        decode(nested)
    with pytest.raises(MessageError):
        decode(b"{" * depth)


def test_deep_nesting_msgspec_would_recurse_on() -> None:
    """msgspec raises RecursionError when it builds deeply nested untyped values; the
    codec turns that into a MessageError too (checked here through decode_as)."""
    from typing import Any

    from tapnbd.control.messages import decode_as

    nested = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(RecursionError):
        msgspec.json.decode(nested)
    with pytest.raises(MessageError, match="nested too deeply"):
        decode_as(nested, Any, "test")
