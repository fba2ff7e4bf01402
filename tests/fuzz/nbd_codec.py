"""Fuzz targets for the sans-I/O NBD codec (tapnbd.protocol), both directions.

``one_input(data)`` is the entry point atheris and the pytest budget both call. Its
first byte picks a target:

- the handshake: a client byte stream is *built* from the input (well-formed options
  with fuzzed fields, malformed ones, raw garbage), cut into chunks, and fed to
  ``Handshake``. Everything the server sends back is parsed by an independent reader
  and checked against the rules of proto.md: one final reply per option, in order; the
  reply types each option allows; ERR_TLS_REQD for everything but STARTTLS and ABORT
  before TLS on a TLS-only server; nothing negotiated before STARTTLS surviving it
  (CVE-2021-3716); SEND_DF exactly when structured replies were negotiated; strings
  UTF-8 and at most 4096 bytes.
- the transmission phase: a stream of requests with fuzzed headers and payloads plus
  garbage, cut at random points and fed through ``feed`` or the BufferedProtocol pair,
  is decoded (with or without the server's small-write lane, ``next_small_write``
  before each ``next_request``) and compared with a ten-line reference parser; each
  decoded request is then answered with every reply encoder and the bytes parsed back.

The only exception allowed out of the codec is ProtocolError, and only where the spec
says the connection dies. Buffers are checked after every step: the handshake never
holds more than one option, the decoder never more than one request header and a small
payload, so a client cannot make either grow (memory stays bounded).
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

from tapnbd.errors import ProtocolError
from tapnbd.protocol import transmission as tx
from tapnbd.protocol.consts import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyType,
    TransmissionFlag,
)
from tapnbd.protocol.handshake import (
    MAX_OPTION_DATA,
    MAX_OPTIONS,
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
from tests.fuzz.source import Source

# The server's table. Names that look like paths must stay names (never files).
DISK = ExportInfo("disk", 1 << 20, TransmissionFlag.SEND_FLUSH, "the disk")
RO = ExportInfo("ro", 4096, TransmissionFlag.READ_ONLY, "")
EXPORTS = {"disk": DISK, "ro": RO}

NAMES: tuple[bytes, ...] = (
    b"",
    b"disk",
    b"ro",
    b"../disk",
    b"/etc/passwd",
    b"disk\0",
    b"\xff\xfe",
    "d\u00efsk".encode(),
    b"a" * MAX_STRING,
    b"a" * (MAX_STRING + 1),
    "\u00e9".encode() * 2048,  # 4096 bytes whose repr is much longer
)
QUERIES: tuple[bytes, ...] = (
    BASE_ALLOCATION.encode(),
    b"base:",
    b"",
    b"qemu:dirty-bitmap:x",
    b"base:allocation\0",
    b"\xc3",
)
OPT_CODES: tuple[int, ...] = (*(int(o) for o in Opt), 0, 12, 99, 0x7FFFFFFF, 0xFFFFFFFF)
_FINAL = {int(Rep.ACK)} | {int(r) for r in Rep if r >= 1 << 31}
_ALLOWED_INFO = {
    int(Opt.LIST): {int(Rep.SERVER)},
    int(Opt.INFO): {int(Rep.INFO)},
    int(Opt.GO): {int(Rep.INFO)},
    int(Opt.LIST_META_CONTEXT): {int(Rep.META_CONTEXT)},
    int(Opt.SET_META_CONTEXT): {int(Rep.META_CONTEXT)},
}


class FuzzCatalog(Catalog):
    """Two exports; the empty name is the default export, as in tapnbd.server.exports."""

    def lookup(self, name: str) -> ExportInfo | None:
        return EXPORTS.get(name or "disk")

    def exports(self) -> list[ExportInfo]:
        return list(EXPORTS.values())


# Building a client's handshake bytes.


def _name(src: Source) -> bytes:
    return src.pick(NAMES) if src.chance(200) else src.take(src.below(24))


def _option_data(src: Source, code: int) -> bytes:
    if src.chance(24):  # anything at all
        return src.take(src.below(48))
    if code in (Opt.INFO, Opt.GO):
        name = _name(src)
        infos = [src.below(6) for _ in range(src.below(4))]
        count = len(infos) if src.chance(230) else src.below(65536)
        nlen = len(name) if src.chance(230) else src.uint(4)
        body = struct.pack(">I", nlen) + name + struct.pack(">H", count)
        return body + b"".join(struct.pack(">H", i) for i in infos)
    if code in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
        name = _name(src)
        queries = [src.pick(QUERIES) for _ in range(src.below(4))]
        count = len(queries) if src.chance(230) else src.uint(4)
        out = struct.pack(">I", len(name)) + name + struct.pack(">I", count)
        for q in queries:
            qlen = len(q) if src.chance(240) else src.uint(4)
            out += struct.pack(">I", qlen) + q
        return out
    if code == Opt.EXPORT_NAME:
        return _name(src)
    return b"" if src.chance(200) else src.take(src.below(16))


def build_client_stream(src: Source) -> bytes:
    """Client flags, then options until the input runs out."""
    out = bytearray()
    out += struct.pack(">I", src.pick((1, 3)) if src.chance(240) else src.uint(4))
    while src.left() and len(out) < 1 << 20:
        kind = src.below(32)
        if kind == 0:
            out += src.take(src.below(32))  # garbage
        elif kind == 1:
            out += src.take(8) + struct.pack(">II", src.pick(OPT_CODES), 0)  # bad magic?
        elif kind == 2:  # a length that does not match what follows
            out += IHAVEOPT.to_bytes(8, "big") + struct.pack(
                ">II", src.pick(OPT_CODES), src.uint(4)
            )
        elif kind == 3:  # a burst of one option, to reach the option limit
            one = IHAVEOPT.to_bytes(8, "big") + struct.pack(">II", src.pick(OPT_CODES), 0)
            out += one * src.below(300)
        else:
            code = src.pick(OPT_CODES) if src.chance(240) else src.uint(4)
            data = _option_data(src, code)
            out += IHAVEOPT.to_bytes(8, "big") + struct.pack(">II", code, len(data)) + data
    return bytes(out)


def split(stream: bytes, mode: int, seed: int) -> list[bytes]:
    """Cut the stream as a network might: whole, byte by byte, or at random points."""
    if mode == 0 or not stream:
        return [stream]
    if mode == 1 and len(stream) <= 4096:
        return [stream[i : i + 1] for i in range(len(stream))]
    rng = random.Random(seed)
    out, pos = [], 0
    while pos < len(stream):
        n = rng.choice((1, 2, 3, 7, 16, 28, 100, 4096, 70000))
        out.append(stream[pos : pos + n])
        pos += n
    return out


# An independent reading of the client's stream (what the server should have seen).


@dataclass
class ClientOption:
    code: int
    data: bytes
    end: int  # offset in the stream just past this option
    broken: str = ""  # why the server must drop the client here ("" if it must not)


def parse_client(stream: bytes) -> tuple[int, list[ClientOption]]:
    """(client flags, complete options); a broken one is last and says why."""
    if len(stream) < 4:
        return -1, []
    (flags,) = struct.unpack_from(">I", stream)
    opts: list[ClientOption] = []
    pos = 4
    while len(stream) - pos >= 16:
        magic, code, length = struct.unpack_from(">QII", stream, pos)
        if magic != IHAVEOPT:
            opts.append(ClientOption(code, b"", pos + 16, "bad magic"))
            break
        if length > MAX_OPTION_DATA:
            opts.append(ClientOption(code, b"", pos + 16, "option too long"))
            break
        if len(stream) - pos - 16 < length:
            break
        opts.append(ClientOption(code, stream[pos + 16 : pos + 16 + length], pos + 16 + length))
        pos += 16 + length
    return flags, opts


# Reading the server's answer.


@dataclass
class Negotiated:
    """What a correct server has agreed to so far, replayed from its replies."""

    tls_active: bool = False
    structured: bool = False
    meta: dict[int, str] = field(default_factory=dict)
    meta_export: ExportInfo | None = None


class Replies:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        assert self.left() >= n, f"server output cut short: {n} bytes wanted, {self.left()} left"
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", self.take(20))
        assert magic == REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        return opt, rep, self.take(length)


def _check_string(raw: bytes, what: str) -> str:
    assert len(raw) <= MAX_STRING, f"{what} is {len(raw)} bytes, over {MAX_STRING}"
    text = raw.decode("utf-8")  # UnicodeDecodeError fails the run
    assert "\0" not in text, f"{what} contains NUL"
    return text


def _check_info(opt: ClientOption, data: bytes) -> ExportInfo | None:
    """Check one REP_INFO; returns the export an NBD_INFO_EXPORT names."""
    (kind,) = struct.unpack_from(">H", data)
    if kind == Info.EXPORT:
        _, size, flags = struct.unpack(">HQH", data)
        matches = [e for e in EXPORTS.values() if e.size == size]
        assert matches and flags & TransmissionFlag.HAS_FLAGS, (size, flags)
        return matches[0]
    if kind == Info.BLOCK_SIZE:
        _, lo, pref, hi = struct.unpack(">HIII", data)
        assert lo <= pref <= hi
    elif kind in (Info.NAME, Info.DESCRIPTION):
        _check_string(data[2:], "NBD_INFO_NAME/DESCRIPTION")
    else:
        raise AssertionError(f"unknown NBD_INFO {kind}")
    return None


def check_option_answer(
    opt: ClientOption, out: Replies, neg: Negotiated, tls: TLSMode, shutting: bool, no_zeroes: bool
) -> Event | None:
    """Read the server's answer to ``opt`` and check it; the event it must have caused."""
    code = opt.code
    if code == Opt.EXPORT_NAME:
        # No error reply exists for it: the server answers with the export or hangs up.
        assert not (tls is TLSMode.REQUIRE and not neg.tls_active), "EXPORT_NAME before TLS"
        assert not shutting, "EXPORT_NAME answered while shutting down"
        export = EXPORTS.get(opt.data.decode("utf-8", "replace") or "disk")
        assert export is not None, f"EXPORT_NAME {opt.data[:40]!r} answered"
        size, flags = struct.unpack(">QH", out.take(10))
        if not no_zeroes:
            assert out.take(124) == bytes(124)
        assert size == export.size
        return _ready(export, flags, neg)
    infos: list[tuple[int, bytes]] = []
    while True:
        ropt, rep, data = out.option_reply()
        assert ropt == code, f"reply for option {ropt} while answering {code}"
        if rep in _FINAL:
            break
        assert rep in _ALLOWED_INFO.get(code, set()), f"reply {rep:#x} to option {code}"
        infos.append((rep, data))
    if rep != Rep.ACK:
        _check_string(data, "error message")
        assert not infos, "informational replies before an error"
    before_tls = tls is TLSMode.REQUIRE and not neg.tls_active
    if before_tls and code not in (Opt.STARTTLS, Opt.ABORT):
        assert rep == Rep.ERR_TLS_REQD, f"option {code} before STARTTLS got {rep:#x}"
        return None
    if shutting and code != Opt.ABORT:
        assert rep == Rep.ERR_SHUTDOWN
        return None
    if code == Opt.SET_META_CONTEXT:
        # "Each use replaces the previous selection, even when it fails."
        neg.meta, neg.meta_export = {}, None
    if rep != Rep.ACK:
        assert code not in (Opt.ABORT,), "ABORT refused"
        if code == Opt.STRUCTURED_REPLY:
            assert opt.data, "STRUCTURED_REPLY without data refused"
        if code == Opt.STARTTLS:
            assert rep in (Rep.ERR_POLICY, Rep.ERR_INVALID, Rep.ERR_UNSUP)
            assert rep != Rep.ERR_POLICY or tls is TLSMode.OFF
        return None
    assert code in _ALLOWED_INFO or code in (Opt.ABORT, Opt.STARTTLS, Opt.STRUCTURED_REPLY), (
        f"unknown option {code} ACKed"
    )
    if code == Opt.ABORT:
        return Abort()
    if code == Opt.STARTTLS:
        assert tls is not TLSMode.OFF and not neg.tls_active and not opt.data
        return StartTLS()
    if code == Opt.STRUCTURED_REPLY:
        assert not opt.data
        neg.structured = True
        return None
    if code == Opt.LIST:
        assert sorted(_list_names(infos)) == sorted(EXPORTS), infos
        return None
    if code in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
        assert neg.structured, "meta context negotiated without structured replies"
        for _, data in infos:
            ctx_id, name = struct.unpack(">I", data[:4])[0], _check_string(data[4:], "context")
            assert name == BASE_ALLOCATION
            if code == Opt.SET_META_CONTEXT:
                assert ctx_id != 0
                neg.meta = {ctx_id: name}
                (nlen,) = struct.unpack_from(">I", opt.data)
                neg.meta_export = EXPORTS[opt.data[4 : 4 + nlen].decode() or "disk"]
        return None
    # INFO or GO: NBD_INFO_EXPORT must be among the replies.
    exports = [e for _, d in infos if (e := _check_info(opt, d)) is not None]
    assert len(exports) == 1, f"INFO/GO answered with {len(exports)} NBD_INFO_EXPORT"
    (nlen,) = struct.unpack_from(">I", opt.data)
    assert exports[0] == EXPORTS[opt.data[4 : 4 + nlen].decode() or "disk"], "wrong export"
    if code == Opt.INFO:
        return None
    flags = struct.unpack(">HQH", next(d for _, d in infos if d[:2] == b"\0\0"))[2]
    return _ready(exports[0], flags, neg)


