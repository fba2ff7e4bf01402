"""Fixed-newstyle handshake: the server side, as a state machine with no I/O.

Theory of operation. The shell sends ``greeting()``, then feeds every received byte to
``receive_data`` and calls ``next_event`` until it returns NEED_DATA, writing out
``data_to_send()`` after each call. Events:

- ``StartTLS``: the ACK is queued; the shell upgrades the transport, then calls
  ``tls_started()``, which forgets everything negotiated before (CVE-2021-3716).
- ``Abort``: the client asked to end the session; the ACK is queued; close afterwards.
- ``Ready``: transmission begins with the export and the negotiated features;
  ``leftover()`` holds any bytes the client already sent for the transmission phase.

A client that breaks a MUST of the spec raises ProtocolError, and the shell drops it.
Everything it may legitimately get wrong gets an error reply and the haggling goes on
("reply ERR_UNSUP to unknown options and keep parsing", proto.md Baseline).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NoReturn

from tapnbd.errors import ProtocolError
from tapnbd.protocol import wire
from tapnbd.protocol.consts import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)

#: Options a client may send before transmission (nbdkit allows 32; listing many exports
#: with nbdinfo takes a few per export).
MAX_OPTIONS = 256
#: Largest option payload read; beyond it the client is dropped (names are <= 4096 bytes).
MAX_OPTION_DATA = 64 * 1024
#: Context id of base:allocation once selected (ids are ours to choose, nonzero here).
BASE_ALLOCATION_ID = 1


class TLSMode(enum.Enum):
    OFF = "off"  # NOTLS: STARTTLS gets ERR_POLICY
    ON = "on"  # TLS offered, not required
    REQUIRE = "require"  # FORCEDTLS: only STARTTLS and ABORT before TLS


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake needs to know about an export."""

    name: str
    size: int
    flags: TransmissionFlag  # everything but SEND_DF, which depends on structured replies
    description: str = ""
    block_size: tuple[int, int, int] = (1, 4096, 32 << 20)
    #: Metadata contexts beside base:allocation (qemu:dirty-bitmap:NAME), by id - 2.
    contexts: tuple[str, ...] = ()

    def context_id(self, context: str) -> int:
        """The id a selected context is known by: base:allocation's, then the others'."""
        if context == BASE_ALLOCATION:
            return BASE_ALLOCATION_ID
        return BASE_ALLOCATION_ID + 1 + self.contexts.index(context)


class Catalog:
    """The exports a handshake may hand out; the server implements ``lookup``/``names``."""

    def lookup(self, name: str) -> ExportInfo | None:
        raise NotImplementedError

    def exports(self) -> Iterable[ExportInfo]:
        raise NotImplementedError


class NeedData:
    """Sentinel event: feed more bytes."""


NEED_DATA = NeedData()


@dataclass(frozen=True, slots=True)
class StartTLS:
    pass


@dataclass(frozen=True, slots=True)
class Abort:
    pass


@dataclass(frozen=True, slots=True)
class Ready:
    export: ExportInfo
    flags: TransmissionFlag  # as sent to the client
    structured: bool
    meta_contexts: dict[int, str] = field(default_factory=dict)


Event = NeedData | StartTLS | Abort | Ready


class _State(enum.Enum):
    CLIENT_FLAGS = 1
    OPTIONS = 2
    TLS_PENDING = 3
    DONE = 4
    ERROR = 5


