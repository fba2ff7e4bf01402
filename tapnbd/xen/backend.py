"""The blkif backend: serve one vbd's shared ring over a tapnbd Backend.

This is blkback's (and the 2007 kernel blktap's) job, done in userspace over the same
Backend the NBD server uses, so both front ends share validation, capabilities and
statistics, and neither calls a driver directly.

Lifecycle (``BlkifServer.run``), following the 2007 Linux drivers' xenbus dance:

1. As the toolstack, create the backend and frontend directories in Initialising.
2. As blkback's probe, write the ``feature-*`` keys and go to InitWait.
3. When the frontend is Initialised, read ``ring-ref``, ``event-channel`` and
   ``protocol``, map the ring through the grant table, bind the event channel, write
   ``sectors``, ``sector-size`` and ``info``, and go to Connected.
4. Serve (``RingConnection``) until the frontend goes to Closing, or its event channel
   closes because it died. Then stop taking requests, let those in flight finish, unmap,
   and go to Closing and Closed.
5. When a frontend is back in Initialising, go to InitWait for the reconnect (or, with
   ``once``, exit).

Serving follows blkback's ``do_block_io_op``/``make_response``: consume every published
request (copying each slot before checking it), answer each as it completes with
RING_PUSH_RESPONSES_AND_CHECK_NOTIFY, and arm ``req_event`` with
RING_FINAL_CHECK_FOR_REQUESTS only when the ring is drained. Requests run concurrently
and are started eagerly, so a page-cache hit is answered without creating a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from tapnbd import buffers
from tapnbd.errors import RequestError
from tapnbd.runtime import eager_start
from tapnbd.xen.blkif import (
    DISCARD_SECURE,
    ENTRY_SIZE,
    FEATURE_INDIRECT,
    FEATURE_KEYS,
    MAX_INDIRECT_SEGMENTS,
    PROTOCOL,
    RESPONSE,
    SECTOR_SIZE,
    SEGMENT,
    SEGMENTS_PER_INDIRECT_PAGE,
    BadRequest,
    DiscardRequest,
    IndirectRequest,
    Op,
    Request,
    Status,
    VdiskInfo,
    parse_indirect,
    parse_request,
    request_id,
)
from tapnbd.xen.evtchn import EventChannel, EventChannelClosed, bind_interdomain
from tapnbd.xen.grant import GrantError, GrantMapper, table_path
from tapnbd.xen.ring import U32, BackRing, SharedRing
from tapnbd.xen.xenstore import XenbusState, XenStore, backend_dir, frontend_dir, state_of

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from pathlib import Path
    from typing import Any

    from tapnbd.backend import Backend

log = logging.getLogger("tapnbd.xen")

#: The guest's domain id and its first disk, xvda = (202 << 8) | 0.
DEFAULT_DOMID = 1
DEFAULT_DEVID = 51712
#: How often the backend looks at the frontend's state while connected. The event
#: channel reports a death at once; this only paces noticing a polite Closing.
WATCH_INTERVAL = 0.02
#: How long in-flight requests may take to finish once the frontend has gone.
DRAIN_TIMEOUT = 10.0


class ConnectError(Exception):
    """The frontend's ring, grants or event channel could not be set up."""


@dataclass(slots=True)
class RingStats:
    """Counters in blkback's sysfs names (``vbd-<dom>-<dev>/statistics``), plus ours."""

    rd_req: int = 0
    wr_req: int = 0
    br_req: int = 0  # write barriers
    f_req: int = 0  # cache flushes
    ds_req: int = 0  # discards
    oo_req: int = 0  # times consumption stopped for a full response ring or a barrier
    rd_sect: int = 0
    wr_sect: int = 0
    bad_req: int = 0  # answered without I/O: malformed, not offered
    err_req: int = 0  # failed in the Backend or the grant table
    events_in: int = 0  # event-channel upcalls consumed
    notify_out: int = 0  # notifications sent to the frontend
    connections: int = 0

    def snapshot(self) -> dict[str, int]:
        return asdict(self)


