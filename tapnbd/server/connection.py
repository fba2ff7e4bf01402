"""One NBD connection: a thin asyncio shell around the sans-I/O codec.

Bytes go into ``Handshake`` and then ``RequestDecoder``; each request is checked for
NBD-level rules (flags, sizes, negotiated features) and handed to the export's Backend,
which checks ranges and capabilities. Requests run concurrently and reply in any order,
matched by cookie. Each reply is written with a single ``write``/``writelines`` call from
the loop thread, so replies are never interleaved. Big READs on a plain file (raw) go to
two I/O threads per connection instead (tapnbd.server.iothreads); from then on every
reply leaves through the connection's ``Wire``, which writes whole replies one at a time.

A request is started eagerly (tapnbd.runtime.eager_start): when the Backend answers
without waiting, as it does for page-cache hits and RAM, the reply is written before
the next request is even decoded, with no task created.

Memory is bounded whatever the client does (issue 11). Before a request is decoded it
is admitted (``_admit``): it counts as in flight, fast path included, and its payload
(a READ's reply data, a WRITE's payload) is charged to this connection and to the
server's ``PayloadBudget`` until its reply is handed to the transport. A connection
stops decoding, and so stops reading from its socket, while

- MAX_IN_FLIGHT requests are in flight, or MAX_CONN_PAYLOAD bytes of payload;
- the server's budget is spent (it waits to be woken);
- its reply backlog (what the transport holds, BACKLOG_HIGH at most before the
  transport calls ``pause_writing``) is over the bound: a client that does not read
  its replies gets no more of them built.

So one connection holds at most MAX_CONN_PAYLOAD in flight plus one backlog, which is
BACKLOG_HIGH plus the replies of what was in flight when it filled up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections import deque
from typing import TYPE_CHECKING, cast

from tapnbd import buffers
from tapnbd.buffers import PooledBuffer
from tapnbd.driver import MAX_PAYLOAD
from tapnbd.errors import ProtocolError, RequestError
from tapnbd.protocol.consts import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    DIRTY_BITMAP,
    Cmd,
    CmdFlag,
    TransmissionFlag,
)
from tapnbd.protocol.handshake import NEED_DATA, Abort, Handshake, Ready, StartTLS
from tapnbd.protocol.transmission import (
    SMALL_WRITE,
    Request,
    RequestDecoder,
    block_status_chunk,
    error_chunk,
    simple_reply,
)
from tapnbd.runtime import eager_start
from tapnbd.server import iothreads, pipewriter, splice
from tapnbd.server.budget import PayloadBudget
from tapnbd.server.iothreads import (
    QUEUED,
    SHARED_THREADS,
    THREAD_MIN,
    THREADS,
    Done,
    IOThreads,
    Job,
    Wire,
)
from tapnbd.server.pipewriter import PipeJob, PipeWriter
from tapnbd.server.poll import Poller
from tapnbd.server.replies import flatten, read_parts, zero_parts
from tapnbd.server.splice import Arriving, PayloadPipe
from tapnbd.stats import now

if TYPE_CHECKING:
    from tapnbd.backend import Backend
    from tapnbd.server.exports import Export
    from tapnbd.server.listener import NBDServer

log = logging.getLogger("tapnbd.server")

#: Requests in flight per connection before we stop reading from the socket.
MAX_IN_FLIGHT = 64
#: Payload bytes in flight per connection (reads being built, writes being received).
MAX_CONN_PAYLOAD = 64 << 20
#: Reply bytes queued in the transport above which we stop decoding (its high-water
#: mark); decoding resumes below a quarter of it.
BACKLOG_HIGH = 4 << 20
#: Corked replies are written once they add up to this much.
UNCORK_AT = 128 * 1024
#: Reads at least this big ask the driver's extents first: a hole is then answered
#: from the shared zeros (or as one OFFSET_HOLE chunk) without reading or allocating.
HOLE_PROBE_MIN = 128 * 1024
#: "SHOULD stay <= 2^20 extents per chunk" (CVE-2025-47711/47712 were about this).
MAX_EXTENTS = 1 << 20
#: Seconds a shutting-down server keeps reading, to answer requests with ESHUTDOWN.
DRAIN_GRACE = 0.25
#: Seconds a shutting-down server waits for a client that reads none of its replies
#: (no byte written to its socket meanwhile) before it drops the connection.
DRAIN_STALL = 2.0
#: SO_SNDBUF for connections with I/O threads (0: the kernel's autotuning, which
#: stays smaller): a thread's 1 MiB reply then fits while the other is sent. Measured
#: (README, "I/O threads"); TAPNBD_SNDBUF overrides it, to measure again.
SNDBUF = int(os.environ.get("TAPNBD_SNDBUF", str(4 << 20)))
#: Pieces in one writev (Linux's IOV_MAX is 1024).
_MAX_IOV = 1024
#: WRITEs this big, with no flags, go from the socket to the file by splice(2) through a
#: pipe of the connection's (tapnbd.server.splice), if the driver writes one file
#: (Driver.splices: raw) and none of the payload came in with the header: at once when
#: it is all queued in the socket, else, on a unix socket, in parts as it arrives
#: (splice.Arriving). Never for a TCP client on this host (splice.same_host).
#: TAPNBD_SPLICE=0 turns it off, to measure again.
SPLICE_MIN = 128 * 1024
_SPLICE = os.environ.get("TAPNBD_SPLICE", "1") != "0"


# A plain int: ~ on an IntFlag keeps only known bits, which would hide unknown ones.
_KNOWN_FLAGS = int(CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.DF | CmdFlag.REQ_ONE | CmdFlag.FAST_ZERO)
_WRITES = (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
_WRITE = int(Cmd.WRITE)  # READ is 0, WRITE 1: "typ <= _WRITE" is "a READ or a WRITE"
_NOT_DF = _KNOWN_FLAGS & ~int(CmdFlag.DF)


def _payload_cost(typ: int, length: int) -> int:
    """Payload bytes a request holds: its READ data or its WRITE payload.

    Written out inline in ``_admit``, the hot path; keep them the same. (``_admit``
    charges a READ for the I/O threads later, in ``_pump``: never a WRITE, which is
    all ``_drop_taken`` asks about.)
    """
    if typ <= _WRITE and length <= MAX_PAYLOAD:
        return length
    return 0  # refused (EINVAL) or, for a WRITE, drained without being kept


class NBDConnection(asyncio.BufferedProtocol):
    """Server side of one client connection."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.handshake = Handshake(
            server.registry, tls=server.tls_mode, shutting_down=lambda: server.shutting_down
        )
        self.decoder: RequestDecoder | None = None
        self.export: Export | None = None
        self.backend: Backend | None = None
        self.flags = TransmissionFlag(0)
        self.structured = False
        self.context_id = 0  # the first selected context's id, 0 when none was
        self.contexts: list[tuple[int, str]] = []  # (id, name) of each selected context
        self.in_flight = 0  # admitted requests, fast path included
        self.payload = 0  # payload bytes those hold (see PayloadBudget)
        self.budget: PayloadBudget = server.budget
        self.closing = False  # DISC received or server shutting down: read no more
        self.peer = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._read_paused = False
        self._write_paused = False
        self._blocked = False  # decoding stopped at a bound (see _admit)
        self._processing = False
        self._cork: list[bytes | bytearray | memoryview] | None = None
        self._cork_bytes = 0
        self._hs_buf = memoryview(bytearray(65536))
        self._fd = -1
        self._pipe = PayloadPipe()  # for spliced WRITEs; no descriptors until the first
        self.spliced = 0  # WRITEs served by splice (tests look)
        # A spliced WRITE whose payload is still arriving. The transport's reading is
        # paused meanwhile; the loop watches a dup of the socket (_payload_fd) instead.
        self._arriving: Arriving | None = None
        self._payload_fd = -1
        self._unix = False  # a unix socket: payloads are spliced as they arrive
        # The writer thread (tapnbd.server.pipewriter): the image's descriptor when this
        # connection may use one, and the pipes of the payloads it has or may have next.
        self._write_fd = -1
        self._writer: PipeWriter | None = None
        self._spare_pipes: list[PayloadPipe] = []
        self._pipes_out = 0
        self._local_tcp = False  # TCP from this host: never spliced (splice.same_host)
        self._idle: asyncio.Future[None] | None = None  # set by drain() to wait for idleness
        # I/O threads (tapnbd.server.iothreads): the image's descriptor when this
        # connection may use them, and, once it does, the socket they share.
        self._read_fd = -1
        self._wire: Wire | None = None
        self._iot: IOThreads | None = None
        self._waiting: deque[Job] = deque()  # READs for the threads, not charged yet
        self._charged = 0  # what _admit charged for the request the decoder returns next
        # serve --poll-us: wait for the next request before the loop sleeps (poll.py).
        self._poller = Poller(server.poll_ns) if server.poll_ns else None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack the same.
        transport = cast("asyncio.Transport", transport)
        self.transport = transport
        self.peer = str(transport.get_extra_info("peername") or "unix")
        if not self.server.admit(self):
            log.warning(
                "refusing %s: %d connections already", self.peer, self.server.max_connections
            )
            transport.close()
            return
        transport.set_write_buffer_limits(high=BACKLOG_HIGH)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock is not None:
            self._fd = sock.fileno()  # for _send_lent; -1 again once TLS wraps the stream
            self._unix = sock.family == socket.AF_UNIX
            if not self._unix:
                with contextlib.suppress(OSError, ValueError):
                    self._local_tcp = splice.same_host(sock.getsockname()[0], sock.getpeername()[0])
        transport.write(self.handshake.greeting())
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.server.handshake_timeout, self._handshake_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.closing = True
        self.budget.forget(self._unblock)
        self._drop_taken()
        self.budget.forget(self._pump)
        if self._iot is not None:
            self._iot.stop()  # jobs still queued report back, and release their charge
            while self._waiting:
                job = self._waiting.popleft()
                if self.backend is not None:
                    self.backend.stats.abandon()
                self._request_done(job.charged)
        self._pipe.close()
        if self._writer is not None:
            self._writer.stop()  # what it has is written, and reported to _written
        for pipe in self._spare_pipes:
            pipe.close()
        self._spare_pipes.clear()
        if self._payload_fd >= 0:
            os.close(self._payload_fd)
            self._payload_fd = -1
        if self._poller is not None:
            log.debug("%s: %d requests came while polling", self.peer, self._poller.caught)
        if self.export is not None:
            self.export.connections -= 1
            self.export.backend.stats.connections -= 1
            self.export = None
        self.server.forget(self)

    # A BufferedProtocol: the loop receives into the buffer we hand out, so a big WRITE
    # payload lands in its own buffer without a copy (see RequestDecoder).

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.decoder is not None:
            return self.decoder.get_buffer(sizehint)
        return self._hs_buf

    def buffer_updated(self, nbytes: int) -> None:
        if self.decoder is not None:
            poller = self._poller
            if poller is not None:
                poller.woken()
            self.decoder.buffer_updated(nbytes)
            self._process()
            # Nothing left to do for this client: the loop would sleep until its next
            # request. Not while a payload arrives, nor over TLS (no _fd), nor while
            # the server has other clients (poll.py).
            if (
                poller is not None
                and self.in_flight == 0
                and self._fd >= 0
                and self._arriving is None
                and not self.closing
                and len(self.server.connections) == 1
            ):
                poller.wait(self._fd)
        else:
            self._negotiate(bytes(self._hs_buf[:nbytes]))

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._unblock()

    # Handshake

    def _negotiate(self, data: bytes) -> None:
        hs = self.handshake
        assert self.transport is not None
        try:
            hs.receive_data(data)
            while True:
                event = hs.next_event()
                out = hs.data_to_send()
                if out:
                    self.transport.write(out)
                if event is NEED_DATA:
                    return
                if isinstance(event, Abort):
                    self.transport.close()
                    return
                if isinstance(event, StartTLS):
                    self._start_tls()
                    return
                if isinstance(event, Ready):
                    self._enter_transmission(event, hs.leftover())
                    return
        except ProtocolError as e:
            log.info("%s: dropped during handshake: %s", self.peer, e)
            # Replies to the options before the offending one still go out; the
            # handshake timer aborts the connection if the client never reads them.
            self.transport.write(hs.data_to_send())
            self.transport.close()

    def drop(self) -> None:
        """Abort the connection (an unfinished handshake, to make room for another)."""
        if self.transport is not None:
            self.transport.abort()

    def _handshake_timeout(self) -> None:
        if self.decoder is None and self.transport is not None:
            log.info("%s: handshake timed out", self.peer)
            self.transport.abort()

    def _start_tls(self) -> None:
        assert self.transport is not None and self.server.ssl_context is not None
        # Stop reading now: the ClientHello must reach the TLS layer, not the handshake.
        self.transport.pause_reading()
        self._fd = -1  # from now on every byte must go through TLS
        eager_start(self._upgrade())

    async def _upgrade(self) -> None:
        assert self.transport is not None and self.server.ssl_context is not None
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                self.transport,
                self,
                self.server.ssl_context,
                server_side=True,
                ssl_handshake_timeout=self.server.handshake_timeout,
            )
        except Exception as e:
            log.info("%s: TLS handshake failed: %s", self.peer, e)
            self.transport.abort()
            return
        if tls is None:
            return
        tls.set_write_buffer_limits(high=BACKLOG_HIGH)  # the same backlog bound as before
        self.transport = tls
        self.handshake.tls_started()

    def _enter_transmission(self, ready: Ready, leftover: bytes) -> None:
        export = self.server.registry.get(ready.export.name)
        assert self.transport is not None
        if export is None:  # removed while we were negotiating
            self.transport.abort()
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.server.handshake_done(self)
        self.export = export
        self.backend = export.backend
        export.connections += 1
        export.backend.stats.connections += 1
        self.flags = ready.flags
        self.structured = ready.structured
        self.contexts = sorted(ready.meta_contexts.items())
        self.context_id = self.contexts[0][0] if self.contexts else 0
        self.decoder = RequestDecoder(admit=self._admit)
        if (
            self._fd >= 0
            and _SPLICE
            and not self._local_tcp
            and export.backend.driver.splices
            and not export.backend.read_only
        ):
            self.decoder.divert = self._splice_write
            if self._unix and pipewriter.ENABLED:
                self._write_fd = export.backend.driver.write_fd()
        if self._fd >= 0 and export.backend.driver.parallel and iothreads.ENABLED:
            # (TLS keeps the inline path: every byte must go through the SSL object.)
            self._read_fd = export.backend.driver.read_fd()
        log.debug("%s: transmission on %r", self.peer, export.name)
        if leftover:
            self.decoder.feed(leftover)
            self._process()

    # Transmission

    def _process(self) -> None:
        decoder, backend = self.decoder, self.backend
        assert decoder is not None and self.transport is not None and backend is not None
        # Requests served at once are counted for the batch: one clock read at each end
        # (Stats.begin, written out: a client at queue depth 1 pays it per request).
        stats = backend.stats
        t0 = now() if stats.enabled else 0
        # Replies of requests that complete right away are corked and go out in one
        # writelines call: one system call per batch of pipelined requests, not per reply.
        cork: list[bytes | bytearray | memoryview] = []
        self._cork, self._cork_bytes = cork, 0
        self._processing, self._blocked = True, False
        budget, server = self.budget, self.server
        try:
            while not self.closing:
                # The fast lane: a small plain WRITE, written and answered here and now.
                # With room for it, admitting it (in flight, payload charged) and
                # releasing it at once would change nothing, so neither is done.
                if (
                    backend.writes_inline
                    and not self._write_paused
                    and self.in_flight < MAX_IN_FLIGHT
                    and self.payload + SMALL_WRITE <= MAX_CONN_PAYLOAD
                    and budget.used + SMALL_WRITE <= budget.limit
                    and not server.shutting_down
                    and (small := decoder.next_small_write()) is not None
                ):
                    cookie, offset, data = small
                    if backend.try_pwrite(offset, data):
                        self._write(simple_reply(cookie))
                        continue
                    # Not now (or an error to report): the usual way, admitted as usual.
                    admitted = self._admit(_WRITE, len(data))
                    assert admitted  # there was room
                    self._dispatch(
                        Request(0, _WRITE, cookie, offset, len(data), data), self._charged
                    )
                    continue
                # None: more bytes needed, or _admit refused the next request.
                req = decoder.next_request()
                if req is None:
                    break
                self._dispatch(req, self._charged)
        except ProtocolError as e:
            log.info("%s: dropped: %s", self.peer, e)
            self.closing = True
            self.transport.abort()
            return
        finally:
            self._processing = False
            cork, self._cork = self._cork or [], None
            if cork:
                self._write_now(cork)
            stats.settle(t0)  # after the replies: their latency includes handing them over
        self._update_reading()

    def _admit(self, typ: int, length: int) -> bool:
        """The decoder asks before it takes a request (before a WRITE's payload buffer
        exists): count it as in flight and charge its payload, or stop decoding.

        The small-write lane in _process skips this only when every bound here would
        let a SMALL_WRITE through: a new bound here must be checked there too.
        """
        if self._write_paused or self.in_flight >= MAX_IN_FLIGHT:
            return self._hold("reply backlog" if self._write_paused else "requests in flight")
        self._charged = 0
        if typ <= _WRITE and length <= MAX_PAYLOAD:  # _payload_cost, inline
            if typ == 0 and length >= THREAD_MIN and self._iot is not None:
                # The I/O threads' READs are charged when a thread takes them (_pump):
                # one queued behind a client that does not read holds no memory.
                self.in_flight += 1
                return True
            if self.payload and self.payload + length > MAX_CONN_PAYLOAD:
                return self._hold("connection's payload in flight")
            if not self.budget.take(length):
                self.budget.wait(self._unblock)
                return self._hold("server's payload budget")
            self.payload += length
            self._charged = length
        self.in_flight += 1
        return True

    def _hold(self, why: str) -> bool:
        log.debug("%s: decoding paused: %s", self.peer, why)
        self._blocked = True
        return False

    def _drop_taken(self) -> None:
        """We read no more: a WRITE admitted but still being received is never served."""
        taken = self.decoder.drop_taken() if self.decoder is not None else None
        if taken is not None:
            self._release(_payload_cost(taken.type, taken.length))
        arriving = self._end_arriving()
        if arriving is not None:
            arriving.pipe.drain()
            self._pipe_back(arriving.pipe)
            if arriving.buf is not None:
                buffers.give(arriving.buf)
            if self.backend is not None:
                self.backend.stats.abandon()
            self._release(arriving.cost)

    def _release(self, cost: int) -> None:
        self.in_flight -= 1
        if cost:
            self.payload -= cost
            self.budget.give(cost)

    def _unblock(self) -> None:
        """A bound was lifted: decode what is buffered, and read again if we can."""
        if self._processing:
            return  # the loop in _process is running and looks again itself
        if self._blocked and self.decoder is not None and not self.closing:
            self._process()
        else:
            self._update_reading()

    def _dispatch(self, req: Request, cost: int) -> None:
        """Serve an admitted request; every path ends in _request_done(cost)."""
        if req.type == Cmd.DISC:
            # "The server finishes outstanding requests ... and closes"; no reply.
            self.closing = True
            self._request_done(cost)
            return
        err = self._validate(req)
        if err:
            self._reply_error(req, err, "")
            self._request_done(cost)
            return
        # The synchronous fast path: no coroutine when the driver can answer at once.
        backend = self.backend
        assert backend is not None
        if req.type == Cmd.READ:
            if req.length >= THREAD_MIN and self._read_fd >= 0 and self._threaded(req, cost):
                return
            if req.length < HOLE_PROBE_MIN or not backend.can_extents:
                data = backend.try_pread(req.offset, req.length)
                if data is not None:
                    self._reply_read(req, data)
                    # Inside _process and not closing: _request_done's checks are moot.
                    self._release(cost)
                    return
        elif req.type == Cmd.WRITE and not req.flags:
            assert req.payload is not None
            if backend.try_pwrite(req.offset, req.payload):
                buffers.give(req.payload)
                self._write(simple_reply(req.cookie))
                self._release(cost)
                return
        task = eager_start(self._serve(req, cost))
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _splice_write(self, req: Request) -> bool:
        """Serve a big WRITE whose payload is still in the socket, spliced through the
        connection's pipe into the file: at once if it is all queued, else as it
        arrives. False: receive it as usual."""
        backend, cost, pipe = self.backend, self._charged, self._pipe
        assert backend is not None
        length = req.length
        if req.flags or length < SPLICE_MIN or self.closing or self.server.shutting_down:
            # (The usual path answers ESHUTDOWN; _validate's other WRITE checks are of
            # flags, none here, and of a read-only export, never offered.)
            return False
        if req.offset + length > backend.size:
            # "The server SHOULD return ENOSPC" for a write past the end, and writes none
            # of it: the usual path checks the whole range before any byte goes down.
            return False
        if not pipe.open() or length > pipe.size:
            return False
        if splice.queued(self._fd) < length:
            # Not all here. A unix socket queues at most the sender's buffer (208 KiB
            # by default), so a bigger payload is never all here: it is spliced as it
            # arrives. A TCP socket's buffer grows to hold it, so only a unix socket
            # splices parts (measured on loopback, which never comes here now: see
            # splice.same_host; a remote client's parts are not measured).
            if not self._unix:
                return False
            # A client that stalls mid-payload must not hold the loop, so the loop
            # takes what comes each time the socket is readable.
            pipe, dest = self._pipe_for(req)
            self._arriving = Arriving(req, cost, backend.stats.start(), pipe, dest)
            if self._payload_fd < 0:
                log.debug("%s: a big WRITE is spliced as its payload arrives", self.peer)
                self._payload_fd = os.dup(self._fd)
            asyncio.get_running_loop().add_reader(self._payload_fd, self._payload_more)
            self._payload_more()
            return True  # _process pauses the transport (_update_reading)
        try:
            pipe.fill(self._fd, length)
        except (OSError, EOFError) as e:  # not with the bytes queued; the stream is lost
            raise ProtocolError(f"splicing a WRITE payload failed: {e}") from e
        try:
            done = backend.try_pwrite_from(pipe.read_fd, req.offset, length)
        except RequestError as e:
            pipe.drain()
            self._reply_error(req, e.errno, str(e))
            self._request_done(cost)
            return True
        if not done:  # not now (the driver is backing off): the usual path after all
            payload = pipe.take_back(length, buffers.take(length))
            self._dispatch(req._replace(payload=payload), cost)
            return True
        self.spliced += 1
        self._write(simple_reply(req.cookie))
        self._release(cost)
        return True

    def _payload_more(self) -> None:
        """The socket is readable while a spliced WRITE's payload arrives."""
        a = self._arriving
        if a is None or self.transport is None:
            return
        length = a.req.length
        n = 0
        try:
            if a.buf is None:
                n = a.pipe.fill_some(self._payload_fd, length - a.got)
                a.got += n
            else:
                a.got += splice.recv_some(self._payload_fd, a.buf[a.got - a.put :])
        except (OSError, EOFError) as e:
            log.info("%s: dropped: receiving a WRITE payload failed: %s", self.peer, e)
            # Not woken again by the same end of stream; connection_lost releases it.
            asyncio.get_running_loop().remove_reader(self._payload_fd)
            self.closing = True
            self.transport.abort()
            return
        if a.buf is None:
            if a.dest >= 0 and not n and a.got < length and splice.queued(self._payload_fd):
                a.dest = -1  # the pipe is full before the payload is in: parts, after all
            if a.dest < 0:
                self._put_part(a)
        if a.got < length:
            return
        self._end_arriving()
        if a.dest >= 0:
            self._to_writer(a)
            self._update_reading()
            return
        self._pipe_back(a.pipe)
        backend = self.backend
        assert backend is not None
        stats = backend.stats
        if a.err is not None:
            buffers.give(a.buf)
            stats.fail("write", a.err.errno, a.t0)
            self._reply_error(a.req, a.err.errno, str(a.err))
            self._request_done(a.cost)
        elif a.buf is None:
            stats.done("write", length, a.t0)
            self.spliced += 1
            self._write(simple_reply(a.req.cookie))
            self._request_done(a.cost)
        else:  # the rest, the usual way: counted there, with the parts' bytes added
            stats.abandon()
            stats.add_bytes("write", a.put, length)
            req = a.req
            rest = req._replace(offset=req.offset + a.put, length=length - a.put, payload=a.buf)
            t0 = stats.begin()
            self._dispatch(rest, a.cost)
            stats.settle(t0)
        self._update_reading()

    def _pipe_for(self, req: Request) -> tuple[PayloadPipe, int]:
        """A pipe of the WRITE's own and where its writer thread writes it, or the
        connection's pipe and -1 (the loop puts its parts)."""
        backend = self.backend
        assert backend is not None
        if self._write_fd < 0 or self._pipes_out >= pipewriter.PIPES:
            return self._pipe, -1
        dest = backend.write_at(req.offset, req.length)
        if dest < 0:
            return self._pipe, -1
        pipe = self._spare_pipes.pop() if self._spare_pipes else PayloadPipe()
        if not pipe.open() or req.length > pipe.size:
            pipe.close()
            return self._pipe, -1
        self._pipes_out += 1
        return pipe, dest

    def _pipe_back(self, pipe: PayloadPipe) -> None:
        """A pipe of _pipe_for's, empty again (the connection's own stays where it is)."""
        if pipe is self._pipe:
            return
        self._pipes_out -= 1
        if self.transport is None or self.transport.is_closing():
            pipe.close()
        else:
            self._spare_pipes.append(pipe)

    def _to_writer(self, a: Arriving) -> None:
        """The whole payload is in its pipe: the writer thread takes it from here."""
        writer = self._writer
        if writer is None:
            loop = asyncio.get_running_loop()
            writer = self._writer = PipeWriter(loop, self._write_fd, self._written)
        writer.submit(PipeJob(a.req, a.cost, a.t0, a.pipe, a.dest))

    def _written(self, jobs: list[PipeJob]) -> None:
        """The writer thread's report: answer each WRITE it wrote, or failed to."""
        backend = self.backend
        for job in jobs:
            self._pipe_back(job.pipe)
            req = job.req
            if job.err:
                if backend is not None:
                    backend.stats.fail("write", job.err, job.t0)
                self._reply_error(req, job.err, job.message)
            else:
                if backend is not None:
                    backend.stats.done("write", req.length, job.t0)
                self.spliced += 1
                self._write(simple_reply(req.cookie))
            self._request_done(job.cost)

    def _put_part(self, a: Arriving) -> None:
        """Write the whole blocks that came of ``a``'s payload (all of it once it is in)."""
        end = a.part_end()
        n = end - a.put
        if n <= 0:
            return
        backend = self.backend
        assert backend is not None
        offset = a.req.offset + a.put
        try:
            if backend.try_pwrite_from(a.pipe.read_fd, offset, n, part=True):
                a.put = end
                return
        except RequestError as e:
            # The rest is received and dropped, to keep the stream in step.
            a.err = e
            a.pipe.drain()
        rest = a.req.length - a.put
        a.buf = memoryview(buffers.take(a.req.length))[:rest]  # the pool's usual size
        if a.err is None:  # refused, not now: what the pipe holds is the rest's start
            a.pipe.take_back(a.got - a.put, a.buf)

    def _end_arriving(self) -> Arriving | None:
        """Stop watching the socket for a payload; the Arriving that was, if any."""
        a, self._arriving = self._arriving, None
        if a is not None:
            asyncio.get_running_loop().remove_reader(self._payload_fd)
        return a

    def _threaded(self, req: Request, cost: int) -> bool:
        """Queue a big READ to the I/O threads; False to serve it on the loop."""
        backend = self.backend
        assert backend is not None
        if req.offset + req.length > backend.size or req.flags & _NOT_DF:
            return False  # the loop's path gives the errors
        # Where the bytes lie in the file, looked up now, on the loop (a qcow's mapping
        # changes only on the loop); -1: not one known run, the driver's own path.
        src = backend.driver.read_at(req.offset, req.length)
        if src < 0:
            return False
        iot = self._iot
        if iot is None:
            iot = self._start_threads()
            if iot is None:
                return False
        self._waiting.append(Job(req, cost, backend.stats.start(), src))
        self._pump()
        return True

    def _pump(self) -> None:
        """Give waiting READs to free threads, charging each to the budget as it goes."""
        iot, wire, waiting = self._iot, self._wire, self._waiting
        if iot is None or wire is None:
            return
        while waiting and iot.submitted < QUEUED and not wire.stalled and not iot.stopped:
            job = waiting[0]
            if not job.charged:
                n = job.req.length
                if not self.budget.take(n):
                    self.budget.wait(self._pump)
                    return
                self.payload += n
                job.charged = n
            waiting.popleft()
            iot.submit(job)

    def _start_threads(self) -> IOThreads | None:
        """Hand the socket over to a Wire, if the transport has nothing queued."""
        cork = self._cork
        if cork:
            self._cork, self._cork_bytes = [], 0
            self._write_now(cork)  # replies before this one go first, by the transport
        transport, backend = self.transport, self.backend
        assert backend is not None
        if transport is None or transport.is_closing() or transport.get_write_buffer_size():
            return None  # bytes the transport holds would go after ours: not now
        if SNDBUF:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        log.debug("%s: big reads go to I/O threads", self.peer)
        self._wire = Wire(asyncio.get_running_loop(), self._fd, self._wire_changed)
        self._iot = IOThreads(
            self._wire,
            self._read_fd,
            structured=self.structured,
            seek_holes=backend.can_extents,
            done=self._io_done,
            threads=THREADS if len(self.server.connections) == 1 else SHARED_THREADS,
        )
        return self._iot

    def _io_done(self, done: Done) -> None:
        """An I/O thread finished a job (on the loop): count it and release its charge."""
        job = done.job
        backend = self.backend
        if self._iot is not None:
            self._iot.submitted -= 1
        if backend is not None:
            if done.err == errno.ESHUTDOWN:
                backend.stats.abandon()  # never served: the connection went away
            elif done.err:
                backend.stats.fail("read", done.err, job.t0)
                self._reply_error(job.req, done.err, done.message)
            else:
                backend.stats.done("read", job.req.length, job.t0)
        self._request_done(job.charged)
        self._pump()

    def _wire_changed(self) -> None:
        """The Wire's socket filled up or drained, or broke (on the loop)."""
        wire = self._wire
        if wire is None:
            return
        if wire.broken:
            if self.closing:
                self._request_done(0, count=False)  # a drain() waiting for the Wire ends
            if self.transport is not None:
                self.transport.abort()
            return
        if wire.stalled and self._iot is not None:
            # Jobs queued behind a full socket give their charge back until it drains.
            for job in reversed(self._iot.reclaim()):
                self.payload -= job.charged
                self.budget.give(job.charged)
                job.charged = 0
                self._waiting.appendleft(job)
        else:
            self._pump()
        limit = BACKLOG_HIGH // 4 if self._write_paused else BACKLOG_HIGH
        wire.paused = paused = wire.stalled or wire.backlog > limit
        # Look again: a thread that drained before it saw ``paused`` did not tell us.
        wire.paused = paused = paused and (wire.stalled or wire.backlog > limit)
        if paused != self._write_paused:
            # Either way decoding looks again, so a connection held at another bound
            # now says it waits for its reply backlog, as the transport path does.
            if wire.stalled:
                log.debug("%s: socket full: replies wait for the client", self.peer)
            self._write_paused = paused
            self._unblock()
        if self.closing:
            self._request_done(0, count=False)

    def _validate(self, req: Request) -> int:
        """NBD-level checks, in nbdkit's order; the Backend then checks the range."""
        flags, typ = req.flags, req.type
        backend = self.backend
        assert backend is not None
        if typ == Cmd.READ and not flags and req.length <= backend.block_size.maximum:
            return errno.ESHUTDOWN if self.server.shutting_down else 0  # the hot path
        if self.server.shutting_down:
            return errno.ESHUTDOWN
        if typ in _WRITES and backend.read_only:
            return errno.EPERM  # "Write or trim on a read-only export -> EPERM"
        if typ > Cmd.BLOCK_STATUS or flags & ~_KNOWN_FLAGS:
            return errno.EINVAL  # unknown command or flag
        if flags and (
            (flags & CmdFlag.FUA and not self.flags & TransmissionFlag.SEND_FUA)
            or (flags & CmdFlag.NO_HOLE and typ != Cmd.WRITE_ZEROES)
            or (flags & CmdFlag.DF and (typ != Cmd.READ or not self.structured))
            or (flags & CmdFlag.REQ_ONE and typ != Cmd.BLOCK_STATUS)
            or (
                flags & CmdFlag.FAST_ZERO and (typ != Cmd.WRITE_ZEROES or not backend.can_fast_zero)
            )
        ):
            return errno.EINVAL  # a flag that does not apply to the command
        if typ == Cmd.READ:
            if req.length > backend.block_size.maximum:
                return errno.EINVAL
        elif typ == Cmd.WRITE:
            if req.payload is None:  # over the payload limit; already drained
                return errno.EINVAL
        elif typ == Cmd.FLUSH:
            if req.offset or req.length:
                return errno.EINVAL  # "offset and length MUST be 0"
        elif typ == Cmd.TRIM and not backend.can_trim:
            return errno.EINVAL
        elif typ == Cmd.CACHE and req.length > backend.block_size.maximum:
            # CACHE has no payload, but is served by reading: capped like READ. "Commands
            # without payload ... may ask for more than the maximum payload. The server
            # SHOULD NOT disconnect; it MAY answer EOVERFLOW or EINVAL" (Size constraints).
            return errno.EINVAL
        elif typ == Cmd.BLOCK_STATUS and not self.context_id:
            return errno.EINVAL  # no metadata context negotiated
        return 0

    async def _serve(self, req: Request, cost: int) -> None:
        backend = self.backend
        assert backend is not None
        typ = req.type
        try:
            if typ == Cmd.READ:
                if req.length >= HOLE_PROBE_MIN and await backend.reads_as_zero(
                    req.offset, req.length
                ):
                    for header, payload in zero_parts(req, self.structured):
                        self._write(header, payload)
                    return
                data = await backend.pread(req.offset, req.length)
                self._reply_read(req, data)
                return
            fua = bool(req.flags & CmdFlag.FUA)
            if typ == Cmd.WRITE:
                assert req.payload is not None
                try:
                    await backend.pwrite(req.offset, req.payload, fua)
                finally:
                    # Drivers keep no reference to a payload once pwrite returns.
                    buffers.give(req.payload)
            elif typ == Cmd.FLUSH:
                await backend.flush()
            elif typ == Cmd.TRIM:
                await backend.trim(req.offset, req.length, fua)
            elif typ == Cmd.WRITE_ZEROES:
                await backend.zero(
                    req.offset,
                    req.length,
                    may_trim=not req.flags & CmdFlag.NO_HOLE,
                    fua=fua,
                    fast=bool(req.flags & CmdFlag.FAST_ZERO),
                )
            elif typ == Cmd.CACHE:
                await backend.cache(req.offset, req.length)
            elif typ == Cmd.BLOCK_STATUS:
                # One chunk per selected context, the last one done (replies are whole
                # here: a failure before the first write leaves only the error).
                req_one = bool(req.flags & CmdFlag.REQ_ONE)
                chunks = []
                for i, (cid, context) in enumerate(self.contexts):
                    if context == BASE_ALLOCATION:
                        extents = await backend.extents(req.offset, req.length, req_one=req_one)
                    elif context == ALLOCATION_DEPTH:
                        extents = await backend.depth_extents(
                            req.offset, req.length, req_one=req_one
                        )
                    else:
                        bitmap = context.removeprefix(DIRTY_BITMAP)
                        extents = await backend.bitmap_extents(
                            bitmap, req.offset, req.length, req_one=req_one
                        )
                    pairs = [(e.length, int(e.flags)) for e in extents[:MAX_EXTENTS]]
                    done = i == len(self.contexts) - 1
                    chunks.append(block_status_chunk(req.cookie, cid, pairs, done))
                self._write(b"".join(chunks))
                return
            self._write(simple_reply(req.cookie))
        except RequestError as e:
            self._reply_error(req, e.errno, str(e))
        except Exception:
            log.exception("%s: request %s failed", self.peer, Cmd(typ).name)
            self._reply_error(req, errno.EIO, "internal error")
        finally:
            self._request_done(cost)

    def _reply_read(self, req: Request, data: bytes | bytearray | memoryview) -> None:
        parts = read_parts(req, data, self.structured)
        if type(data) is PooledBuffer:
            self._send_lent(flatten(parts), data)
        else:
            for header, payload in parts:
                self._write(header, payload)

    def _send_lent(self, pieces: list[bytes | bytearray | memoryview], buf: PooledBuffer) -> None:
        """Send a reply whose data is a pooled buffer, then give the buffer back.

        The buffer must not stay queued in the transport, so when the transport has
        nothing queued the reply goes straight to the socket, and whatever the socket
        does not take at once is copied before it is queued.
        """
        cork = self._cork
        if cork:
            self._cork, self._cork_bytes = [], 0
            self._write_now(cork)  # replies before this one go first
        transport = self.transport
        if transport is None or transport.is_closing():
            buffers.give(buf)
            return
        if self._wire is not None:
            self._wire_send([bytes(p) for p in pieces])  # queued: a copy, buf goes back
            del pieces[:]
            buffers.give(buf)
            return
        if self._fd < 0 or len(pieces) > _MAX_IOV or transport.get_write_buffer_size():
            # The socket is backed up: queue the reply as it is and let buf be collected,
            # rather than copy it.
            transport.writelines(pieces)
            return
        try:
            sent = os.writev(self._fd, pieces)
        except OSError:
            sent = 0  # EAGAIN; any real error, the transport meets it too
        rest: list[bytes | bytearray | memoryview] = []
        for p in pieces:
            if sent >= len(p):
                sent -= len(p)
                continue
            rest.append(bytes(p[sent:]) if sent else bytes(p))
            sent = 0
        if rest:
            transport.writelines(rest)
        del pieces[:], rest  # drop the views of buf before it goes back
        buffers.give(buf)

    def _reply_error(self, req: Request, err: int, message: str) -> None:
        log.debug(
            "%s: %s %d+%d: %s %s",
            self.peer,
            Cmd(req.type).name if req.type <= Cmd.BLOCK_STATUS else req.type,
            req.offset,
            req.length,
            errno.errorcode.get(err, err),
            message,
        )
        # "ENOTSUP only for FAST_ZERO"; "EOVERFLOW only for DF reads" (Error values).
        if (err == errno.ENOTSUP and not req.flags & CmdFlag.FAST_ZERO) or (
            err == errno.EOVERFLOW and not req.flags & CmdFlag.DF
        ):
            err = errno.EINVAL
        if self.structured and req.type in (Cmd.READ, Cmd.BLOCK_STATUS):
            # "READ MUST get a structured reply (even for an early EINVAL)"
            self._write(error_chunk(req.cookie, err, message))
        else:
            self._write(simple_reply(req.cookie, err))

    def _write(self, header: bytes, data: bytes | bytearray | memoryview | None = None) -> None:
        cork = self._cork
        if cork is not None:
            cork.append(header)
            self._cork_bytes += len(header)
            if data is not None:
                cork.append(data)
                self._cork_bytes += len(data)
            if self._cork_bytes >= UNCORK_AT:
                # Big replies go out now, so the client is not kept waiting while we
                # read the next megabytes of the batch, and the transport sees the
                # backlog (pause_writing) before we decode more.
                self._cork, self._cork_bytes = [], 0
                self._write_now(cork)
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._wire is not None:
            self._wire_send([header] if data is None else [header, data])
        elif data is None:
            transport.write(header)
        elif len(data) <= 16384:
            transport.write(header + data)
        else:
            transport.writelines((header, data))

    def _write_now(self, bufs: list[bytes | bytearray | memoryview]) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if self._wire is not None:
                self._wire_send(bufs)
            else:
                transport.writelines(bufs)

    def _wire_send(self, parts: list[bytes | bytearray | memoryview]) -> None:
        wire = self._wire
        assert wire is not None
        wire.send(parts)
        if not self._write_paused and wire.backlog > BACKLOG_HIGH:
            self._wire_changed()

    def _request_done(self, cost: int, count: bool = True) -> None:
        if count:
            self.in_flight -= 1  # _release, inline: the hot path
        if cost:
            self.payload -= cost
            self.budget.give(cost)
        if self.in_flight == 0 and self.closing:
            if not self._wire_quiet():
                return  # the Wire writes them first, then calls _wire_changed
            if self._idle is not None and not self._idle.done():
                self._idle.set_result(None)
            self._close_when_idle()
        elif self._blocked or self._read_paused:
            self._unblock()

    def _wire_quiet(self) -> bool:
        """Nothing left to write by the Wire: no reply pending, no thread with a job."""
        wire, iot = self._wire, self._iot
        if wire is None or iot is None or wire.broken:
            return True
        wire.closing = True  # before looking (see iothreads: settle)
        return not wire.pending and not any(iot.busy)

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        want_pause = (
            self.closing
            or self._blocked
            or self._write_paused
            or self.in_flight >= MAX_IN_FLIGHT
            or self._arriving is not None  # its payload comes through _payload_fd
        )
        if want_pause and not self._read_paused:
            self._read_paused = True
            transport.pause_reading()
        elif not want_pause and self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    def _close_when_idle(self) -> None:
        if self.in_flight == 0 and self.transport is not None:
            self.transport.close()

    async def drain(self) -> None:
        """Server shutdown: answer what is already on the wire, then close.

        "On shutdown the server SHOULD wait for requests in flight and MAY answer them and
        later ones with ESHUTDOWN". For DRAIN_GRACE we keep reading and _validate answers
        every new request with ESHUTDOWN, so a client that pipelined requests before it
        learned of the shutdown (the kernel's, with no timeout, would wait for them
        forever) gets an answer; then we stop reading and wait for those in flight.
        """
        if self.decoder is not None and not self.closing:
            await asyncio.sleep(DRAIN_GRACE)
        self.closing = True
        self._update_reading()
        self._drop_taken()  # its payload will not be read: do not wait for it
        wire = self._wire
        if self.in_flight or not self._wire_quiet():
            self._idle = idle = asyncio.get_running_loop().create_future()
            if wire is None:
                await idle
            else:
                await self._wait_or_stall(idle, wire)
        if self.transport is not None:
            self.transport.close()

    @staticmethod
    async def _wait_or_stall(idle: asyncio.Future[None], wire: Wire) -> None:
        """Wait for ``idle`` while the client reads; drop it once it stops reading.

        An I/O thread blocked on a full socket holds its request in flight until the
        client reads, which a hostile one never does: without a bound, shutdown would
        wait for it for ever (the transport path has no such wait: its replies leave
        the in-flight count when they are queued).
        """
        written = -1
        while not idle.done() and not wire.broken:
            if written == wire.written:
                wire.kill()  # the blocked threads' sends fail; their requests finish
            written = wire.written
            await asyncio.wait([idle], timeout=DRAIN_STALL)
