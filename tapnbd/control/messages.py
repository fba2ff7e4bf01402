"""Control messages and the records they carry, declared once with msgspec.

blktap's ``tapdisk-message.h`` pairs every request with its answer (``TAPDISK_MESSAGE_OPEN``
and ``..._OPEN_RSP``); so do we. A message is a msgspec Struct tagged with its wire
name; on the wire it is one line of JSON, an object with a ``type`` tag and the fields::

    {"type": "export_add", "image": "/srv/disk.img", "name": null, "read_only": false, ...}

The same declarations are the schema of the state file (``state.py``): an export or an
attachment is one record type whether it is sent, listed or saved.

Decoding is strict and done by msgspec, in C: unknown tags, missing or extra fields and
fields of the wrong type are refused with a ``MessageError`` naming the field (``at
$.field``), so neither side acts on a half-understood message. Two limits come first:
a line longer than ``MAX_LINE`` is refused before it is parsed, and as no field is of an
untyped kind, nesting is refused at the first level the schema does not expect. msgspec
raises RecursionError (cleanly, it checks Python's recursion limit) only when it must
skip or build deeply nested untyped values; that too becomes a MessageError.

Any request may be answered with ``ErrorReply`` instead of its own reply; the client
raises it as a ``TapnbdError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar, Union

import msgspec

from tapnbd.errors import TapnbdError

if TYPE_CHECKING:
    from formats import OpenRules

#: The longest line either side accepts (a list of many exports fits easily).
MAX_LINE = 1 << 20

Via = Literal["auto", "nbd", "fuse", "socket"]
#: "socket": no local device; the data path's NBD socket is for a VM (blktap's guests).
ViaName = Literal["nbd", "fuse", "socket"]
#: "export" (``tapnbd export add``) or "attach" (made by ``tapnbd attach``, removed by
#: its detach).
Origin = Literal["export", "attach"]


class MessageError(TapnbdError):
    """A control message (or the state file) could not be decoded."""


class Record(msgspec.Struct, forbid_unknown_fields=True):
    """Base of the records carried in messages and kept in the state file."""


# Records.


class Trust(Record, kw_only=True):
    """What the admin allowed an image's backing chain (formats.OpenRules; README,
    "Security model"): the trust options of ``export add`` and ``attach``, kept with the
    export or attachment so that a restore and a device's data path open the chain by
    the same rules. Only the daemon's owner or root can send them (control.auth)."""

    #: ``-F``: the backing file's format (QCOW v1 cannot record it).
    backing_format: str | None = None
    #: ``--allow-probed-backing-chain``, ``--allow-block-devices``,
    #: ``--allow-remote-backing``.
    allow_probed_chain: bool = False
    allow_block_devices: bool = False
    allow_remote_backing: bool = False

    @classmethod
    def of(cls, rules: OpenRules) -> Trust:
        """The admin's part of ``rules`` (the CLI's options), to send and keep."""
        return cls(
            backing_format=rules.backing_format,
            allow_probed_chain=rules.allow_probed_backing,
            allow_block_devices=rules.allow_block_devices,
            allow_remote_backing=rules.allow_remote_backing,
        )

    def rules(self, *, share: bool, guard_raw: bool) -> OpenRules:
        """The rules an export or a device's data path opens its image by: these
        options, the share, the probed-raw guard."""
        from formats import OpenRules

        return OpenRules(
            backing_format=self.backing_format,
            allow_probed_backing=self.allow_probed_chain,
            allow_block_devices=self.allow_block_devices,
            allow_remote_backing=self.allow_remote_backing,
            share=share,
            guard_raw=guard_raw,
        )


class Attachment(Record, kw_only=True):
    """One attached device and everything needed to undo or re-adopt it, even after a
    crash. Recorded in the state file as soon as each resource exists, so a daemon that
    dies half-way leaves enough behind for the next one; ``list`` shows the same record
    (without its token)."""

    id: str
    export: str
    image: str
    via: ViaName
    read_only: bool
    device: str = ""
    #: fuse: the FUSE mount point (a directory), the file in it, and nbdfuse's pid.
    mountdir: str = ""
    fuse_file: str = ""
    fuse_pid: int = 0
    #: The data-path process (``tapdisk``): its pid, directory and identity token, and
    #: the image's format as it opened it and its size (for ``list`` without asking it).
    tapdisk_pid: int = 0
    tapdisk_dir: str = ""
    token: str = ""
    format: str = ""
    size: int = 0
    #: The internal qcow2 snapshot the device shows (read-only), if any.
    snapshot: str | None = None
    #: qemu-nbd's --cache for the data path (formats.filters.cachemode).
    cache: str = "writeback"
    #: ``--share``: the data path opens the image beside other users (formats.locks).
    share: bool = False
    #: ``-s``: writes go to a throwaway overlay the data path holds (formats.overlay).
    throwaway: bool = False
    #: The admin's trust options, for the data path's open.
    trust: Trust = msgspec.field(default_factory=Trust)