class RingConnection:
    """One connected frontend: its ring, grant mapping and event channel."""

    def __init__(
        self,
        backend: Backend,
        ring: BackRing,
        grants: GrantMapper,
        evtchn: EventChannel,
        stats: RingStats,
    ) -> None:
        self.backend = backend
        self.ring = ring
        self.grants = grants
        self.evtchn = evtchn
        self.stats = stats
        self.sectors = backend.size // SECTOR_SIZE
        self.can_flush = backend.can_flush
        self.can_discard = backend.can_trim
        self.max_indirect = MAX_INDIRECT_SEGMENTS
        #: Set when the frontend is gone: event channel closed, or its ring is bogus.
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self._consuming = True
        self._unmapped = False
        self._barrier = False
        self._kicking = False
        self._kick_handle: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        self._loop.add_reader(self.evtchn.fileno(), self._on_event)
        self._kick()  # requests pushed before we bound would otherwise wait for a kick

    # Event channel.

    def _on_event(self) -> None:
        if not self.evtchn.consume():
            self._lose("event channel closed: the frontend has gone")
            return
        self.stats.events_in += 1
        self._kick()

    def _notify(self) -> None:
        try:
            self.evtchn.notify()
        except EventChannelClosed:
            self._lose("event channel closed: the frontend has gone")
            return
        self.stats.notify_out += 1

    def _lose(self, reason: str) -> None:
        if self.lost.is_set():
            return
        log.warning("frontend lost: %s", reason)
        self.lost_reason = reason
        self._consuming = False
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.evtchn.fileno())
        self.lost.set()

    # Consuming requests (blkback do_block_io_op).

    def _schedule_kick(self) -> None:
        if self._kick_handle is None and not self._kicking:
            self._kick_handle = self._loop.call_soon(self._kick)

    def _kick(self) -> None:
        self._kick_handle = None
        if not self._consuming or self._barrier:
            return
        ring = self.ring
        sring = ring.sring
        buf = sring.buf
        self._kicking = True
        try:
            while True:
                rc = ring.req_cons
                rp = sring.req_prod
                if ring.request_prod_overflow(rp):
                    # "Frontend provided bogus ring requests ... Halting ring processing"
                    self._lose(
                        f"bogus ring: req_prod {rp} is more than a ring ahead of "
                        f"rsp_prod {ring.rsp_prod_pvt}"
                    )
                    return
                while rc != rp:
                    if ring.request_cons_overflow(rc):
                        self.stats.oo_req += 1
                        break
                    off = sring.offset(rc)
                    # A private copy: the frontend may rewrite the slot while we look.
                    raw = bytes(buf[off : off + ENTRY_SIZE])
                    rc = (rc + 1) & U32
                    ring.req_cons = rc
                    self._dispatch(raw)
                    if self._barrier or not self._consuming:
                        # A barrier holds back later requests until it is done.
                        if self._barrier:
                            self.stats.oo_req += 1
                        return
                if not ring.final_check_for_requests():
                    return
        finally:
            self._kicking = False

    def _dispatch(self, raw: bytes) -> None:
        try:
            req = parse_request(
                raw,
                sectors=self.sectors,
                nr_grefs=self.grants.nr_grefs,
                max_indirect=self.max_indirect,
            )
            if isinstance(req, IndirectRequest):
                req = self._resolve_indirect(req)
        except BadRequest as e:
            self.stats.bad_req += 1
            log.warning("bad request id %d op %d: %s", e.id, e.operation, e.reason)
            self._respond(e.id, e.operation, e.status)
            return
        except GrantError as e:
            # An indirect page we cannot map: answered like a bad data page.
            self.stats.err_req += 1
            log.warning("request id %d: %s", request_id(raw), e)
            self._respond(request_id(raw), raw[1], Status.ERROR)
            return
        op = req.operation
        if op is Op.READ or op is Op.WRITE:
            # The synchronous fast path (NBDConnection._dispatch does the same): a
            # page-cache hit goes straight between the granted pages and the driver.
            assert isinstance(req, Request)
            try:
                # Map before the I/O, as blkback does, so a bad grant costs no I/O. Data
                # pages of a write are granted read-only (blkfront: rq_data_dir).
                views = self.grants.map_segments(req.segments, readonly=op is Op.WRITE)
            except GrantError as e:
                self.stats.err_req += 1
                log.warning("request id %d: %s", req.id, e)
                self._respond(req.id, op, Status.ERROR)
                return
            offset = req.sector_number * SECTOR_SIZE
            length = req.nr_sectors * SECTOR_SIZE
            stats = self.stats
            if op is Op.READ:
                stats.rd_req += 1
                stats.rd_sect += req.nr_sectors
                if self.backend.try_preadv(offset, length, views):
                    self._respond(req.id, op, Status.OKAY)
                    return
            else:
                stats.wr_req += 1
                stats.wr_sect += req.nr_sectors
                if self.backend.try_pwritev(offset, length, views):
                    self._respond(req.id, op, Status.OKAY)
                    return
            coro: Coroutine[Any, Any, None] = self._serve(req, None, views)
        elif op is Op.WRITE_BARRIER:
            self._barrier = True
            coro = self._serve(req, list(self._tasks), None)
        else:
            coro = self._serve(req, None, None)
        task = eager_start(coro)
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _resolve_indirect(self, ireq: IndirectRequest) -> Request:
        """Map the indirect pages and read the segment array out of them (a private copy)."""
        nseg = ireq.nr_segments
        parts = []
        for i, gref in enumerate(ireq.indirect_grefs):
            # blkback maps indirect pages read-only: it only reads the descriptors.
            page = self.grants.map(gref, readonly=True)
            n = min(nseg - i * SEGMENTS_PER_INDIRECT_PAGE, SEGMENTS_PER_INDIRECT_PAGE)
            parts.append(page[: n * SEGMENT.size])
        return parse_indirect(
            ireq, b"".join(parts), sectors=self.sectors, nr_grefs=self.grants.nr_grefs
        )

    # Serving one request that may wait.

    async def _serve(
        self,
        req: Request | DiscardRequest,
        before: list[asyncio.Task[None]] | None,
        views: list[memoryview] | None,
    ) -> None:
        status = Status.OKAY
        try:
            if isinstance(req, DiscardRequest):
                await self._discard(req)
            elif before is not None:
                await self._write_barrier(req, before)
            elif views is not None:
                await self._rw(req, views)
            else:
                await self._flush(req)
        except BadRequest as e:
            self.stats.bad_req += 1
            log.debug("request id %d: %s", req.id, e.reason)
            status = e.status
        except GrantError as e:
            self.stats.err_req += 1
            log.warning("request id %d: %s", req.id, e)
            status = Status.ERROR
        except RequestError as e:
            self.stats.err_req += 1
            log.debug("request id %d failed: %s", req.id, e)
            status = Status.EOPNOTSUPP if e.errno == errno.ENOTSUP else Status.ERROR
        except Exception:
            self.stats.err_req += 1
            log.exception("request id %d failed", req.id)
            status = Status.ERROR
        finally:
            if before is not None:
                self._barrier = False
                self._schedule_kick()
        self._respond(req.id, req.operation, status)

    async def _rw(self, req: Request, views: list[memoryview]) -> None:
        """READ or WRITE that the fast path could not do: through the async Backend."""
        offset = req.sector_number * SECTOR_SIZE
        length = req.nr_sectors * SECTOR_SIZE
        if req.operation is Op.READ:
            data = await self.backend.pread(offset, length)
            src = memoryview(data)
            pos = 0
            for view in views:
                n = len(view)
                view[:] = src[pos : pos + n]
                pos += n
            buffers.give(data)
            return
        await self.backend.pwrite(offset, views[0] if len(views) == 1 else b"".join(views))

    async def _flush(self, req: Request) -> None:
        # Linux blkback: FLUSH_DISKCACHE is REQ_PREFLUSH, then the data if any.
        self.stats.f_req += 1
        if not self.can_flush:
            raise BadRequest(req.id, req.operation, Status.EOPNOTSUPP, "feature-flush-cache is 0")
        await self.backend.flush()
        if req.segments:
            await self._write(req, fua=False)

    async def _write_barrier(self, req: Request, before: list[asyncio.Task[None]]) -> None:
        """BLKIF_OP_WRITE_BARRIER: after everything before it, before everything after.

        Earlier requests are drained (blkback's xen_blk_drain_io), later ones are not
        consumed until this completes, and the data goes down as PREFLUSH|FUA.
        """
        self.stats.br_req += 1
        if not self.can_flush:
            raise BadRequest(req.id, req.operation, Status.EOPNOTSUPP, "feature-barrier is 0")
        if before:
            await asyncio.wait(before)
        await self.backend.flush()
        if req.segments:
            await self._write(req, fua=True)

    async def _write(self, req: Request, *, fua: bool) -> None:
        self.stats.wr_req += 1
        self.stats.wr_sect += req.nr_sectors
        views = self.grants.map_segments(req.segments, readonly=True)
        data = views[0] if len(views) == 1 else b"".join(views)
        await self.backend.pwrite(req.sector_number * SECTOR_SIZE, data, fua=fua)

    async def _discard(self, req: DiscardRequest) -> None:
        self.stats.ds_req += 1
        if not self.can_discard:
            raise BadRequest(req.id, req.operation, Status.EOPNOTSUPP, "feature-discard is 0")
        if req.flag & DISCARD_SECURE:
            # blkback: a secure discard without discard-secure is -EOPNOTSUPP.
            raise BadRequest(req.id, req.operation, Status.EOPNOTSUPP, "discard-secure is 0")
        if req.nr_sectors:
            await self.backend.trim(req.sector_number * SECTOR_SIZE, req.nr_sectors * SECTOR_SIZE)

    # Answering (blkback make_response).

    def _respond(self, req_id: int, operation: int, status: int) -> None:
        if self._unmapped:
            return
        ring = self.ring
        sring = ring.sring
        RESPONSE.pack_into(sring.buf, sring.offset(ring.rsp_prod_pvt), req_id, operation, status)
        ring.rsp_prod_pvt = (ring.rsp_prod_pvt + 1) & U32
        # Pushed at once, as blkback does: a frontend that is awake on the other CPU
        # takes each response as it comes rather than waiting for the whole batch.
        notify = ring.push_responses_and_check_notify()
        if ring.rsp_prod_pvt == ring.req_cons:
            # "Tail check for pending requests. Allows frontend to avoid notifications
            # if requests are already in flight (lower overheads and promotes batching)."
            more = ring.final_check_for_requests()
        else:
            more = ring.has_unconsumed_requests()
        if more:
            self._schedule_kick()
        if notify:
            self._notify()

    # Teardown.

    async def quiesce(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Take no more requests and let those in flight finish (or cancel them)."""
        self._consuming = False
        if self._kick_handle is not None:
            self._kick_handle.cancel()
            self._kick_handle = None
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("cancelled %d requests that did not finish", len(pending))
                await asyncio.wait(pending)

    def unmap(self) -> None:
        """Forget the ring and unmap the frontend's pages."""
        self._unmapped = True
        self.grants.close()

    def unbind(self) -> None:
        """Close our end of the event channel."""
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.evtchn.fileno())
        self.evtchn.close()


