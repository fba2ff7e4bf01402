"""The control codec: every message round-trips, and decoding refuses anything off-spec."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tapnbd.control.messages import (
    MAX_LINE,
    MESSAGES,
    AttachmentRecord,
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
)

ATT = AttachmentRecord("/dev/loop3", "disk", "/srv/disk.img", "fuse", False)
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
    assert json.loads(line)["type"] == msg.TYPE
    assert decode(line) == msg


def test_every_message_has_an_example_and_every_request_a_reply() -> None:
    assert {type(m) for m in EXAMPLES} == set(MESSAGES.values())
    requests = [c for c in MESSAGES.values() if issubclass(c, Request)]
    assert len(requests) == 8
    for req in requests:
        assert issubclass(req.REPLY, Reply) and req.REPLY is not Reply
        assert req.REPLY.TYPE == req.TYPE + "_reply"


def test_defaults_may_be_left_out() -> None:
    assert decode(b'{"type":"export_add","image":"/a"}') == ExportAddRequest(image="/a")
    assert decode('{"type": "stats"}') == StatsRequest()


def _line(**fields: object) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"not json", "not a JSON message"),
        (b"[1, 2]", "must be a JSON object"),
        (b"{}", "no 'type'"),
        (_line(type="format_disk"), "unknown message type 'format_disk'"),
        (_line(type="export_remove"), "missing field 'name'"),
        (_line(type="export_remove", name="x", bogus=1), "unknown field 'bogus'"),
        (_line(type="export_remove", name=7), "export_remove.name: expected str, got int"),
        (_line(type="export_remove", name="x", force=1), "force: expected bool, got int"),
        (_line(type="attach", image="/a", via="usb"), "via: expected one of 'auto', 'nbd'"),
        (_line(type="stats", name=["x"]), "name: expected str or null, got list"),
        (
            _line(type="detach_reply", attachment={"device": "/dev/loop0"}, removed_export=False),
            "attachment: missing field 'export'",
        ),
        (
            _line(type="shutdown_reply", detached=[1], flushed=[]),
            r"detached\[0\]: expected str, got int",
        ),
    ],
)
def test_strict_decoding(line: bytes, error: str) -> None:
    with pytest.raises(MessageError, match=error):
        decode(line)


def test_bool_is_not_an_int_and_ints_are_floats() -> None:
    good = dataclasses.asdict(STATS)
    assert decode(_line(type="stats_reply", exports=[good])) == StatsReply([STATS])
    bad = {**good, "in_flight": True}
    with pytest.raises(MessageError, match="in_flight: expected int, got bool"):
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