def _list_names(infos: list[tuple[int, bytes]]) -> list[str]:
    out = []
    for _, data in infos:
        (n,) = struct.unpack_from(">I", data)
        out.append(_check_string(data[4 : 4 + n], "export name"))
    return out


def _ready(export: ExportInfo, flags: int, neg: Negotiated) -> Ready:
    # "SEND_DF ... MUST be clear when structured replies were not negotiated"
    assert bool(flags & TransmissionFlag.SEND_DF) == neg.structured, (flags, neg)
    meta = dict(neg.meta) if neg.meta_export == export else {}
    return Ready(export, TransmissionFlag(flags), neg.structured, meta)


def run_handshake(data: bytes) -> None:
    src = Source(data)
    cfg, seed = src.uint(1), src.uint(2)
    tls = (TLSMode.OFF, TLSMode.ON, TLSMode.REQUIRE)[cfg % 3]
    shutting = cfg & 0x1C == 0x1C  # rarely: it hides everything else
    late_tls = bool(cfg & 0x20)  # feed more bytes before the TLS upgrade completes
    stream = build_client_stream(src)
    chunks = split(stream, (cfg >> 6) & 3, seed)

    hs = Handshake(FuzzCatalog(), tls=tls, shutting_down=lambda: shutting)
    greeting = hs.greeting()
    magic, ihaveopt, hflags = struct.unpack(">QQH", greeting)
    assert (magic, ihaveopt) == (NBDMAGIC, IHAVEOPT) and hflags & HandshakeFlag.FIXED_NEWSTYLE

    out = bytearray()
    events: list[Event] = []
    error: ProtocolError | None = None
    fed = 0
    tls_pending = False
    try:
        for chunk in chunks:
            if tls_pending and not late_tls:
                hs.tls_started()
                tls_pending = False
            fed += len(chunk)
            hs.receive_data(chunk)
            for _ in range(len(chunk) // 16 + 3):
                ev = hs.next_event()
                out += hs.data_to_send()
                if ev is NEED_DATA:
                    # Bounded memory: at most one incomplete option is held.
                    assert len(hs._buf) < 16 + MAX_OPTION_DATA, len(hs._buf)
                    break
                events.append(ev)
                if isinstance(ev, StartTLS):
                    tls_pending = True
                    break
                if isinstance(ev, Abort | Ready):
                    break
            else:
                raise AssertionError("next_event keeps returning events without input")
            if events and isinstance(events[-1], Abort | Ready):
                break
    except ProtocolError as e:
        error = e
        out += hs.data_to_send()
    assert hs.options_seen <= MAX_OPTIONS + 1

    # Replay the server's answers against the client's options.
    flags, opts = parse_client(stream[:fed])
    replies = Replies(bytes(out))
    neg = Negotiated()
    got_events = iter(events)
    answered = 0
    for opt in opts:
        if not replies.left():
            break
        if opt.broken:
            raise AssertionError(f"server answered an option after {opt.broken}")
        due = check_option_answer(opt, replies, neg, tls, shutting, bool(flags & 2))
        answered += 1
        if due is not None:
            happened = next(got_events, None)
            assert happened == due, f"event {happened} where {due} was due"
            if isinstance(due, StartTLS):
                # The upgrade forgets everything negotiated before it (CVE-2021-3716).
                neg = Negotiated(tls_active=True)
            if isinstance(due, Ready):
                assert hs.leftover() == stream[opt.end : fed]
            if isinstance(due, Abort | Ready):
                break
    assert replies.left() == 0, "server output past the last answer"
    assert next(got_events, None) is None, "an event without its reply"
    if error is None:
        if not events or isinstance(events[-1], StartTLS):
            # Nothing stopped it: every complete option was answered.
            assert answered == len(opts), f"{answered} of {len(opts)} options answered"
        return
    # A ProtocolError must have a cause the spec names.
    if flags < 0:
        raise AssertionError(f"ProtocolError before the client flags: {error}")
    if flags & ~3 and answered == 0:
        return
    if tls_pending and late_tls:
        return
    assert answered < len(opts) or answered >= MAX_OPTIONS, (
        f"ProtocolError with nothing due: {error}"
    )
    if answered >= MAX_OPTIONS:
        return
    culprit = opts[answered]
    allowed = culprit.broken or culprit.code in (Opt.EXPORT_NAME, Opt.STARTTLS)
    assert allowed, f"option {culprit.code} dropped the client instead of a reply: {error}"


# The transmission phase.


def build_request_stream(src: Source, max_payload: int) -> bytes:
    out = bytearray()
    while src.left() and len(out) < 1 << 20:
        kind = src.below(16)
        if kind == 0:
            out += src.take(src.below(40))  # garbage
            continue
        magic = REQUEST_MAGIC if src.chance(250) else src.uint(4)
        cmd = src.pick((*(int(c) for c in Cmd), 42, 0xFFFF)) if src.chance(250) else src.uint(2)
        flags = src.uint(1) if src.chance(200) else src.uint(2)
        cookie, offset = src.uint(8), src.pick((0, 512, 1 << 20, (1 << 64) - 1, src.uint(8)))
        if cmd == Cmd.WRITE:
            size = src.below(5)
            length = (
                src.below(600),
                src.pick((tx._DIRECT_MIN - 1, tx._DIRECT_MIN, tx._DIRECT_MIN + 1)),
                max_payload + src.below(2),
                max_payload * 2 + src.below(2) - 1,
                src.uint(4),
            )[size]
            out += struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)
            if length <= max_payload * 2 and src.chance(240):
                fill = src.take(1) or b"\0"
                payload = src.take(min(length, 64)).ljust(length, fill)
                out += payload if src.chance(240) else payload[: src.below(length + 1)]
        else:
            out += struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, src.uint(4))
    return bytes(out)


