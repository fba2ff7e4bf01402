"""BlkFront: a blkif frontend as a client library, issuing requests the way blkfront does.

Use it from any process that can reach the backend's directory::

    with BlkFront("/dev/shm/vbd") as f:
        f.write(0, b"x" * 4096)
        data = f.read(0, 4096)

or, with many requests in flight, submit and then wait::

    ios = [f.submit_read(i * 4096, 4096) for i in range(100)]
    f.wait(ios)

What it does is what Linux blkfront did in 2007 (../shared/spec/blktap.md 3.4, 4):

- connect: wait for the backend's InitWait, make the shared ring in a page of its own
  memory (SHARED_RING_INIT, FRONT_RING_INIT), grant it, allocate an unbound event
  channel, write ``ring-ref``/``event-channel``/``protocol``, go to Initialised, hand
  the memory (a sealed memfd) to the backend when it binds the channel, and
  once the backend is Connected read ``sectors``, ``info``, ``sector-size`` and the
  ``feature-*`` keys and go to Connected;
- each request: grant one page per segment (read-only for WRITE data: the backend only
  reads it), fill ``first_sect``/``last_sect``, and keep a shadow copy indexed by the
  request id; a transfer bigger than 11 pages becomes several requests;
- with ``feature-persistent`` (both ends offer it): grant every slot's pages once, for
  write access, at connect, and never end access while connected; a request then
  writes no grant entries at all (blkfront's persistent ``grants`` list);
- publish with RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, kicking the backend only if asked;
- on completion (``blkif_interrupt``): consume responses, end grant access, copy read
  data out, and re-arm ``rsp_event`` with RING_FINAL_CHECK_FOR_RESPONSES before
  sleeping on the event channel;
- when the ring is full, wait for responses (blkfront stops its queue).

Pages come from the frontend's own memory (the grant table memfd), so the user's data
is copied in and out: a guest's bio pages would be granted directly, but a Python
caller's buffers cannot be shared with another process.
"""

from __future__ import annotations

import functools
import os
import struct
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from tapnbd.xen.blkif import (
    DISCARD_REQUEST,
    DISCARD_SECURE,
    FEATURE_INDIRECT,
    FEATURE_KEYS,
    FEATURE_PERSISTENT,
    ID,
    ID_OFFSET,
    INDIRECT_REQUEST,
    MAX_INDIRECT_SEGMENTS,
    MAX_REQUEST_BYTES,
    MAX_SEGMENTS,
    PAGE_SIZE,
    PROTOCOL,
    REQUEST_HEADER,
    RESPONSE,
    SECTOR_SIZE,
    SECTORS_PER_PAGE,
    SEGMENT,
    Op,
    Status,
    VdiskInfo,
    pack_segments,
)
from tapnbd.xen.evtchn import EventChannel, EventChannelClosed, UnboundPort
from tapnbd.xen.grant import GrantTable
from tapnbd.xen.ring import U32, FrontRing, SharedRing
from tapnbd.xen.xenstore import XenbusState, XenStore, frontend_dir, state_of

if TYPE_CHECKING:
    from pathlib import Path

DEFAULT_DOMID = 1
DEFAULT_DEVID = 51712


#: Guest pages beyond the per-slot reservations, for callers that grant pages
#: themselves (tests build requests by hand).
SPARE_FRAMES = 16
GRANT_ENTRY_SIZE = 8


#: A request of one segment (a 4 KiB I/O), header and segment packed in one call.
_ONE_SEGMENT = struct.Struct(REQUEST_HEADER.format + SEGMENT.format.lstrip("<"))
_SEGS_AT = REQUEST_HEADER.size
_READ = int(Op.READ)


@functools.lru_cache(maxsize=4096)
def _full_pages(ref: int, nseg: int) -> bytes:
    """Segment descriptors for refs ref..ref+nseg-1, each a whole page (sectors 0..7)."""
    return pack_segments([(ref + i, 0, SECTORS_PER_PAGE - 1) for i in range(nseg)])


class BlkFrontError(Exception):
    """The connection could not be made, or the backend broke the protocol."""


class IOFailed(OSError):
    """A request was answered with BLKIF_RSP_ERROR or BLKIF_RSP_EOPNOTSUPP."""

    def __init__(self, status: int, what: str) -> None:
        name = Status(status).name if status in Status._value2member_map_ else str(status)
        super().__init__(f"{what}: {name}")
        self.status = status


