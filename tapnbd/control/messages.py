"""Control messages: one request/reply pair per operation, one JSON line each.

blktap's ``tapdisk-message.h`` pairs every request with its answer (``TAPDISK_MESSAGE_OPEN``
and ``..._OPEN_RSP``); so do we. A message is a frozen dataclass; on the wire it is one
line of JSON, an object with a ``type`` tag and the dataclass's fields::

    {"type": "export_add", "image": "/srv/disk.img", "name": null, "read_only": false, ...}

Decoding is strict: unknown tags, missing or extra fields and fields of the wrong type
are all refused with a ``MessageError`` naming the field, so neither side ever acts on
a half-understood message. Any request may be answered with ``ErrorReply`` instead of
its own reply; the client raises it as a ``TapnbdError``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

from tapnbd.errors import TapnbdError

#: The longest line either side accepts (a list of many exports fits easily).
MAX_LINE = 1 << 20

Via = Literal["auto", "nbd", "fuse", "socket"]


class MessageError(TapnbdError):
    """A control message could not be decoded."""


# Records carried inside replies.


@dataclass(frozen=True, slots=True)
class AttachmentRecord:
    """A local block device carrying an export."""

    device: str
    export: str
    image: str
    via: Literal["nbd", "fuse", "socket"]
    read_only: bool


@dataclass(frozen=True, slots=True)
class ExportRecord:
    """One export, as ``tapnbd list`` shows it."""

    name: str
    image: str
    format: str
    size: int
    read_only: bool
    #: NBD connections other than the ones carrying attachments.
    clients: int
    devices: list[str]
    uris: list[str]
    #: "export" (``tapnbd export add``) or "attach" (made by ``tapnbd attach``, removed
    #: by its detach).
    origin: Literal["export", "attach"]


@dataclass(frozen=True, slots=True)
class OpCounters:
    """Counters for one operation (see tapnbd.stats)."""

    ops: int
    bytes: int
    errors: int
    p50_us: float
    p99_us: float
    max_us: float
    fua: int = 0  # requests with FUA
    max_bytes: int = 0  # the largest request


@dataclass(frozen=True, slots=True)
class ExportStats:
    """Live statistics of one export."""

    name: str
    image: str
    format: str
    ops: dict[str, OpCounters]
    errors_by_errno: dict[str, int]
    in_flight: int
    connections: int
    uptime_s: float
    enabled: bool


# Messages.


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every control message. ``TYPE`` is the wire tag."""

    TYPE: ClassVar[str] = ""


@dataclass(frozen=True, slots=True)
class Reply(Message):
    """Base of replies."""


@dataclass(frozen=True, slots=True)
class Request(Message):
    """Base of requests. ``REPLY`` is the reply that answers it."""

    REPLY: ClassVar[type[Reply]] = Reply


@dataclass(frozen=True, slots=True)
class ErrorReply(Reply):
    """The request failed; ``message`` says why, for a human."""

    TYPE: ClassVar[str] = "error"
    message: str


@dataclass(frozen=True, slots=True)
class StatusReply(Reply):
    TYPE: ClassVar[str] = "status_reply"
    pid: int
    version: str
    state_dir: str
    log: str
    started: float
    #: Where exports are served: "unix:PATH" and "tcp:HOST:PORT".
    listen: list[str]
    metrics: str | None
    exports: int
    attachments: int
    stats_enabled: bool
    #: What the daemon cleaned up or could not restore when it started.
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StatusRequest(Request):
    TYPE: ClassVar[str] = "status"
    REPLY: ClassVar[type[Reply]] = StatusReply


@dataclass(frozen=True, slots=True)
class ExportAddReply(Reply):
    TYPE: ClassVar[str] = "export_add_reply"
    export: ExportRecord


@dataclass(frozen=True, slots=True)
class ExportAddRequest(Request):
    TYPE: ClassVar[str] = "export_add"
    REPLY: ClassVar[type[Reply]] = ExportAddReply
    image: str
    name: str | None = None
    read_only: bool = False
    format: str = "auto"


@dataclass(frozen=True, slots=True)
class ExportRemoveReply(Reply):
    TYPE: ClassVar[str] = "export_remove_reply"
    name: str
    detached: list[str]
    disconnected: int


@dataclass(frozen=True, slots=True)
class ExportRemoveRequest(Request):
    TYPE: ClassVar[str] = "export_remove"
    REPLY: ClassVar[type[Reply]] = ExportRemoveReply
    name: str
    force: bool = False


@dataclass(frozen=True, slots=True)
class ListReply(Reply):
    TYPE: ClassVar[str] = "list_reply"
    exports: list[ExportRecord]
    attachments: list[AttachmentRecord]


@dataclass(frozen=True, slots=True)
class ListRequest(Request):
    TYPE: ClassVar[str] = "list"
    REPLY: ClassVar[type[Reply]] = ListReply


@dataclass(frozen=True, slots=True)
class StatsReply(Reply):
    TYPE: ClassVar[str] = "stats_reply"
    exports: list[ExportStats]


@dataclass(frozen=True, slots=True)
class StatsRequest(Request):
    TYPE: ClassVar[str] = "stats"
    REPLY: ClassVar[type[Reply]] = StatsReply
    #: One export, or all of them.
    name: str | None = None