class ExportRecord(Record, kw_only=True):
    """One export. The state file needs the first five fields to open it again (the
    others stay at their defaults there); ``list`` fills in what is live."""

    name: str
    image: str
    #: The format asked for (state file) or opened as (``list``).
    format: str
    read_only: bool
    origin: Origin = "export"
    #: The internal qcow2 snapshot served (read-only), if any.
    snapshot: str | None = None
    #: Persistent dirty bitmaps offered as qemu:dirty-bitmap:NAME contexts.
    bitmaps: list[str] = []
    #: The qemu:allocation-depth context is offered too.
    allocation_depth: bool = False
    #: qemu-nbd's --discard and --detect-zeroes.
    discard: str = "unmap"
    detect_zeroes: str = "off"
    #: qemu-nbd's --cache, and -o: served from this byte of the image on.
    cache: str = "writeback"
    offset: int = 0
    #: ``--share`` (the image opened beside other users), and qemu-nbd's -s: writes go
    #: to a throwaway overlay, made anew when a restarted daemon opens the export again.
    share: bool = False
    throwaway: bool = False
    #: The format ("raw") was probed, not given: the image stays guarded as a probed
    #: raw image (formats.guard) after a restore and in a device's data path. None: a
    #: state file from before session 32, which did not say; restored guarded.
    probed_raw: bool | None = None
    #: The admin's trust options for the image's backing chain (defaults: none).
    trust: Trust = msgspec.field(default_factory=Trust)
    size: int = 0
    #: NBD connections other than the ones carrying attachments.
    clients: int = 0
    devices: list[str] = []
    uris: list[str] = []


class OpCounters(Record):
    """Counters for one operation (see tapnbd.stats)."""

    ops: int
    bytes: int
    errors: int
    p50_us: float
    p99_us: float
    max_us: float
    fua: int = 0  # requests with FUA
    max_bytes: int = 0  # the largest request
    sum_ns: int = 0  # latencies added up, for the Prometheus histogram's _sum
    #: Latency buckets (tapnbd.stats): bucket i counts 2**(i-1) < ns <= 2**i; trailing
    #: empty buckets are left off.
    hist: list[int] = msgspec.field(default_factory=list)


class ExportStats(Record):
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


class Message(msgspec.Struct, tag_field="type", forbid_unknown_fields=True):
    """Base of every control message; its ``tag`` is its wire name (``message_type``)."""


class Reply(Message):
    """Base of replies."""


class Request(Message):
    """Base of requests. ``REPLY`` is the reply that answers it."""

    REPLY: ClassVar[type[Reply]] = Reply


def message_type(msg: Message | type[Message]) -> str:
    """The wire tag of a message or message class."""
    cls = msg if isinstance(msg, type) else type(msg)
    return str(cls.__struct_config__.tag)


class ErrorReply(Reply, tag="error"):
    """The request failed; ``message`` says why, for a human."""

    message: str


class StatusReply(Reply, tag="status_reply"):
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
    notes: list[str] = []
    #: ``daemon start --poll-us``: 0 (off) from a daemon older than the option.
    poll_us: int = 0


class StatusRequest(Request, tag="status"):
    REPLY: ClassVar[type[Reply]] = StatusReply


class ExportAddReply(Reply, tag="export_add_reply"):
    export: ExportRecord


class ExportAddRequest(Request, tag="export_add"):
    REPLY: ClassVar[type[Reply]] = ExportAddReply
    image: str
    name: str | None = None
    read_only: bool = False
    format: str = "auto"
    snapshot: str | None = None
    bitmaps: list[str] = []
    allocation_depth: bool = False
    discard: str = "unmap"
    detect_zeroes: str = "off"
    cache: str = "writeback"
    offset: int = 0
    share: bool = False
    throwaway: bool = False
    trust: Trust = msgspec.field(default_factory=Trust)


class ExportRemoveReply(Reply, tag="export_remove_reply"):
    name: str
    detached: list[str]
    disconnected: int
    #: False: removed, but its close did not flush (Backend.close_within).
    flushed: bool = True


