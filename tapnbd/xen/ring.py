"""The shared ring: ring.h's DEFINE_RING_TYPES and its macros, over any writable buffer.

The page holds four free-running 32-bit indices and then the slots::

    req_prod   written by the frontend when it publishes requests
    req_event  written by the backend: "notify me when req_prod passes this"
    rsp_prod   written by the backend when it publishes responses
    rsp_event  written by the frontend: "notify me when rsp_prod passes this"

Each side also keeps private indices (front: req_prod_pvt, rsp_cons; back:
rsp_prod_pvt, req_cons). All arithmetic is modulo 2**32, as RING_IDX is
``unsigned int``; a slot is ``idx & (RING_SIZE - 1)``.

Event suppression (ring.h, "notification hold-off", 2005): a producer notifies only if
the consumer's event index lies in the range it just published, and a consumer asks to
be notified (sets its event index) only when it has run out of work, re-checking after
the write to close the race with a producer that published in between. A busy ring
therefore runs with almost no notifications.

The barriers matter because the two sides run in different processes on different
CPUs. On x86-64 (TSO) stores are not reordered with stores, nor loads with loads, so
``xen_wmb``/``xen_rmb`` are compiler barriers only, and a CPython C call is already
one. ``xen_mb`` must stop a later load passing an earlier store (the store buffer);
that needs a locked instruction, which ``mb()`` gets from a lock round trip.
"""

from __future__ import annotations

import threading

from tapnbd.xen.blkif import ENTRY_SIZE, RING_HEADER_SIZE, ring_size

#: RING_IDX is a free-running unsigned int.
U32 = 0xFFFFFFFF
_U32 = U32

_barrier = threading.Lock()


def mb() -> None:
    """xen_mb(): a full memory barrier.

    CPython's lock acquire and release are atomic read-modify-writes (a ``lock``-prefixed
    instruction on x86), and any locked instruction orders all earlier loads and stores
    before all later ones.
    """
    _barrier.acquire()
    _barrier.release()


class SharedRing:
    """struct blkif_sring laid over ``buf`` (one page, shared with the other side)."""

    __slots__ = ("_idx", "buf", "entry_size", "mask", "nr_ents")

    def __init__(self, buf: memoryview, entry_size: int = ENTRY_SIZE) -> None:
        if buf.readonly:
            raise ValueError("the shared ring must be writable")
        self.buf = buf
        self.entry_size = entry_size
        self.nr_ents = ring_size(len(buf), entry_size)
        self.mask = self.nr_ents - 1
        # The indices go through a native uint32 view: each access is one aligned 4-byte
        # load or store. struct.pack_into would not do: CPython zeroes the target before
        # packing into it, so the other side could read a 0 index in between.
        self._idx = buf[:16].cast("I")

    def init(self, start: int = 0) -> None:
        """SHARED_RING_INIT: producers at 0, "both event fields to 1", padding cleared.

        ``start`` other than 0 is for tests that run the indices across 2**32.
        """
        self.buf[:RING_HEADER_SIZE] = bytes(RING_HEADER_SIZE)  # before anyone attaches
        self.req_prod = self.rsp_prod = start & _U32
        self.req_event = self.rsp_event = (start + 1) & _U32

    def offset(self, idx: int) -> int:
        """Byte offset of slot ``idx`` (RING_GET_REQUEST/RING_GET_RESPONSE)."""
        return RING_HEADER_SIZE + (idx & self.mask) * self.entry_size

    def entry(self, idx: int) -> memoryview:
        off = RING_HEADER_SIZE + (idx & self.mask) * self.entry_size
        return self.buf[off : off + self.entry_size]

    # The four shared indices.

    @property
    def req_prod(self) -> int:
        return self._idx[0]

    @req_prod.setter
    def req_prod(self, value: int) -> None:
        self._idx[0] = value & _U32

    @property
    def req_event(self) -> int:
        return self._idx[1]

    @req_event.setter
    def req_event(self, value: int) -> None:
        self._idx[1] = value & _U32

    @property
    def rsp_prod(self) -> int:
        return self._idx[2]

    @rsp_prod.setter
    def rsp_prod(self, value: int) -> None:
        self._idx[2] = value & _U32

    @property
    def rsp_event(self) -> int:
        return self._idx[3]

    @rsp_event.setter
    def rsp_event(self, value: int) -> None:
        self._idx[3] = value & _U32


