"""A recording relay: a unix socket in front of the server that logs the NBD wire.

The guest's connections reach the server through it, so a test can see what the kernel
client really sent (options, request types, flags and sizes) and what came back (errors,
replies left unanswered), independently of the server's own counters. Bytes are
forwarded as they arrive; the parsers only watch. The constants are the spec's
(/work/shared/spec/nbd.md), not the server's, so a wrong one there cannot hide here.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections import Counter
from collections.abc import Generator
from dataclasses import dataclass, field
from types import TracebackType

IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
OPT_EXPORT_NAME, OPT_GO = 1, 7
REP_ACK, REP_INFO = 1, 3
INFO_EXPORT = 0
CMD_NAMES = {0: "read", 1: "write", 2: "disc", 3: "flush", 4: "trim", 5: "cache", 6: "zero"}
CMD_NAMES[7] = "block_status"
FLAG_FUA = 1
TF_CAN_MULTI_CONN = 1 << 8
OPTION_NAMES = {1: "EXPORT_NAME", 3: "LIST", 6: "INFO", 7: "GO", 8: "STRUCTURED_REPLY"}

#: A parser yields how many bytes it needs next (negative: skip that many unseen) and
#: is sent them.
Parser = Generator[int, bytes, None]


@dataclass
class Conn:
    """What one connection carried."""

    options: list[str] = field(default_factory=list)
    info_requests: list[int] = field(default_factory=list)  # NBD_INFO_* asked for in GO
    export: str | None = None
    tflags: int | None = None  # transmission flags the server sent in GO's INFO_EXPORT
    requests: list[tuple[str, int, int, int]] = field(default_factory=list)  # op, flags, off, len
    errors: list[tuple[str, int]] = field(default_factory=list)  # op, errno
    structured_replies: int = 0
    simple_replies: int = 0
    pending: dict[int, tuple[str, int]] = field(default_factory=dict)  # cookie -> op, len
    problems: list[str] = field(default_factory=list)  # anything the parsers did not expect

    def count(self, op: str, *, fua: bool | None = None) -> int:
        return sum(
            1
            for o, flags, _, _ in self.requests
            if o == op and (fua is None or bool(flags & FLAG_FUA) == fua)
        )

    def lengths(self, op: str) -> list[int]:
        return [n for o, _, _, n in self.requests if o == op]


def _client(conn: Conn) -> Parser:
    yield 4  # client flags
    while True:
        magic = yield 4
        if magic == IHAVEOPT[:4]:
            if (yield 4) != IHAVEOPT[4:]:
                conn.problems.append("bad option magic")
                return
            opt, n = struct.unpack(">II", (yield 8))
            data = (yield n) if n else b""
            conn.options.append(OPTION_NAMES.get(opt, str(opt)))
            if opt == OPT_GO and len(data) >= 6:
                (namelen,) = struct.unpack_from(">I", data)
                conn.export = data[4 : 4 + namelen].decode(errors="replace")
                (ninfo,) = struct.unpack_from(">H", data, 4 + namelen)
                conn.info_requests += struct.unpack_from(f">{ninfo}H", data, 6 + namelen)
            elif opt == OPT_EXPORT_NAME:
                conn.export = data.decode(errors="replace")
            continue
        if struct.unpack(">I", magic)[0] != REQUEST_MAGIC:
            conn.problems.append(f"unexpected client bytes {magic.hex()}")
            return
        flags, typ, cookie, offset, length = struct.unpack(">HHQQI", (yield 24))
        op = CMD_NAMES.get(typ, str(typ))
        conn.requests.append((op, flags, offset, length))
        if op != "disc":
            conn.pending[cookie] = (op, length)
        if op == "write" and length:
            yield -length


def _server(conn: Conn) -> Parser:
    yield 18  # NBDMAGIC, IHAVEOPT, handshake flags
    while True:  # option replies until GO is acknowledged
        magic, opt, rtype, n = struct.unpack(">QIII", (yield 20))
        if magic != OPT_REPLY_MAGIC:
            conn.problems.append("no option reply magic (EXPORT_NAME?): not followed")
            return
        data = (yield n) if n else b""
        if rtype == REP_INFO and len(data) >= 12 and data[:2] == b"\0\0":
            conn.tflags = struct.unpack_from(">H", data, 10)[0]
        if opt == OPT_GO and rtype == REP_ACK:
            break
    while True:
        (magic,) = struct.unpack(">I", (yield 4))
        if magic == SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", (yield 12))
            conn.simple_replies += 1
            op, length = conn.pending.pop(cookie, ("?", 0))
            if err:
                conn.errors.append((op, err))
            elif op == "read" and length:
                yield -length
        elif magic == STRUCTURED_REPLY_MAGIC:
            _flags, _type, cookie, n = struct.unpack(">HHQI", (yield 16))
            conn.structured_replies += 1
            conn.pending.pop(cookie, None)  # approximate: structured replies are not expected
            if n:
                yield -n
        else:
            conn.problems.append(f"unexpected server bytes {magic:#x}")
            return


class _Watcher:
    """Feeds forwarded bytes to a parser, whatever their chunking."""

    def __init__(self, parser: Parser) -> None:
        self.parser: Parser | None = parser
        self.buf = bytearray()
        self.need = next(parser)

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while self.parser is not None and view:
            if self.need < 0:  # skip payload bytes without keeping them
                n = min(-self.need, len(view))
                view = view[n:]
                self.need += n
                if self.need == 0:
                    self._advance(b"")
                continue
            take = min(self.need - len(self.buf), len(view))
            self.buf += view[:take]
            view = view[take:]
            if len(self.buf) == self.need:
                chunk = bytes(self.buf)
                self.buf.clear()
                self._advance(chunk)

    def _advance(self, chunk: bytes) -> None:
        assert self.parser is not None
        try:
            self.need = self.parser.send(chunk)
            while self.need == 0:  # zero-length reads need no bytes
                self.need = self.parser.send(b"")
        except StopIteration:
            self.parser = None


class Relay:
    """Listen on ``path``; pass each connection on to ``upstream``, recording it."""

    def __init__(self, path: str, upstream: str) -> None:
        self.path = path
        self.upstream = upstream
        self.conns: list[Conn] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._listener.bind(path)
        self._listener.listen(16)
        self._start(self._accept)

    def _start(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return  # closed
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                up.connect(self.upstream)
            except OSError:
                down.close()  # the server is away: the client sees a refused connection
                up.close()
                continue
            conn = Conn()
            with self._lock:
                self.conns.append(conn)
            self._start(self._pump, down, up, _Watcher(_client(conn)))
            self._start(self._pump, up, down, _Watcher(_server(conn)))

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, watcher: _Watcher) -> None:
        try:
            while data := src.recv(1 << 20):
                watcher.feed(data)  # first: a request is known before its reply can come
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def by_export(self) -> dict[str, list[Conn]]:
        """Connections that reached transmission, by export name."""
        out: dict[str, list[Conn]] = {}
        with self._lock:
            for c in self.conns:
                if c.export is not None and c.tflags is not None:
                    out.setdefault(c.export, []).append(c)
        return out

    def summary(self) -> dict[str, dict[str, object]]:
        """Per export: requests by op, the largest of each, FUA uses, options, replies."""
        out: dict[str, dict[str, object]] = {}
        for name, conns in self.by_export().items():
            ops: Counter[str] = Counter(op for c in conns for op, _, _, _ in c.requests)
            out[name] = {
                "connections": len(conns),
                "options": sorted({o for c in conns for o in c.options}),
                "info_requests": sorted({i for c in conns for i in c.info_requests}),
                "requests": dict(ops),
                "max_len": {op: max(n for c in conns for n in c.lengths(op)) for op in ops},
                "fua": {
                    op: sum(c.count(op, fua=True) for c in conns)
                    for op in ops
                    if any(c.count(op, fua=True) for c in conns)
                },
                "simple_replies": sum(c.simple_replies for c in conns),
                "structured_replies": sum(c.structured_replies for c in conns),
                "errors": [e for c in conns for e in c.errors],
            }
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> Relay:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