class BlkifServer:
    """Serves one vbd over ``backend``, one frontend at a time, in ``directory``."""

    def __init__(
        self,
        backend: Backend,
        directory: str | Path,
        *,
        domid: int = DEFAULT_DOMID,
        devid: int = DEFAULT_DEVID,
        params: str = "",
        once: bool = False,
    ) -> None:
        self.backend = backend
        self.directory = os.fspath(directory)
        self.domid = domid
        self.devid = devid
        self.params = params
        self.once = once
        self.xs = XenStore(self.directory)
        self.be = backend_dir(domid, devid)
        self.fe = frontend_dir(domid, devid)
        self.stats = RingStats()
        self.connection: RingConnection | None = None
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()

    @property
    def state(self) -> XenbusState:
        return self.xs.state(self.be)

    def stop(self) -> None:
        """Ask ``run`` to disconnect politely and return."""
        self._stop.set()

    async def wait_ready(self) -> None:
        """Until the backend is in InitWait for the first time."""
        await self._ready.wait()

    def _switch(self, state: XenbusState) -> None:
        log.info("vbd %d/%d: backend %s", self.domid, self.devid, state.name)
        self.xs.switch_state(self.be, state)

    # The handshake.

    def _create_device(self) -> None:
        """The toolstack's part, then blkback's probe: both directories, then InitWait."""
        b = self.backend
        writable = not b.read_only
        self.xs.write_many(
            {
                f"{self.be}/frontend": self.fe,
                f"{self.be}/frontend-id": self.domid,
                f"{self.be}/params": self.params,
                f"{self.be}/type": "tap",
                f"{self.be}/mode": "w" if writable else "r",
                f"{self.be}/dev": "xvda",
                f"{self.be}/state": int(XenbusState.INITIALISING),
                f"{self.fe}/backend": self.be,
                f"{self.fe}/backend-id": 0,
                f"{self.fe}/virtual-device": self.devid,
                f"{self.fe}/device-type": "disk",
                f"{self.fe}/state": int(XenbusState.INITIALISING),
            },
            remove=[self.be, self.fe],
        )
        features = {
            Op.WRITE_BARRIER: b.can_flush and writable,
            Op.FLUSH_DISKCACHE: b.can_flush and writable,
            Op.DISCARD: b.can_trim,
        }
        keys: dict[str, str | int] = {
            f"{self.be}/{FEATURE_KEYS[op]}": int(on) for op, on in features.items()
        }
        if b.can_trim:
            keys[f"{self.be}/discard-granularity"] = b.block_size.preferred
            keys[f"{self.be}/discard-alignment"] = 0
            keys[f"{self.be}/discard-secure"] = 0
        keys[f"{self.be}/{FEATURE_INDIRECT}"] = MAX_INDIRECT_SEGMENTS
        keys[f"{self.be}/state"] = int(XenbusState.INIT_WAIT)
        self.xs.write_many(keys)
        log.info("vbd %d/%d: backend INIT_WAIT in %s", self.domid, self.devid, self.directory)

    def _connect(self, snap: dict[str, str]) -> RingConnection:
        """Map the frontend's ring and bind its event channel (blkback connect_ring)."""
        try:
            ring_ref = int(snap[f"{self.fe}/ring-ref"])
            port = int(snap[f"{self.fe}/event-channel"])
        except (KeyError, ValueError) as e:
            raise ConnectError(f"frontend wrote no usable ring-ref/event-channel: {e}") from None
        protocol = snap.get(f"{self.fe}/protocol", PROTOCOL)
        if protocol != PROTOCOL:
            raise ConnectError(f"unsupported protocol {protocol!r}, only {PROTOCOL!r}")
        try:
            grants = GrantMapper(table_path(self.directory, self.domid), domid=0, owner=self.domid)
        except (OSError, GrantError) as e:
            raise ConnectError(f"cannot open the frontend's grant table: {e}") from None
        try:
            sring = SharedRing(grants.map(ring_ref, readonly=False))
            evtchn = bind_interdomain(self.directory, self.domid, port)
        except (GrantError, EventChannelClosed, ValueError) as e:
            grants.close()
            raise ConnectError(str(e)) from None
        # BACK_RING_INIT: our private indices start at 0, as SHARED_RING_INIT left them.
        return RingConnection(self.backend, BackRing(sring), grants, evtchn, self.stats)

    def _publish_disk(self) -> None:
        b = self.backend
        info = VdiskInfo(0) if not b.read_only else VdiskInfo.READONLY
        self.xs.write_many(
            {
                f"{self.be}/sectors": b.size // SECTOR_SIZE,
                f"{self.be}/sector-size": SECTOR_SIZE,
                f"{self.be}/info": int(info),
                f"{self.be}/state": int(XenbusState.CONNECTED),
            }
        )
        log.info("vbd %d/%d: backend CONNECTED", self.domid, self.devid)

    async def _watch(self, check: Any, wake: asyncio.Event | None = None) -> Any:
        """Poll xenstore until ``check`` answers or we are asked to stop (None)."""
        stop = self._stop

        def check_or_stop(snap: dict[str, str]) -> object | None:
            if stop.is_set():
                return False
            got: object | None = check(snap)
            return got

        got = await self.xs.wait_async(check_or_stop, interval=WATCH_INTERVAL, wake=wake)
        return None if got is False else got

    async def run(self) -> None:
        self._create_device()
        self._ready.set()
        try:
            while not self._stop.is_set():
                snap = await self._watch(
                    lambda s: s if state_of(s, self.fe) == XenbusState.INITIALISED else None
                )
                if snap is None:
                    break
                try:
                    conn = self._connect(snap)
                except ConnectError as e:
                    log.warning("vbd %d/%d: connect failed: %s", self.domid, self.devid, e)
                    self._switch(XenbusState.CLOSED)
                else:
                    await self._serve(conn)
                if self.once or not await self._await_reconnect():
                    break
        finally:
            if self.state != XenbusState.CLOSED:
                self._switch(XenbusState.CLOSED)

    async def _serve(self, conn: RingConnection) -> None:
        self.stats.connections += 1
        self.connection = conn
        conn.start()
        self._publish_disk()
        lost = conn.lost
        gone = (XenbusState.CLOSING, XenbusState.CLOSED, XenbusState.INITIALISING)

        def closing(snap: dict[str, str]) -> XenbusState | None:
            st = state_of(snap, self.fe)
            if st in gone:
                return st
            return XenbusState.UNKNOWN if lost.is_set() else None

        fe_state = await self._watch(closing, wake=lost)
        try:
            if lost.is_set():
                log.warning("vbd %d/%d: cleaning up after the frontend", self.domid, self.devid)
            await conn.quiesce()
            conn.unmap()
            self._switch(XenbusState.CLOSING)
            if fe_state is XenbusState.CLOSING and not lost.is_set():
                # The frontend finishes with Closed; its event channel closing also counts.
                await self._watch(
                    lambda s: (
                        True
                        if lost.is_set() or state_of(s, self.fe) != XenbusState.CLOSING
                        else None
                    ),
                    wake=lost,
                )
        finally:
            conn.unbind()
            self.connection = None
            self._switch(XenbusState.CLOSED)

    async def _await_reconnect(self) -> bool:
        """Closed until a frontend is Initialising again ("prepare for reconnect")."""
        got = await self._watch(
            lambda s: True if state_of(s, self.fe) == XenbusState.INITIALISING else None
        )
        if got is None:
            return False
        self._switch(XenbusState.INIT_WAIT)
        return True


async def serve_image(
    image: str,
    directory: str | Path,
    *,
    fmt: str = "auto",
    read_only: bool = False,
    once: bool = False,
    domid: int = DEFAULT_DOMID,
    devid: int = DEFAULT_DEVID,
    on_ready: Any = None,
) -> RingStats:
    """Open ``image`` and serve it as vbd ``domid``/``devid`` until SIGINT/SIGTERM."""
    from formats import open_image
    from tapnbd.backend import Backend

    os.makedirs(directory, exist_ok=True)
    driver = await open_image(image, fmt=fmt, read_only=read_only)
    backend = Backend(driver, read_only=read_only)
    server = BlkifServer(backend, directory, domid=domid, devid=devid, params=image, once=once)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.stop)
    try:
        task = asyncio.ensure_future(server.run())
        ready = asyncio.ensure_future(server.wait_ready())
        await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and on_ready is not None:
            on_ready(server)
        ready.cancel()
        await task
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await backend.close()
    return server.stats
