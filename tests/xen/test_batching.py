"""Response batching in BlkBack, in-process and counted exactly.

A batch of requests that all complete while the backend consumes them (a RAM disk:
no request waits) is published with one RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: rsp_prod
moves once, by the whole batch, and the frontend is kicked at most once. The ring,
grant table and event channel are the real classes; only the event channel's socket
is replaced by a counter, so nothing depends on timing.
"""

from __future__ import annotations

import os

from formats.ram import RamDriver
from tapnbd.backend import Backend
from tapnbd.xen.blkback import BlkBack, RingStats
from tapnbd.xen.blkif import Op, Status, pack_request, unpack_response
from tapnbd.xen.grant import GrantMapper, GrantTable
from tapnbd.xen.ring import BackRing, FrontRing, SharedRing


class CountingChannel:
    """Stands in for EventChannel: counts the kicks the backend sends."""

    def __init__(self) -> None:
        self.sent = 0

    def notify(self) -> None:
        self.sent += 1


class CountingRing(BackRing):
    """BackRing that counts its pushes and the rsp_prod each one published."""

    __slots__ = ("pushed",)

    def __init__(self, sring: SharedRing) -> None:
        super().__init__(sring)
        self.pushed: list[int] = []

    def push_responses_and_check_notify(self) -> bool:
        notify = super().push_responses_and_check_notify()
        self.pushed.append(self.sring.rsp_prod)
        return notify


async def test_a_batch_is_answered_with_one_push_and_one_kick() -> None:
    table = GrantTable.create(domid=1, nr_frames=40)
    mapper = GrantMapper(os.dup(table.fd), domid=0, owner=1)
    backend = Backend(RamDriver(1 << 20))
    try:
        ring_frame = table.alloc_frame()
        sring = SharedRing(table.frame(ring_frame))
        sring.init()
        front = FrontRing(sring)
        back = CountingRing(sring)
        channel = CountingChannel()
        blk = BlkBack(backend, back, mapper, channel, RingStats())  # type: ignore[arg-type]
        # The backend is idle and armed (req_event = 1), the frontend waits for a
        # response (rsp_event = 1): the first response would kick it.
        n = sring.nr_ents
        refs = [table.grant(table.alloc_frame(), 0, readonly=False) for _ in range(n)]
        for i, ref in enumerate(refs):
            raw = pack_request(Op.READ, i, i * 8, [(ref, 0, 7)])
            off = sring.offset(front.req_prod_pvt)
            sring.buf[off : off + len(raw)] = raw
            front.req_prod_pvt += 1
        assert front.push_requests_and_check_notify()
        blk._kick()
        assert back.pushed == [n], back.pushed  # one push, of all n responses
        assert channel.sent == 1
        got = sorted(unpack_response(sring.buf, sring.offset(i)).id for i in range(n))
        assert got == list(range(n))
        assert all(
            unpack_response(sring.buf, sring.offset(i)).status == Status.OKAY for i in range(n)
        )
        # Drained: req_event armed for the next request, as RING_FINAL_CHECK leaves it.
        assert sring.req_event == (n + 1) & 0xFFFFFFFF
    finally:
        mapper.close()
        table.close()