class Handshake:
    """One connection's option haggling."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        tls: TLSMode = TLSMode.OFF,
        shutting_down: Callable[[], bool] = lambda: False,
    ) -> None:
        self.catalog = catalog
        self.tls_mode = tls
        self.shutting_down = shutting_down
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._state = _State.CLIENT_FLAGS
        self.no_zeroes = False
        self.tls_active = False
        self.options_seen = 0
        self._reset_negotiation()

    def _reset_negotiation(self) -> None:
        # Everything here is dropped by STARTTLS: "the server MUST forget all earlier
        # negotiation state" (proto.md, NBD_OPT_STARTTLS).
        self.structured = False
        self.meta_export: str | None = None
        self.meta_contexts: dict[int, str] = {}

    # The shell's API.

    def greeting(self) -> bytes:
        flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        return wire.GREETING.pack(NBDMAGIC, IHAVEOPT, flags)

    def receive_data(self, data: bytes) -> None:
        if self._state is _State.TLS_PENDING:
            # Bytes between our STARTTLS ACK and the TLS upgrade would be plaintext
            # injected into the secure session.
            self._fail("data received while switching to TLS")
        self._buf += data

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def leftover(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def tls_started(self) -> None:
        if self._state is not _State.TLS_PENDING:
            raise ProtocolError("tls_started() without STARTTLS")
        self.tls_active = True
        self._reset_negotiation()
        self._state = _State.OPTIONS

    def next_event(self) -> Event:
        try:
            return self._next_event()
        except ProtocolError:
            self._state = _State.ERROR
            raise

    # Internals.

    def _fail(self, why: str) -> NoReturn:
        self._state = _State.ERROR
        raise ProtocolError(why)

    def _next_event(self) -> Event:
        if self._state is _State.CLIENT_FLAGS:
            if len(self._buf) < 4:
                return NEED_DATA
            (flags,) = wire.CLIENT_FLAGS.unpack_from(self._buf)
            del self._buf[:4]
            known = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
            if flags & ~known:  # plain ints: ~ on an IntFlag would drop unknown bits
                # "The server MUST drop the connection if the client sets an unknown flag"
                self._fail(f"unknown client flags {flags:#x}")
            self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
            self._state = _State.OPTIONS
        while self._state is _State.OPTIONS:
            if len(self._buf) < wire.OPTION.size:
                return NEED_DATA
            magic, opt, length = wire.OPTION.unpack_from(self._buf)
            if magic != IHAVEOPT:
                self._fail(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_DATA:
                self._fail(f"option {opt} carries {length} bytes, over {MAX_OPTION_DATA}")
            end = wire.OPTION.size + length
            if len(self._buf) < end:
                return NEED_DATA
            data = bytes(self._buf[wire.OPTION.size : end])
            del self._buf[:end]
            self.options_seen += 1
            if self.options_seen > MAX_OPTIONS:
                self._fail(f"more than {MAX_OPTIONS} options")
            event = self._option(opt, data)
            if event is not None:
                return event
        if self._state is _State.ERROR:
            raise ProtocolError("handshake failed earlier")
        return NEED_DATA

    def _reply(self, opt: int, rep: Rep, data: bytes = b"") -> None:
        self._out.append(wire.OPTION_REPLY.pack(REPLY_MAGIC, opt, rep, len(data)))
        if data:
            self._out.append(data)

    def _error(self, opt: int, rep: Rep, message: str) -> None:
        self._reply(opt, rep, wire.string(message))

    def _option(self, opt: int, data: bytes) -> Event | None:
        if self.tls_mode is TLSMode.REQUIRE and not self.tls_active:
            if opt == Opt.EXPORT_NAME:
                # FORCEDTLS: "EXPORT_NAME before TLS -> the server must terminate"
                self._fail("EXPORT_NAME before STARTTLS on a TLS-only server")
            if opt not in (Opt.STARTTLS, Opt.ABORT):
                self._error(opt, Rep.ERR_TLS_REQD, "TLS is required: send STARTTLS first")
                return None
        if self.shutting_down() and opt not in (Opt.ABORT,):
            if opt == Opt.EXPORT_NAME:
                # EXPORT_NAME has no error reply: hanging up is the only refusal.
                self._fail("EXPORT_NAME while the server is shutting down")
            self._error(opt, Rep.ERR_SHUTDOWN, "server is shutting down")
            return None
        handler = _HANDLERS.get(opt)
        if handler is None:
            self._error(opt, Rep.ERR_UNSUP, f"option {opt} is not supported")
            return None
        return handler(self, opt, data)

    def _opt_export_name(self, opt: int, data: bytes) -> Event:
        name = self._decode_name(data)
        export = self.catalog.lookup(name) if name is not None else None
        if export is None:
            # "If the server cannot serve the export it MUST terminate the session"
            self._fail(f"EXPORT_NAME for unknown export {data[:64]!r}")
        flags = self._flags(export)
        self._out.append(wire.EXPORT_NAME_REPLY.pack(export.size, flags))
        if not self.no_zeroes:
            self._out.append(bytes(124))
        return self._ready(export, flags)

    def _opt_abort(self, opt: int, data: bytes) -> Event:
        # "the server SHOULD ignore any data"
        self._reply(opt, Rep.ACK)
        self._state = _State.DONE
        return Abort()

    def _opt_list(self, opt: int, data: bytes) -> None:
        if data:
            self._error(opt, Rep.ERR_INVALID, "LIST takes no data")
            return
        for export in self.catalog.exports():
            name = export.name.encode()
            self._reply(
                opt, Rep.SERVER, wire.U32.pack(len(name)) + name + export.description.encode()
            )
        self._reply(opt, Rep.ACK)

    def _opt_starttls(self, opt: int, data: bytes) -> Event | None:
        if self.tls_mode is TLSMode.OFF:
            # NOTLS: "STARTTLS gets ERR_POLICY or ERR_UNSUP, never ERR_TLS_REQD"
            self._error(opt, Rep.ERR_POLICY, "TLS is not configured on this server")
            return None
        if self.tls_active:
            self._error(opt, Rep.ERR_INVALID, "TLS is already active")
            return None
        if data:
            self._error(opt, Rep.ERR_INVALID, "STARTTLS takes no data")
            return None
        if self._buf:
            self._fail("data pipelined after STARTTLS")
        self._reply(opt, Rep.ACK)
        self._state = _State.TLS_PENDING
        return StartTLS()

    def _opt_info_go(self, opt: int, data: bytes) -> Event | None:
        # u32 name length, name, u16 count, count x u16 info requests; lengths must agree.
        if len(data) < 6:
            self._error(opt, Rep.ERR_INVALID, "INFO/GO request too short")
            return None
        (nlen,) = wire.U32.unpack_from(data)
        if nlen > len(data) - 6:
            self._error(opt, Rep.ERR_INVALID, "export name length exceeds the option")
            return None
        (count,) = wire.U16.unpack_from(data, 4 + nlen)
        if len(data) != 6 + nlen + 2 * count:
            self._error(opt, Rep.ERR_INVALID, "INFO/GO length does not match its contents")
            return None
        name = self._decode_name(data[4 : 4 + nlen])
        if name is None:
            self._error(opt, Rep.ERR_INVALID, "export name is not valid UTF-8 or too long")
            return None
        requests = {wire.U16.unpack_from(data, 6 + nlen + 2 * i)[0] for i in range(count)}
        export = self.catalog.lookup(name)
        if export is None:
            self._error(opt, Rep.ERR_UNKNOWN, f"no export named {name!r}")
            return None
        flags = self._flags(export)
        self._reply(opt, Rep.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, export.size, flags))
        if Info.NAME in requests:
            self._reply(opt, Rep.INFO, wire.U16.pack(Info.NAME) + export.name.encode())
        if Info.DESCRIPTION in requests and export.description:
            self._reply(
                opt, Rep.INFO, wire.U16.pack(Info.DESCRIPTION) + export.description.encode()
            )
        # Sent even unasked (the server "MAY send info nobody asked for"), as qemu does.
        self._reply(opt, Rep.INFO, wire.INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, *export.block_size))
        self._reply(opt, Rep.ACK)
        if opt == Opt.INFO:
            return None
        return self._ready(export, flags)

    def _opt_structured_reply(self, opt: int, data: bytes) -> None:
        if data:
            self._error(opt, Rep.ERR_INVALID, "STRUCTURED_REPLY takes no data")
            return
        # A repeat is ACKed, not refused: an error could confuse clients (nbdkit 09a13daf).
        self.structured = True
        self._reply(opt, Rep.ACK)

    def _opt_meta_context(self, opt: int, data: bytes) -> None:
        setting = opt == Opt.SET_META_CONTEXT
        if setting:
            # "Each use replaces the previous selection, even when it fails."
            self.meta_contexts = {}
            self.meta_export = None
        if not self.structured:
            self._error(opt, Rep.ERR_INVALID, "negotiate structured replies first")
            return
        parsed = _parse_meta_request(data)
        if parsed is None:
            # "A malformed request MUST get ERR_INVALID"
            self._error(opt, Rep.ERR_INVALID, "malformed meta context request")
            return
        name, queries = parsed
        info = self.catalog.lookup(name)
        if info is None:
            self._error(opt, Rep.ERR_UNKNOWN, f"no export named {name!r}")
            return
        available = (BASE_ALLOCATION, *info.contexts)
        if setting:
            # Only whole names select: "base:" as a SET query is ignored, and unknown
            # leaves and namespaces too.
            selected = [c for c in available if c in queries]
        else:
            # Zero queries list everything; "namespace:" (or "qemu:dirty-bitmap:") is a
            # wildcard for LIST.
            selected = [
                c
                for c in available
                if not queries
                or any(q == c or (q.endswith(":") and c.startswith(q)) for q in queries)
            ]
        for c in selected:
            ctx_id = info.context_id(c) if setting else 0
            self._reply(opt, Rep.META_CONTEXT, wire.U32.pack(ctx_id) + c.encode())
        if setting and selected:
            self.meta_contexts = {info.context_id(c): c for c in selected}
            self.meta_export = name
        self._reply(opt, Rep.ACK)

    def _decode_name(self, raw: bytes) -> str | None:
        if len(raw) > MAX_STRING:
            return None
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return None if "\0" in name else name

    def _flags(self, export: ExportInfo) -> TransmissionFlag:
        flags = export.flags | TransmissionFlag.HAS_FLAGS
        if self.structured:
            # "SEND_DF ... MUST be clear when structured replies were not negotiated"
            flags |= TransmissionFlag.SEND_DF
        return flags

    def _ready(self, export: ExportInfo, flags: TransmissionFlag) -> Ready:
        self._state = _State.DONE
        # Contexts count only if they were set for this export (the empty name is an
        # alias of the default export, so compare what the names resolve to).
        contexts: dict[int, str] = {}
        if self.meta_export is not None and self.catalog.lookup(self.meta_export) == export:
            contexts = dict(self.meta_contexts)
        return Ready(export, flags, self.structured, contexts)


def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    """Parse (u32 len, export name, u32 count, count x (u32 len, query))."""
    try:
        (nlen,) = wire.U32.unpack_from(data, 0)
        if nlen > MAX_STRING:
            return None
        name = data[4 : 4 + nlen].decode()
        if len(name.encode()) != nlen:
            return None
        pos = 4 + nlen
        (count,) = wire.U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            (qlen,) = wire.U32.unpack_from(data, pos)
            pos += 4
            if qlen > MAX_STRING or pos + qlen > len(data):
                return None
            queries.append(data[pos : pos + qlen].decode())
            pos += qlen
        if pos != len(data):
            return None
        return name, queries
    except (struct.error, UnicodeDecodeError):
        return None


_HANDLERS: dict[int, Callable[[Handshake, int, bytes], Event | None]] = {
    Opt.EXPORT_NAME: Handshake._opt_export_name,
    Opt.ABORT: Handshake._opt_abort,
    Opt.LIST: Handshake._opt_list,
    Opt.STARTTLS: Handshake._opt_starttls,
    Opt.INFO: Handshake._opt_info_go,
    Opt.GO: Handshake._opt_info_go,
    Opt.STRUCTURED_REPLY: Handshake._opt_structured_reply,
    Opt.LIST_META_CONTEXT: Handshake._opt_meta_context,
    Opt.SET_META_CONTEXT: Handshake._opt_meta_context,
}