def _notify(new: int, old: int, event: int) -> bool:
    """``(RING_IDX)(new - event) < (RING_IDX)(new - old)``: event lies in (old, new]."""
    return ((new - event) & _U32) < ((new - old) & _U32)


class FrontRing:
    """The frontend's view: it produces requests and consumes responses."""

    __slots__ = ("nr_ents", "req_prod_pvt", "rsp_cons", "sring")

    def __init__(self, sring: SharedRing, start: int = 0) -> None:
        """FRONT_RING_INIT (``start`` = 0) or FRONT_RING_ATTACH (``start`` = the index)."""
        self.sring = sring
        self.nr_ents = sring.nr_ents
        self.req_prod_pvt = start & _U32
        self.rsp_cons = start & _U32

    def free_requests(self) -> int:
        """RING_FREE_REQUESTS: slots not holding an unanswered request."""
        return self.nr_ents - ((self.req_prod_pvt - self.rsp_cons) & _U32)

    def full(self) -> bool:
        """RING_FULL."""
        return self.free_requests() == 0

    def has_unconsumed_responses(self) -> int:
        """RING_HAS_UNCONSUMED_RESPONSES."""
        return (self.sring.rsp_prod - self.rsp_cons) & _U32

    def push_requests(self) -> None:
        """RING_PUSH_REQUESTS: publish without asking whether to notify."""
        self.sring.req_prod = self.req_prod_pvt  # after xen_wmb(): a no-op on x86

    def push_requests_and_check_notify(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: publish; True if the backend wants a kick."""
        sring = self.sring
        old = sring.req_prod
        new = self.req_prod_pvt
        sring.req_prod = new  # xen_wmb() first: slots before index (free on x86)
        mb()  # the backend's req_event must be read after req_prod is visible
        return _notify(new, old, sring.req_event)

    def final_check_for_responses(self) -> int:
        """RING_FINAL_CHECK_FOR_RESPONSES: unconsumed responses, arming rsp_event if none."""
        more = self.has_unconsumed_responses()
        if more:
            return more
        self.sring.rsp_event = self.rsp_cons + 1
        mb()
        return self.has_unconsumed_responses()


class BackRing:
    """The backend's view: it consumes requests and produces responses."""

    __slots__ = ("nr_ents", "req_cons", "rsp_prod_pvt", "sring")

    def __init__(self, sring: SharedRing, start: int = 0) -> None:
        """BACK_RING_INIT (``start`` = 0) or BACK_RING_ATTACH."""
        self.sring = sring
        self.nr_ents = sring.nr_ents
        self.rsp_prod_pvt = start & _U32
        self.req_cons = start & _U32

    def has_unconsumed_requests(self) -> int:
        """RING_HAS_UNCONSUMED_REQUESTS.

        The smaller of the requests published and the slots free for their responses, so
        a frontend that over-publishes cannot make the backend read past its responses.
        """
        req = (self.sring.req_prod - self.req_cons) & _U32
        rsp = self.nr_ents - ((self.req_cons - self.rsp_prod_pvt) & _U32)
        return req if req < rsp else rsp

    def request_cons_overflow(self, cons: int) -> bool:
        """RING_REQUEST_CONS_OVERFLOW: consuming ``cons`` would overrun unsent responses."""
        return ((cons - self.rsp_prod_pvt) & _U32) >= self.nr_ents

    def request_prod_overflow(self, prod: int) -> bool:
        """RING_REQUEST_PROD_OVERFLOW (later ring.h): ``prod`` claims more than fits.

        blkback halts such a ring: "Frontend provided bogus ring requests".
        """
        return ((prod - self.rsp_prod_pvt) & _U32) > self.nr_ents

    def push_responses(self) -> None:
        """RING_PUSH_RESPONSES."""
        self.sring.rsp_prod = self.rsp_prod_pvt

    def push_responses_and_check_notify(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish; True if the frontend wants a kick."""
        sring = self.sring
        old = sring.rsp_prod
        new = self.rsp_prod_pvt
        sring.rsp_prod = new
        mb()
        return _notify(new, old, sring.rsp_event)

    def final_check_for_requests(self) -> int:
        """RING_FINAL_CHECK_FOR_REQUESTS: unconsumed requests, arming req_event if none."""
        more = self.has_unconsumed_requests()
        if more:
            return more
        self.sring.req_event = self.req_cons + 1
        mb()
        return self.has_unconsumed_requests()