class Io:
    """One caller-level I/O; done when every ring request it was split into is answered."""

    __slots__ = ("callback", "data", "done", "kind", "length", "offset", "parts", "status")

    def __init__(self, kind: str, offset: int, length: int) -> None:
        self.kind = kind
        self.offset = offset
        self.length = length
        #: Read data, filled as the parts complete.
        self.data: bytearray | None = None
        #: Ring requests not yet answered.
        self.parts = 0
        self.done = False
        #: The first non-OKAY status of any part, else OKAY.
        self.status = int(Status.OKAY)
        self.callback: Callable[[Io], None] | None = None

    def result(self) -> bytearray | None:
        """The read data (None for other ops); raises IOFailed unless every part was OKAY."""
        if not self.done:
            raise RuntimeError("the I/O has not completed")
        if self.status != Status.OKAY:
            raise IOFailed(self.status, f"{self.kind} {self.length} bytes at {self.offset}")
        return self.data

    def __repr__(self) -> str:
        state = "done" if self.done else f"{self.parts} parts pending"
        return f"<Io {self.kind} {self.offset}+{self.length} {state} status={self.status}>"


class _Shadow:
    """blkfront's shadow entry: what a request in flight owns, indexed by its id.

    Each id has its own run of consecutive frames and grant refs, so a request's data
    is one contiguous stretch of memory (one copy in or out) and granting its pages or
    ending access is one write to the grant table.
    """

    __slots__ = (
        "base",
        "data_off",
        "frame",
        "io",
        "length",
        "mem_off",
        "nref",
        "ref",
        "ro",
        "rw",
    )

    def __init__(self, frame: int, ref: int, base: int = 0) -> None:
        self.io: Io | None = None
        #: First data frame and grant ref of this id; the indirect page is the run's last.
        self.frame = frame
        self.ref = ref
        #: Where the first data frame is in the memory (GrantTable.frame_offset).
        self.base = base
        #: Grant refs in use (data pages, then the indirect page if any); 0 for none.
        self.nref = 0
        #: Where the data is in the guest memory, its length, and where in the Io it goes.
        self.mem_off = 0
        self.length = 0
        self.data_off = 0
        #: grant_entry_v1 runs for the whole reservation, writable and read-only.
        self.rw = b""
        self.ro = b""