class ExportRemoveRequest(Request, tag="export_remove"):
    REPLY: ClassVar[type[Reply]] = ExportRemoveReply
    name: str
    force: bool = False


class ListReply(Reply, tag="list_reply"):
    exports: list[ExportRecord]
    attachments: list[Attachment]


class ListRequest(Request, tag="list"):
    REPLY: ClassVar[type[Reply]] = ListReply


class StatsReply(Reply, tag="stats_reply"):
    exports: list[ExportStats]


class StatsRequest(Request, tag="stats"):
    REPLY: ClassVar[type[Reply]] = StatsReply
    #: One export, or all of them.
    name: str | None = None


class AttachReply(Reply, tag="attach_reply"):
    attachment: Attachment
    #: Why this path (kernel nbd or nbdfuse) was taken.
    reason: str
    #: Whether the export was made for this attachment (and goes with its detach).
    created_export: bool


class AttachRequest(Request, tag="attach"):
    REPLY: ClassVar[type[Reply]] = AttachReply
    #: An image path, ``ram:SIZE``, or the name of an existing export.
    image: str
    name: str | None = None
    read_only: bool = False
    format: str = "auto"
    via: Via = "auto"
    #: An internal qcow2 snapshot to show instead of the active image (read-only).
    snapshot: str | None = None
    cache: str = "writeback"
    share: bool = False
    throwaway: bool = False
    #: The admin's trust options for a new export's chain (an existing export keeps its own).
    trust: Trust = msgspec.field(default_factory=Trust)


class DetachReply(Reply, tag="detach_reply"):
    attachment: Attachment
    removed_export: bool
    #: False: its data path closed the image without a last flush.
    flushed: bool = True


class DetachRequest(Request, tag="detach"):
    REPLY: ClassVar[type[Reply]] = DetachReply
    #: A device path (/dev/loop0), an image path, or an export name.
    target: str


class ShutdownReply(Reply, tag="shutdown_reply"):
    detached: list[str]
    flushed: list[str]
    #: Attached devices left running (their data paths do not need the daemon).
    kept: list[str] = []
    #: Exports whose close did not flush (Backend.close_within); not in ``flushed``.
    unclean: list[str] = []


class ShutdownRequest(Request, tag="shutdown"):
    REPLY: ClassVar[type[Reply]] = ShutdownReply
    #: With ``all``: do not wait for a device's last users to let go (detach lazily).
    #: A mounted device is never detached, forced or not.
    force: bool = False
    #: Detach every device too; by default they keep running without the daemon.
    all: bool = False


#: Every message, by wire tag.
MESSAGES: dict[str, type[Message]] = {
    message_type(cls): cls
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

_encoder = msgspec.json.Encoder()
#: Any message: the union of every tagged Struct, built from the table above.
_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(Union[tuple(MESSAGES.values())])  # noqa: UP007


def encode(msg: Message) -> bytes:
    """One JSON line: ``{"type": TAG, field: value, ...}\\n``."""
    return _encoder.encode(msg) + b"\n"


def to_builtins(obj: object) -> Any:
    """A message or record as plain JSON-ready values, without the wire tag (for the
    CLI's ``--json`` output)."""
    out = msgspec.to_builtins(obj)
    if isinstance(obj, Message):
        out.pop("type", None)
    return out


M = TypeVar("M", bound=Message)


def decode_as(data: bytes | str, schema: type[Any], what: str) -> Any:
    """``data`` decoded strictly as ``schema``; MessageError naming ``what`` and the field."""
    try:
        return msgspec.json.decode(data, type=schema)
    except msgspec.ValidationError as e:
        raise MessageError(f"{what}: {e}") from None
    except msgspec.DecodeError as e:
        raise MessageError(f"{what}: not JSON: {e}") from None
    except RecursionError:
        raise MessageError(f"{what}: nested too deeply") from None


def decode(line: bytes | str, expect: type[M] | None = None) -> Message:
    """Parse and strictly validate one line. With ``expect``, also accept ErrorReply."""
    if len(line) > MAX_LINE:
        raise MessageError(f"message longer than {MAX_LINE} bytes")
    try:
        msg = _decoder.decode(line)
    except msgspec.ValidationError as e:
        raise MessageError(str(e)) from None
    except msgspec.DecodeError as e:
        raise MessageError(f"not a JSON message: {e}") from None
    except RecursionError:
        raise MessageError("message nested too deeply") from None
    assert isinstance(msg, Message)
    if expect is not None and not isinstance(msg, (expect, ErrorReply)):
        raise MessageError(f"expected {message_type(expect)!r}, got {message_type(msg)!r}")
    return msg