@dataclass(frozen=True, slots=True)
class AttachReply(Reply):
    TYPE: ClassVar[str] = "attach_reply"
    attachment: AttachmentRecord
    #: Why this path (kernel nbd or nbdfuse) was taken.
    reason: str
    #: Whether the export was made for this attachment (and goes with its detach).
    created_export: bool


@dataclass(frozen=True, slots=True)
class AttachRequest(Request):
    TYPE: ClassVar[str] = "attach"
    REPLY: ClassVar[type[Reply]] = AttachReply
    #: An image path, ``ram:SIZE``, or the name of an existing export.
    image: str
    name: str | None = None
    read_only: bool = False
    format: str = "auto"
    via: Via = "auto"


@dataclass(frozen=True, slots=True)
class DetachReply(Reply):
    TYPE: ClassVar[str] = "detach_reply"
    attachment: AttachmentRecord
    removed_export: bool


@dataclass(frozen=True, slots=True)
class DetachRequest(Request):
    TYPE: ClassVar[str] = "detach"
    REPLY: ClassVar[type[Reply]] = DetachReply
    #: A device path (/dev/loop0), an image path, or an export name.
    target: str


@dataclass(frozen=True, slots=True)
class ShutdownReply(Reply):
    TYPE: ClassVar[str] = "shutdown_reply"
    detached: list[str]
    flushed: list[str]
    #: Attached devices left running (their data paths do not need the daemon).
    kept: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ShutdownRequest(Request):
    TYPE: ClassVar[str] = "shutdown"
    REPLY: ClassVar[type[Reply]] = ShutdownReply
    #: With ``all``: do not wait for a device's last users to let go (detach lazily).
    #: A mounted device is never detached, forced or not.
    force: bool = False
    #: Detach every device too; by default they keep running without the daemon.
    all: bool = False


#: Every message, by wire tag.
MESSAGES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        ErrorReply,
        StatusRequest,
        StatusReply,
        ExportAddRequest,
        ExportAddReply,
        ExportRemoveRequest,
        ExportRemoveReply,
        ListRequest,
        ListReply,
        StatsRequest,
        StatsReply,
        AttachRequest,
        AttachReply,
        DetachRequest,
        DetachReply,
        ShutdownRequest,
        ShutdownReply,
    )
}


# The codec.


def encode(msg: Message) -> bytes:
    """One JSON line: ``{"type": TAG, field: value, ...}\\n``."""
    body = {"type": msg.TYPE, **dataclasses.asdict(msg)}
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode() + b"\n"


M = TypeVar("M", bound=Message)


def decode(line: bytes | str, expect: type[M] | None = None) -> Message:
    """Parse and strictly validate one line. With ``expect``, also accept ErrorReply."""
    if len(line) > MAX_LINE:
        raise MessageError(f"message longer than {MAX_LINE} bytes")
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise MessageError(f"not a JSON message: {e}") from None
    if not isinstance(obj, dict):
        raise MessageError("a message must be a JSON object")
    tag = obj.pop("type", None)
    if not isinstance(tag, str):
        raise MessageError("message has no 'type'")
    cls = MESSAGES.get(tag)
    if cls is None:
        raise MessageError(f"unknown message type {tag!r}")
    if expect is not None and cls is not expect and cls is not ErrorReply:
        raise MessageError(f"expected {expect.TYPE!r}, got {tag!r}")
    msg = _build(cls, obj, tag)
    assert isinstance(msg, Message)
    return msg


def _build(cls: type[Any], obj: object, where: str) -> Any:
    """Construct dataclass ``cls`` from a JSON object, checking every field."""
    if not isinstance(obj, dict):
        raise MessageError(f"{where}: expected an object")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = set(obj) - set(fields)
    if extra:
        raise MessageError(f"{where}: unknown field {sorted(extra)[0]!r}")
    kwargs = {}
    for name, f in fields.items():
        if name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MessageError(f"{where}: missing field {name!r}")
            continue
        kwargs[name] = _check(hints[name], obj[name], f"{where}.{name}")
    return cls(**kwargs)


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(cls: type[Any]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _check(tp: Any, value: object, where: str) -> Any:
    """``value`` converted to type ``tp``, or MessageError."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        if value is None:
            return None
    elif origin in (types.UnionType, typing.Union):
        for alt in typing.get_args(tp):
            try:
                return _check(alt, value, where)
            except MessageError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str):
            return value
        choices = ", ".join(repr(a) for a in typing.get_args(tp))
        raise MessageError(f"{where}: expected one of {choices}, got {value!r}")
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_check(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            _, item = typing.get_args(tp)
            return {k: _check(item, v, f"{where}[{k!r}]") for k, v in value.items()}
    elif dataclasses.is_dataclass(tp):
        return _build(typing.cast("type[Any]", tp), value, where)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a message declared a type the codec does not know
        raise MessageError(f"{where}: cannot decode type {tp!r}")
    raise MessageError(f"{where}: expected {_name(tp)}, got {type(value).__name__}")


def _name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_name(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "an object"
    return str(getattr(tp, "__name__", tp))