class BlkFront:
    """A frontend for vbd ``domid``/``devid`` served in ``directory``."""

    def __init__(
        self,
        directory: str | Path,
        *,
        domid: int = DEFAULT_DOMID,
        devid: int = DEFAULT_DEVID,
        timeout: float = 10.0,
        max_indirect_segments: int = MAX_INDIRECT_SEGMENTS,
        persistent: bool = True,
    ) -> None:
        self.directory = os.fspath(directory)
        self.domid = domid
        self.devid = devid
        self.timeout = timeout
        self.xs = XenStore(self.directory)
        self.fe = frontend_dir(domid, devid)
        self.be = ""
        self.backend_id = 0
        self.connected = False
        # Set by connect().
        self.sectors = 0
        self.sector_size = SECTOR_SIZE
        self.info = VdiskInfo(0)
        self.features: dict[Op, bool] = {}
        self.grants: GrantTable
        self.ring: FrontRing
        self.evtchn: EventChannel
        self._shadow: list[_Shadow] = []
        self._free_ids: list[int] = []
        #: The most segments we put in one BLKIF_OP_INDIRECT (Linux blkfront's
        #: max_indirect_segments parameter); the backend's offer caps it. 0: none.
        self.max_indirect_segments = max_indirect_segments
        self.max_indirect = 0
        #: Whether we offer feature-persistent (blkfront's feature_persistent
        #: parameter), and whether it is in use (the backend offered it too).
        self.offer_persistent = persistent
        self.persistent = False
        self._per_slot = 0
        self._mem = memoryview(b"")
        #: Ring requests published and notifications sent (for event-suppression tests).
        self.requests = 0
        self.responses = 0

    # Connection.

    @property
    def size(self) -> int:
        return self.sectors * SECTOR_SIZE

    @property
    def read_only(self) -> bool:
        return bool(self.info & VdiskInfo.READONLY)

    def __enter__(self) -> BlkFront:
        if not self.connected:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wait_backend(self, states: Iterable[XenbusState], what: str) -> dict[str, str]:
        wanted = frozenset(states)
        try:
            return self.xs.wait(
                lambda s: s if state_of(s, self.be) in wanted else None, timeout=self.timeout
            )
        except TimeoutError:
            st = self.xs.state(self.be).name
            raise BlkFrontError(f"backend {self.be} is {st}, waited for {what}") from None

    def connect(self, *, nr_frames: int | None = None) -> BlkFront:
        """The xenbus handshake; on return the disk is Connected."""
        try:
            snap = self.xs.wait(
                lambda s: s if f"{self.fe}/backend" in s else None, timeout=self.timeout
            )
        except TimeoutError:
            raise BlkFrontError(
                f"no vbd {self.fe} in {self.directory}: is a backend serving it?"
            ) from None
        self.be = snap[f"{self.fe}/backend"]
        self.backend_id = int(snap.get(f"{self.fe}/backend-id", "0"))
        # A reconnect starts from Initialising; the backend answers with InitWait.
        self.xs.switch_state(self.fe, XenbusState.INITIALISING)
        self._wait_backend([XenbusState.INIT_WAIT], "InitWait")

        # BLKIF_OP_INDIRECT if the backend offers it (blkfront's blkfront_setup_indirect).
        snap = self.xs.snapshot()
        offered = int(snap.get(f"{self.be}/{FEATURE_INDIRECT}", "0") or 0)
        self.max_indirect = min(offered, self.max_indirect_segments)
        if self.max_indirect <= MAX_SEGMENTS:
            self.max_indirect = 0
        self.persistent = self.offer_persistent and (
            snap.get(f"{self.be}/{FEATURE_PERSISTENT}") == "1"
        )
        # Our memory: the ring page, then per ring slot the most pages one request can
        # carry plus its indirect page, so data pages never run out; then some spare.
        per_slot = max(self.max_indirect, MAX_SEGMENTS) + 1
        probe = SharedRing(memoryview(bytearray(PAGE_SIZE)))
        if nr_frames is None:
            nr_frames = 1 + probe.nr_ents * per_slot + SPARE_FRAMES
        self.grants = self._create_memory(nr_frames)
        port: UnboundPort | None = None
        channel: EventChannel | None = None
        try:
            grants = self.grants
            ring_frame = grants.alloc_frame()
            sring = SharedRing(grants.frame(ring_frame))
            sring.init()
            self.ring = FrontRing(sring)
            ring_ref = grants.grant(ring_frame, self.backend_id, readonly=False)
            self._shadow = []
            for _ in range(sring.nr_ents):
                frame = grants.alloc_run(per_slot)
                sh = _Shadow(
                    frame, grants.alloc_run(per_slot, refs=True), grants.frame_offset(frame)
                )
                sh.rw = grants.run_entries(sh.frame, per_slot, self.backend_id, readonly=False)
                sh.ro = grants.run_entries(sh.frame, per_slot, self.backend_id, readonly=True)
                self._shadow.append(sh)
                if self.persistent:
                    # Granted once for write access, data and indirect page alike.
                    grants.set_entries(sh.ref, sh.rw)
            self._free_ids = list(range(sring.nr_ents - 1, -1, -1))
            self._per_slot = per_slot
            self._mem = grants.memory
            port = UnboundPort(self.directory, self.domid, self.backend_id)
            self.xs.write_many(
                {
                    f"{self.fe}/ring-ref": ring_ref,
                    f"{self.fe}/event-channel": port.port,
                    f"{self.fe}/protocol": PROTOCOL,
                    f"{self.fe}/{FEATURE_PERSISTENT}": int(self.offer_persistent),
                    f"{self.fe}/state": int(XenbusState.INITIALISED),
                }
            )
            channel = self._accept_bind(port)
            channel.send_fd(grants.fd)
            snap = self._wait_backend(
                [XenbusState.CONNECTED, XenbusState.CLOSING, XenbusState.CLOSED], "Connected"
            )
            if state_of(snap, self.be) != XenbusState.CONNECTED:
                raise BlkFrontError(f"backend {self.be} refused the connection (see its log)")
            self.evtchn = channel
        except BaseException:
            if channel is not None:
                channel.close()
            self.grants.close()
            raise
        finally:
            if port is not None:
                port.close()
        self.sectors = int(snap[f"{self.be}/sectors"])
        self.sector_size = int(snap.get(f"{self.be}/sector-size", str(SECTOR_SIZE)))
        self.info = VdiskInfo(int(snap.get(f"{self.be}/info", "0")))
        self.features = {
            op: snap.get(f"{self.be}/{key}", "0") == "1" for op, key in FEATURE_KEYS.items()
        }
        self.xs.switch_state(self.fe, XenbusState.CONNECTED)
        self.connected = True
        return self

    def _create_memory(self, nr_frames: int) -> GrantTable:
        """Our memory and grant table (tests override this to misbehave)."""
        return GrantTable.create(domid=self.domid, nr_frames=nr_frames)

    def _accept_bind(self, port: UnboundPort) -> EventChannel:
        """The backend's bind of our event channel, unless it refuses us first."""
        deadline = time.monotonic() + self.timeout
        # Our memory goes only to the vbd directory's owner (the backend) or root.
        trusted = {0, os.geteuid(), os.stat(self.directory).st_uid}
        while True:
            channel = port.try_accept(0.005)
            if channel is not None:
                if channel.peer_uid in trusted:
                    return channel
                channel.close()  # another user connected to our port first
                continue
            st = self.xs.state(self.be)
            if st in (XenbusState.CLOSING, XenbusState.CLOSED):
                raise BlkFrontError(f"backend {self.be} refused the connection (see its log)")
            if time.monotonic() > deadline:
                raise BlkFrontError(f"backend {self.be} is {st.name}, did not bind the channel")

    def close(self) -> None:
        """Finish what is in flight, then Closing -> Closed, then free everything."""
        if not self.connected:
            return
        self.connected = False
        try:
            if self.in_flight:
                self.wait()
            self.xs.switch_state(self.fe, XenbusState.CLOSING)
            self._wait_backend([XenbusState.CLOSING, XenbusState.CLOSED], "Closing")
            self.xs.switch_state(self.fe, XenbusState.CLOSED)
            self._wait_backend([XenbusState.CLOSED], "Closed")
        except (BlkFrontError, EventChannelClosed, TimeoutError):
            self.xs.switch_state(self.fe, XenbusState.CLOSED)
        finally:
            self.evtchn.close()
            self.grants.close()

    # Counters.

    @property
    def notifications(self) -> int:
        """Kicks sent to the backend."""
        return self.evtchn.sent

    @property
    def events(self) -> int:
        """Event-channel upcalls from the backend."""
        return self.evtchn.received

    @property
    def in_flight(self) -> int:
        """Ring requests queued or published and not yet answered."""
        return len(self._shadow) - len(self._free_ids)

    # Building requests.

    def _check_range(self, offset: int, length: int) -> None:
        if offset % SECTOR_SIZE or length % SECTOR_SIZE:
            raise ValueError("offset and length must be multiples of 512 (blkif sectors)")
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")

    def _slot(self) -> int:
        """A free shadow id, waiting for responses while the ring is full."""
        while not self._free_ids or self.ring.full():
            self.push()
            self._wait_responses(self.timeout)
        return self._free_ids.pop()

    def _queue(self, sid: int, io: Io) -> None:
        """Count the request against ``io`` and move req_prod_pvt past it."""
        io.parts += 1
        self._shadow[sid].io = io
        self.ring.req_prod_pvt = (self.ring.req_prod_pvt + 1) & U32
        self.requests += 1

    def _submit_rw(
        self,
        op: Op,
        io: Io,
        offset: int,
        length: int,
        data: memoryview | None,
        page_offset: int,
    ) -> None:
        """Split [offset, offset+length) into ring requests.

        At most 11 segments each, or ``max_indirect`` in a BLKIF_OP_INDIRECT for READ
        and WRITE when the backend offers it (blkfront never makes a barrier or flush
        indirect). ``page_offset`` puts the start of the data that far into the first
        page, as a bio whose first bio_vec does not start on a page boundary would.
        """
        if page_offset % SECTOR_SIZE or not 0 <= page_offset < PAGE_SIZE:
            raise ValueError("page_offset must be a multiple of 512 below 4096")
        indirect = self.max_indirect if op is Op.READ or op is Op.WRITE else 0
        max_seg = indirect or MAX_SEGMENTS
        readonly = op is not Op.READ  # the backend only reads WRITE data
        persistent = self.persistent
        grants = self.grants
        mem = self._mem
        backend_id = self.backend_id
        handle = self.devid & 0xFFFF
        sring = self.ring.sring
        buf = sring.buf
        sector = offset // SECTOR_SIZE
        pos = 0
        a = page_offset
        # Hold a reference while splitting: waiting for a free slot consumes responses,
        # and the parts answered so far must not complete the I/O before the rest exist.
        io.parts += 1
        while True:
            sid = self._slot()
            sh = self._shadow[sid]
            # This part: from byte a of the first page, as far as max_seg pages reach.
            n = min(max_seg * PAGE_SIZE - a, length - pos)
            nseg = (a + n + PAGE_SIZE - 1) // PAGE_SIZE
            mem_off = grants.frame_offset(sh.frame) + a
            if data is not None:
                mem[mem_off : mem_off + n] = data[pos : pos + n]
            # Grant the pages (unless they stay granted), then describe them: (ref,
            # first_sect, last_sect) each.
            if not persistent:
                entries = sh.ro if readonly else sh.rw
                grants.set_entries(sh.ref, entries[: nseg * GRANT_ENTRY_SIZE])
            desc = bytearray(_full_pages(sh.ref, nseg))
            desc[4] = a // SECTOR_SIZE  # first_sect of the first segment
            desc[-3] = ((a + n - 1) % PAGE_SIZE) // SECTOR_SIZE  # last_sect of the last
            slot = sring.offset(self.ring.req_prod_pvt)
            if nseg > MAX_SEGMENTS:
                # The segment array goes in the slot's indirect page, granted read-only.
                iref = sh.ref + self._per_slot - 1
                iframe = sh.frame + self._per_slot - 1
                ioff = grants.frame_offset(iframe)
                mem[ioff : ioff + len(desc)] = desc
                if not persistent:
                    grants.grant_ref(iref, iframe, backend_id, readonly=True)
                INDIRECT_REQUEST.pack_into(
                    buf, slot, Op.INDIRECT, op, nseg, sid, sector, handle, iref, 0, 0, 0, 0, 0, 0, 0
                )
                sh.nref = self._per_slot  # end_run covers the refs in between; harmless
            else:
                buf[slot + REQUEST_HEADER.size : slot + REQUEST_HEADER.size + len(desc)] = desc
                REQUEST_HEADER.pack_into(buf, slot, op, nseg, handle, sid, sector)
                sh.nref = nseg
            sh.mem_off = mem_off
            sh.length = n
            sh.data_off = pos
            self._queue(sid, io)
            pos += n
            sector += n // SECTOR_SIZE
            a = 0
            if pos >= length:
                self._release(io)
                return

    def submit_read(
        self, offset: int, length: int, *, page_offset: int = 0, into: bytearray | None = None
    ) -> Io:
        """Queue a read; ``Io.result()`` is the data once done. Call ``push``/``wait``.

        ``into`` is a buffer of at least ``length`` bytes to receive the data (a caller
        reusing its buffers saves an allocation per read); by default a new one.
        """
        self._check_range(offset, length)
        if length == 0:
            raise ValueError("a read needs at least one sector")
        if into is not None and len(into) < length:
            raise ValueError("the buffer is smaller than the read")
        io = Io("read", offset, length)
        io.data = bytearray(length) if into is None else into
        if page_offset == 0 and length <= MAX_REQUEST_BYTES and self._free_ids:
            self._submit_direct(_READ, io, offset, length, None)
        else:
            self._submit_rw(Op.READ, io, offset, length, None, page_offset)
        return io

    def submit_write(
        self,
        offset: int,
        data: bytes | bytearray | memoryview,
        *,
        page_offset: int = 0,
        op: Op = Op.WRITE,
    ) -> Io:
        """Queue a write (``op`` may be WRITE_BARRIER or FLUSH_DISKCACHE to carry data)."""
        self._check_range(offset, len(data))
        if op is Op.READ or op is Op.DISCARD:
            raise ValueError(f"{op.name} does not carry write data")
        length = len(data)
        io = Io("write" if op is Op.WRITE else op.name.lower(), offset, length)
        if length == 0:
            if op is Op.WRITE:
                raise ValueError("a write needs at least one sector")
            self._submit_empty(op, io)
        elif op is Op.WRITE and page_offset == 0 and length <= MAX_REQUEST_BYTES and self._free_ids:
            self._submit_direct(
                op, io, offset, length, data.cast("B") if isinstance(data, memoryview) else data
            )
        else:
            self._submit_rw(op, io, offset, length, memoryview(data).cast("B"), page_offset)
        return io

    def _submit_direct(
        self, op: int, io: Io, offset: int, length: int, data: bytes | bytearray | memoryview | None
    ) -> None:
        """One READ or WRITE request of at most 11 pages from the start of a page.

        _submit_rw's common case (a 4 KiB I/O) written out: the caller checked that a
        shadow id is free, and the ring has a free slot whenever an id is.
        """
        sid = self._free_ids.pop()
        sh = self._shadow[sid]
        nseg = (length + PAGE_SIZE - 1) // PAGE_SIZE
        m = sh.base
        if data is not None:
            self._mem[m : m + length] = data
        if not self.persistent:
            entries = sh.rw if op == _READ else sh.ro
            self.grants.set_entries(sh.ref, entries[: nseg * GRANT_ENTRY_SIZE])
        ring = self.ring
        i = ring.req_prod_pvt
        sring = ring.sring
        buf = sring.buf
        slot = sring.offset(i)
        last = ((length - 1) % PAGE_SIZE) // SECTOR_SIZE  # last_sect of the last page
        sector = offset // SECTOR_SIZE
        if nseg == 1:
            _ONE_SEGMENT.pack_into(
                buf, slot, op, 1, self.devid & 0xFFFF, sid, sector, sh.ref, 0, last
            )
        else:
            desc = bytearray(_full_pages(sh.ref, nseg))
            desc[-3] = last
            buf[slot + _SEGS_AT : slot + _SEGS_AT + len(desc)] = desc
            REQUEST_HEADER.pack_into(buf, slot, op, nseg, self.devid & 0xFFFF, sid, sector)
        sh.nref = nseg
        sh.mem_off = m
        sh.length = length
        sh.data_off = 0
        sh.io = io
        io.parts = 1
        ring.req_prod_pvt = (i + 1) & U32
        self.requests += 1

    def _submit_empty(self, op: Op, io: Io) -> None:
        sid = self._slot()
        self._shadow[sid].nref = 0
        sring = self.ring.sring
        REQUEST_HEADER.pack_into(
            sring.buf, sring.offset(self.ring.req_prod_pvt), op, 0, self.devid & 0xFFFF, sid, 0
        )
        self._queue(sid, io)

    def submit_flush(self) -> Io:
        """Queue a cache flush: FLUSH_DISKCACHE, else an empty WRITE_BARRIER, else nothing.

        Like blkfront, a backend offering neither has no cache to flush, and the flush
        completes at once.
        """
        io = Io("flush", 0, 0)
        if self.features.get(Op.FLUSH_DISKCACHE):
            self._submit_empty(Op.FLUSH_DISKCACHE, io)
        elif self.features.get(Op.WRITE_BARRIER):
            self._submit_empty(Op.WRITE_BARRIER, io)
        else:
            io.done = True
        return io

    def submit_discard(self, offset: int, length: int, *, secure: bool = False) -> Io:
        """Queue a BLKIF_OP_DISCARD of the range (sent even if not offered)."""
        self._check_range(offset, length)
        io = Io("discard", offset, length)
        sid = self._slot()
        self._shadow[sid].nref = 0
        sring = self.ring.sring
        DISCARD_REQUEST.pack_into(
            sring.buf,
            sring.offset(self.ring.req_prod_pvt),
            Op.DISCARD,
            DISCARD_SECURE if secure else 0,
            self.devid & 0xFFFF,
            sid,
            offset // SECTOR_SIZE,
            length // SECTOR_SIZE,
        )
        self._queue(sid, io)
        return io

    def submit_raw(self, raw: bytes) -> Io:
        """Queue a hand-built 112-byte request as is, except for its id (for tests).

        Grants it names are the caller's to make and end.
        """
        io = Io("raw", 0, 0)
        sid = self._slot()
        self._shadow[sid].nref = 0
        sring = self.ring.sring
        off = sring.offset(self.ring.req_prod_pvt)
        sring.buf[off : off + len(raw)] = raw
        ID.pack_into(sring.buf, off + ID_OFFSET, sid)
        self._queue(sid, io)
        return io

    # Publishing and completing.

    def push(self) -> None:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, kicking the backend if it asked."""
        if self.ring.push_requests_and_check_notify():
            self.evtchn.notify()

    def _complete(self, rsp_id: int, status: int) -> None:
        if not 0 <= rsp_id < len(self._shadow) or self._shadow[rsp_id].io is None:
            raise BlkFrontError(f"backend answered unknown request id {rsp_id}")
        sh = self._shadow[rsp_id]
        io = sh.io
        assert io is not None
        sh.io = None
        if sh.nref:
            if not self.persistent:
                self.grants.end_run(sh.ref, sh.nref)
            if io.data is not None and status == Status.OKAY:
                pos, n, m = sh.data_off, sh.length, sh.mem_off
                memoryview(io.data)[pos : pos + n] = self._mem[m : m + n]
        self._free_ids.append(rsp_id)
        self.responses += 1
        if status != Status.OKAY and io.status == Status.OKAY:
            io.status = status
        self._release(io)

    def _release(self, io: Io) -> None:
        """Drop one reference to ``io``; the last one completes it."""
        io.parts -= 1
        if io.parts == 0:
            io.done = True
            if io.callback is not None:
                io.callback(io)

    def poll(self) -> int:
        """Consume whatever responses are there (blkif_interrupt); returns how many."""
        ring = self.ring
        sring = ring.sring
        buf = sring.buf
        shadow = self._shadow
        nr = len(shadow)
        persistent = self.persistent
        mem = self._mem
        free = self._free_ids
        done = 0
        while True:
            rp = sring.rsp_prod
            i = ring.rsp_cons
            if ((rp - i) & U32) > ring.nr_ents:
                raise BlkFrontError(f"bogus rsp_prod {rp} (rsp_cons {i})")
            while i != rp:
                rsp_id, _, status = RESPONSE.unpack_from(buf, sring.offset(i))
                i = (i + 1) & U32
                ring.rsp_cons = i
                done += 1
                sh = shadow[rsp_id] if 0 <= rsp_id < nr else None
                io = sh.io if sh is not None else None
                if sh is None or io is None or status or not persistent or io.parts != 1:
                    self._complete(rsp_id, status)
                    continue
                # _complete's common case (the last request of an I/O, answered OKAY,
                # with persistent grants: no access to end), written out.
                sh.io = None
                data = io.data
                if data is not None and sh.nref:
                    pos, n, m = sh.data_off, sh.length, sh.mem_off
                    data[pos : pos + n] = mem[m : m + n]
                free.append(rsp_id)
                self.responses += 1
                io.parts = 0
                io.done = True
                if io.callback is not None:
                    io.callback(io)
            if i != ring.req_prod_pvt:
                if ring.final_check_for_responses():
                    continue
            else:
                sring.rsp_event = (i + 1) & U32
            return done

    def _wait_responses(self, timeout: float | None) -> int:
        """Block until at least one response has been consumed."""
        n = self.poll()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not n:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"no response from the backend in {timeout:g}s")
            self.evtchn.wait(left)
            n = self.poll()
        return n

    def wait_any(self, timeout: float | None = None) -> int:
        """Push, then block until at least one response is consumed; returns how many."""
        self.push()
        if not self.in_flight:
            return 0
        return self._wait_responses(self.timeout if timeout is None else timeout)

    def wait(self, ios: Io | Iterable[Io] | None = None, timeout: float | None = None) -> None:
        """Push, then block until ``ios`` (default: everything in flight) are done."""
        self.push()
        t = self.timeout if timeout is None else timeout
        if ios is None:
            while self.in_flight:
                self._wait_responses(t)
            return
        pending = [ios] if isinstance(ios, Io) else list(ios)
        for io in pending:
            while not io.done:
                self._wait_responses(t)

    # Blocking one-at-a-time calls.

    def read(self, offset: int, length: int) -> bytes:
        io = self.submit_read(offset, length)
        self.wait(io)
        data = io.result()
        assert data is not None
        return bytes(data)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        io = self.submit_write(offset, data)
        self.wait(io)
        io.result()

    def flush(self) -> None:
        io = self.submit_flush()
        self.wait(io)
        io.result()

    def discard(self, offset: int, length: int) -> None:
        io = self.submit_discard(offset, length)
        self.wait(io)
        io.result()