def reference_decode(
    stream: bytes, max_payload: int, max_drain: int
) -> tuple[list[tx.Request], bool]:
    """The requests a correct decoder returns, and whether it must then fail."""
    out: list[tx.Request] = []
    pos = 0
    while len(stream) - pos >= 28:
        magic, flags, typ, cookie, offset, length = struct.unpack_from(">IHHQQI", stream, pos)
        if magic != REQUEST_MAGIC:
            return out, True
        pos += 28
        payload: bytes | None = None
        if typ == Cmd.WRITE:
            if length > max_drain:
                return out, True
            if len(stream) - pos < length:
                return out, False
            payload = stream[pos : pos + length] if length <= max_payload else None
            pos += length
        out.append(tx.Request(flags, typ, cookie, offset, length, payload))
    return out, False


def run_transmission(data: bytes) -> None:
    src = Source(data)
    cfg, seed = src.uint(1), src.uint(2)
    max_payload = (1024, tx._DIRECT_MIN, 128 * 1024)[cfg % 3]
    buffered_protocol = bool(cfg & 4)
    lane = bool(cfg & 32)  # the server's fast lane for small WRITEs first, as _process
    stream = build_request_stream(src, max_payload)
    expected, must_fail = reference_decode(stream, max_payload, 2 * max_payload)

    dec = tx.RequestDecoder(max_payload=max_payload, max_drain=2 * max_payload)
    got: list[tx.Request] = []
    failed = False
    rng = random.Random(seed)
    try:
        for chunk in split(stream, (cfg >> 3) & 3, seed):
            if buffered_protocol:
                view = memoryview(chunk)
                while view:
                    buf = dec.get_buffer(len(view))
                    assert len(buf) > 0
                    n = min(len(buf), len(view), rng.choice((1, 5, 4096, 1 << 20)))
                    buf[:n] = view[:n]
                    dec.buffer_updated(n)
                    view = view[n:]
            else:
                dec.feed(chunk)
            for _ in range(len(chunk) // 28 + 3):
                small = dec.next_small_write() if lane else None
                if small is not None:
                    cookie, offset, payload = small
                    got.append(tx.Request(0, Cmd.WRITE, cookie, offset, len(payload), payload))
                    continue
                req = dec.next_request()
                if req is None:
                    break
                got.append(req)
            else:
                raise AssertionError("next_request keeps returning requests without input")
            # Bounded memory: one header plus a payload below the in-place size.
            assert dec.buffered() < 28 + tx._DIRECT_MIN, dec.buffered()
            assert len(dec._buf) < 2 * (28 + tx._DIRECT_MIN) + len(chunk)
            assert len(dec._direct_buf) <= max_payload
    except ProtocolError:
        failed = True
    normalised = [r._replace(payload=None if r.payload is None else bytes(r.payload)) for r in got]
    assert normalised == expected, "decoded requests differ from the reference"
    assert failed == must_fail, f"ProtocolError raised: {failed}, due: {must_fail}"
    for req in got:
        check_replies(req, src)


def check_replies(req: tx.Request, src: Source) -> None:
    """Encode each reply kind for ``req`` and read it back with a separate parser."""
    err = src.pick((0, 1, 5, 22, 28, 108, 0xFFFFFFFF))
    assert struct.unpack(">IIQ", tx.simple_reply(req.cookie, err)) == (
        SIMPLE_REPLY_MAGIC,
        err,
        req.cookie,
    )
    length = min(req.length, 1 << 25)
    done = src.chance(128)
    head = tx.data_chunk(req.cookie, req.offset, length, done)
    magic, flags, typ, cookie, n, off = struct.unpack(">IHHQIQ", head)
    assert (magic, flags, typ, cookie, n, off) == (
        STRUCTURED_REPLY_MAGIC,
        int(done),
        ReplyType.OFFSET_DATA,
        req.cookie,
        8 + length,
        req.offset,
    )
    hole = struct.unpack(">IHHQIQI", tx.hole_chunk(req.cookie, req.offset, length, done))
    assert hole == (
        STRUCTURED_REPLY_MAGIC,
        int(done),
        ReplyType.OFFSET_HOLE,
        req.cookie,
        12,
        req.offset,
        length,
    )
    assert struct.unpack(">IHHQI", tx.none_chunk(req.cookie)) == (
        STRUCTURED_REPLY_MAGIC,
        1,
        ReplyType.NONE,
        req.cookie,
        0,
    )
    text = src.take(src.below(64)).decode("utf-8", "replace").replace("\0", "")
    message = text * src.pick((1, 100, 1000))
    chunk = tx.error_chunk(req.cookie, err or 5, message, done)
    magic, flags, typ, cookie, n, e, mlen = struct.unpack_from(">IHHQIIH", chunk)
    assert (magic, typ, cookie, e) == (
        STRUCTURED_REPLY_MAGIC,
        ReplyType.ERROR,
        req.cookie,
        err or 5,
    )
    assert n == 6 + mlen and len(chunk) == 20 + n
    text = _check_string(chunk[26:], "error chunk message")
    assert message.startswith(text)
    extents = [(src.uint(4), src.uint(4)) for _ in range(src.below(8))]
    ctx = src.uint(4)
    bs = tx.block_status_chunk(req.cookie, ctx, extents, done)
    magic, flags, typ, cookie, n = struct.unpack_from(">IHHQI", bs)
    assert (typ, cookie, n, len(bs)) == (
        ReplyType.BLOCK_STATUS,
        req.cookie,
        4 + 8 * len(extents),
        20 + n,
    )
    body = bs[20:]
    assert struct.unpack_from(">I", body)[0] == ctx
    assert [struct.unpack_from(">II", body, 4 + 8 * i) for i in range(len(extents))] == extents


def one_input(data: bytes) -> None:
    """The fuzz target: the first byte chooses the phase."""
    if not data:
        return
    if data[0] & 1:
        run_transmission(data[1:])
    else:
        run_handshake(data[1:])


def seeds() -> list[bytes]:
    """Starting inputs: a few plausible sessions for each target."""
    out = []
    for n in range(64):
        rng = random.Random(n)
        out.append(bytes([n & 1]) + rng.randbytes(rng.choice((8, 40, 200, 1000))))
    return out
