"""blkback's data path: one connected frontend's ring, served over a tapnbd Backend.

This is blkback's (and the 2007 kernel blktap's) request loop, done in userspace over
the same Backend the NBD server uses, so both front ends share validation,
capabilities and statistics, and neither calls a driver directly. The xenbus handshake
that sets a connection up and tears it down is ``xenbus.py``; this module only turns
ring requests into Backend calls and answers them.

Serving follows blkback's ``do_block_io_op``/``make_response``: consume every published
request (copying each slot before checking it), and arm ``req_event`` with
RING_FINAL_CHECK_FOR_REQUESTS only when the ring is drained. Requests run concurrently
and are started eagerly, so a page-cache hit is answered without creating a task. The
responses of a batch that completes while it is consumed are published together, with
one RING_PUSH_RESPONSES_AND_CHECK_NOTIFY and at most one kick, when the batch is
drained (a response that waits for I/O is pushed as it completes).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from tapnbd import buffers
from tapnbd.errors import RequestError
from tapnbd.runtime import eager_start
from tapnbd.xen.blkif import (
    DIRECT_SEGMENTS,
    DISCARD_SECURE,
    ENTRY_SIZE,
    INDIRECT_REQUEST,
    MAX_INDIRECT_SEGMENTS,
    MAX_SEGMENTS,
    REQUEST_HEADER,
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
    parse_indirect,
    parse_request,
    request_id,
)
from tapnbd.xen.evtchn import EventChannelClosed
from tapnbd.xen.grant import GrantError
from tapnbd.xen.ring import U32

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from typing import Any

    from tapnbd.backend import Backend
    from tapnbd.xen.evtchn import EventChannel
    from tapnbd.xen.grant import GrantMapper
    from tapnbd.xen.ring import BackRing

log = logging.getLogger("tapnbd.xen")

#: Where a direct request's segment array starts in its slot.
_SEGS_AT = REQUEST_HEADER.size

#: How long in-flight requests may take to finish once the frontend has gone.
DRAIN_TIMEOUT = 10.0


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


class BlkBack:
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
        fast = self._serve_fast
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
                    rc = (rc + 1) & U32
                    ring.req_cons = rc
                    if fast(buf, off):
                        continue
                    # A private copy: the frontend may rewrite the slot while we look.
                    self._dispatch(bytes(buf[off : off + ENTRY_SIZE]))
                    if self._barrier or not self._consuming:
                        # A barrier holds back later requests until it is done.
                        if self._barrier:
                            self.stats.oo_req += 1
                        return
                # The batch is drained: publish its responses together, and look again
                # for requests published meanwhile (arming req_event if there are none)
                # before the kick, so that a frontend it wakes finds req_event armed.
                notify = (
                    ring.rsp_prod_pvt != sring.rsp_prod and ring.push_responses_and_check_notify()
                )
                more = ring.final_check_for_requests()
                if notify:
                    self._notify()
                if not more:
                    return
        finally:
            self._kicking = False
            if ring.rsp_prod_pvt != sring.rsp_prod and not self._unmapped:
                # Left early (a barrier, a lost frontend): what was answered goes now.
                self._push_responses()

    def _serve_fast(self, buf: memoryview, off: int) -> bool:
        """Serve the slot at ``off`` here if it is the common case, else return False.

        The common case: a READ or WRITE (direct, or indirect with one indirect page)
        whose grants are kept (persistent) and whose data the page cache holds,
        answered without a request object or a coroutine. Each field is read from the shared slot once (the
        header, then the segments the header counts) and checked on that copy with
        parse_request's rules; anything else returns False before any I/O, and the
        general path copies the slot anew and checks it from the start.
        """
        op, nseg, _, req_id, sector = REQUEST_HEADER.unpack_from(buf, off)
        if op == Op.INDIRECT and self.max_indirect:
            # The header again in its indirect layout; its segments come from the
            # indirect page (one: max_indirect is at most 512), copied out of it once.
            _, op, nseg, req_id, sector, _, gref, *_ = INDIRECT_REQUEST.unpack_from(buf, off)
            if op > Op.WRITE or not 0 < nseg <= min(self.max_indirect, SEGMENTS_PER_INDIRECT_PAGE):
                return False
            mapped = self.grants.map_kept_indirect(gref, nseg)
        elif op > Op.WRITE or not 0 < nseg <= MAX_SEGMENTS:
            return False
        else:
            mapped = self.grants.map_kept(DIRECT_SEGMENTS[nseg].unpack_from(buf, off + _SEGS_AT))
        # vbd_translate: "(sector_number + nr_sects) > vbd_sz" -> access denied
        if mapped is None or sector + mapped[1] > self.sectors:
            return False
        views, nsect = mapped
        stats = self.stats
        if op == Op.READ:
            stats.rd_req += 1
            stats.rd_sect += nsect
            done = self.backend.try_preadv(sector * SECTOR_SIZE, nsect * SECTOR_SIZE, views)
        else:
            stats.wr_req += 1
            stats.wr_sect += nsect
            done = self.backend.try_pwritev(sector * SECTOR_SIZE, nsect * SECTOR_SIZE, views)
        if done:
            # make_response, inline: the batch is pushed when it is drained (_kick).
            ring = self.ring
            i = ring.rsp_prod_pvt
            RESPONSE.pack_into(buf, ring.sring.offset(i), req_id, op, Status.OKAY)
            ring.rsp_prod_pvt = (i + 1) & U32
            return True
        # The I/O has to wait: the general path's coroutine, over the pages mapped here
        # (_rw needs no segments, so the request carries none).
        req = Request(Op(op), 0, req_id, sector, (), nsect)
        task = eager_start(self._serve(req, None, views))
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return True

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
        if not self._kicking:
            # Completed on its own (after I/O): pushed at once.
            self._push_responses()

    def _push_responses(self) -> None:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY over what is answered; kick if asked."""
        ring = self.ring
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
