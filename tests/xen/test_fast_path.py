"""blkback's fast path, in-process: which requests take it, and what they do.

With persistent grants, a READ or WRITE whose refs are all kept is served by
``BlkBack._serve_fast`` without the checked path (``_dispatch``). Whether a request
goes there is invisible on the wire (the checked path answers the same), so these
tests replace ``_dispatch`` with a recorder and count: the shapes BlkFront sends
(one page, 11 pages, an indirect request of 256 pages, the same again from the
descriptor cache, the last pages of the disk) must not reach it, and the bytes must
be right. The ring, grant table and backend are the real classes over a RAM disk.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator

import pytest

from formats.ram import RamDriver
from tapnbd.backend import Backend
from tapnbd.xen.blkback import BlkBack, RingStats
from tapnbd.xen.blkif import (
    ID,
    ID_OFFSET,
    PAGE_SIZE,
    SECTOR_SIZE,
    Op,
    Status,
    pack_indirect,
    pack_request,
    pack_segments,
    unpack_response,
)
from tapnbd.xen.grant import GrantMapper, GrantTable
from tapnbd.xen.ring import U32, BackRing, FrontRing, SharedRing

DISK = 4 << 20
PAGES = 300


class Channel:
    """Stands in for EventChannel: the backend's kicks are not looked at here."""

    def notify(self) -> None:
        pass


class Rig:
    """A frontend's memory and ring, written by hand, and a BlkBack serving them."""

    def __init__(self, table: GrantTable, blk: BlkBack, front: FrontRing) -> None:
        self.table = table
        self.blk = blk
        self.front = front
        self.frames = [table.alloc_frame() for _ in range(PAGES)]
        self.refs = [table.grant(f, 0, readonly=False) for f in self.frames]
        self.ind_frame = table.alloc_frame()
        self.ind = table.grant(self.ind_frame, 0, readonly=False)
        self.dispatched: list[bytes] = []
        self.next_id = 0

    def run(self, raw: bytes) -> Status:
        """Publish one request, let the backend consume it, return the status.

        Each request gets a fresh id; its response must be the one pushed, with that
        id and the request's op.
        """
        sring = self.front.sring
        off = sring.offset(self.front.req_prod_pvt)
        self.next_id += 1
        sring.buf[off : off + len(raw)] = raw
        ID.pack_into(sring.buf, off + ID_OFFSET, self.next_id)
        self.front.req_prod_pvt = (self.front.req_prod_pvt + 1) & U32
        self.front.push_requests()
        self.blk._kick()
        assert sring.rsp_prod == self.front.req_prod_pvt, "not answered (or answered twice)"
        rsp = unpack_response(sring.buf, sring.offset(self.front.rsp_cons))
        self.front.rsp_cons = (self.front.rsp_cons + 1) & U32
        # blkback answers an indirect request with its indirect_op.
        op = raw[1] if raw[0] == Op.INDIRECT else raw[0]
        assert (rsp.id, rsp.operation) == (self.next_id, op)
        return Status(rsp.status)

    def disk(self, sector: int, n: int) -> bytes:
        """What the RAM disk holds, read past the ring."""
        data = self.blk.backend.driver.pread_nowait(sector * SECTOR_SIZE, n * PAGE_SIZE)
        assert data is not None
        return bytes(data)

    def page(self, i: int) -> memoryview:
        return self.table.frame(self.frames[i])

    def indirect(self, op: Op, sector: int, segs: list[tuple[int, int, int]]) -> Status:
        self.table.frame(self.ind_frame)[: len(segs) * 8] = pack_segments(segs)
        return self.run(pack_indirect(op, 0, sector, len(segs), [self.ind]))

    def watch(self) -> None:
        """From now on the checked path only records what reaches it."""
        self.blk._dispatch = self.dispatched.append  # type: ignore[method-assign,assignment]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    table = GrantTable.create(domid=1, nr_frames=PAGES + 8)
    mapper = GrantMapper(os.dup(table.fd), domid=0, owner=1)
    mapper.persist(1000)
    backend = Backend(RamDriver(DISK))
    sring = SharedRing(table.frame(table.alloc_frame()))
    sring.init()
    blk = BlkBack(backend, BackRing(sring), mapper, Channel(), RingStats())  # type: ignore[arg-type]
    r = Rig(table, blk, FrontRing(sring))
    # Keep every ref (the first map of each goes through the checked path).
    for ref in r.refs:
        assert r.run(pack_request(Op.READ, 0, 0, [(ref, 0, 7)])) == Status.OKAY
    assert r.indirect(Op.READ, 0, [(r.refs[0], 0, 7)] * 12) == Status.OKAY
    yield r
    mapper.close()
    table.close()


def test_blkfronts_shapes_take_the_fast_path(rig: Rig, seed: int) -> None:
    rng = random.Random(seed)
    rig.watch()
    data = rng.randbytes(PAGES * PAGE_SIZE)
    for i in range(PAGES):
        rig.page(i)[:] = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
    sectors = DISK // SECTOR_SIZE
    refs = rig.refs
    # One page; 11 pages; the last 11 pages of the disk; 256 pages, twice (the second
    # from the descriptor cache); 12 pages in a scattered order (no single buffer).
    assert rig.run(pack_request(Op.WRITE, 0, 8, [(refs[0], 0, 7)])) == Status.OKAY
    eleven = [(r, 0, 7) for r in refs[1:12]]
    assert rig.run(pack_request(Op.WRITE, 0, 64, eleven)) == Status.OKAY
    assert rig.run(pack_request(Op.WRITE, 0, sectors - 88, eleven)) == Status.OKAY
    whole = [(r, 0, 7) for r in refs[12:268]]
    for _ in range(2):
        assert rig.indirect(Op.WRITE, 1024, whole) == Status.OKAY
    order = list(range(268, 280))
    rng.shuffle(order)
    assert rig.indirect(Op.WRITE, 4096, [(refs[i], 0, 7) for i in order]) == Status.OKAY
    assert rig.dispatched == []
    assert rig.disk(8, 1) == data[:PAGE_SIZE]
    assert rig.disk(sectors - 88, 11) == data[PAGE_SIZE : 12 * PAGE_SIZE]
    assert rig.disk(1024, 256) == data[12 * PAGE_SIZE : 268 * PAGE_SIZE]
    stats = rig.blk.stats
    assert (stats.wr_req, stats.wr_sect) == (6, 8 * (1 + 11 + 11 + 256 + 256 + 12))

    # Read everything back into the other pages, through the fast path too.
    def read(sector: int, n: int) -> bytes:
        dest = [(r, 0, 7) for r in refs[PAGES - n :]]
        if n <= 11:
            assert rig.run(pack_request(Op.READ, 0, sector, dest)) == Status.OKAY
        else:
            assert rig.indirect(Op.READ, sector, dest) == Status.OKAY
        return b"".join(bytes(rig.page(i)) for i in range(PAGES - n, PAGES))

    assert read(8, 1) == data[:PAGE_SIZE]
    assert read(64, 11) == data[PAGE_SIZE : 12 * PAGE_SIZE]
    assert read(sectors - 88, 11) == data[PAGE_SIZE : 12 * PAGE_SIZE]
    assert read(1024, 256) == data[12 * PAGE_SIZE : 268 * PAGE_SIZE]
    assert read(4096, 12) == b"".join(data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in order)
    assert rig.dispatched == []
    assert (stats.rd_req, stats.rd_sect) == (
        PAGES + 1 + 5,
        8 * (PAGES + 12 + 1 + 11 + 11 + 256 + 12),
    )


def test_io_that_waits_is_answered_once(rig: Rig, seed: int) -> None:
    """Requests the page cache cannot serve at once go to a coroutine, answered once."""
    rng = random.Random(seed)
    rig.watch()
    backend = rig.blk.backend
    backend.try_preadv = backend.try_pwritev = lambda *_: False  # type: ignore[method-assign]
    data = rng.randbytes(11 * PAGE_SIZE)
    for i in range(11):
        rig.page(i)[:] = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
    segs = [(r, 0, 7) for r in rig.refs[:11]]
    assert rig.run(pack_request(Op.WRITE, 0, 16, segs)) == Status.OKAY
    assert rig.disk(16, 11) == data
    dest = [(r, 0, 7) for r in rig.refs[20:31]]
    assert rig.run(pack_request(Op.READ, 0, 16, dest)) == Status.OKAY
    assert b"".join(bytes(rig.page(i)) for i in range(20, 31)) == data
    assert rig.dispatched == []


def test_partial_pages_take_the_fast_path(rig: Rig) -> None:
    """Segments of part of a page: their sectors only, in order, merged where adjacent."""
    rig.watch()
    refs = rig.refs
    for i in range(4):
        rig.page(i)[:] = bytes([0x10 + i]) * PAGE_SIZE
    # Sectors 3..7 of page 0 and 0..4 of page 1 (adjacent: one buffer), then 2..2 of
    # page 3: 11 sectors.
    segs = [(refs[0], 3, 7), (refs[1], 0, 4), (refs[3], 2, 2)]
    assert rig.run(pack_request(Op.WRITE, 0, 200, segs)) == Status.OKAY
    assert rig.run(pack_request(Op.READ, 0, 200, [(refs[10], 0, 7), (refs[11], 0, 2)])) == (
        Status.OKAY
    )
    got = bytes(rig.page(10)) + bytes(rig.page(11))[: 3 * SECTOR_SIZE]
    assert got == b"\x10" * 5 * SECTOR_SIZE + b"\x11" * 5 * SECTOR_SIZE + b"\x13" * SECTOR_SIZE
    assert rig.dispatched == []


def test_what_is_not_common_leaves_the_fast_path(rig: Rig) -> None:
    """A ref not kept, a malformed segment, a request past the end: before any I/O."""
    rig.watch()
    table, refs = rig.table, rig.refs
    fresh = table.grant(table.alloc_frame(), 0, readonly=False)
    sectors = DISK // SECTOR_SIZE
    for raw in (
        pack_request(Op.READ, 0, 0, [(fresh, 0, 7)]),
        pack_request(Op.READ, 0, 0, [(refs[0], 0, 8)]),
        pack_request(Op.READ, 0, 0, [(refs[0], 5, 4)]),
        pack_request(Op.WRITE, 0, sectors - 7, [(refs[0], 0, 7)]),
        pack_request(Op.FLUSH_DISKCACHE, 0, 0, [(refs[0], 0, 7)]),
        pack_indirect(Op.FLUSH_DISKCACHE, 0, 0, 12, [rig.ind]),
        pack_indirect(Op.READ, 0, 0, 513, [rig.ind]),
    ):
        rig.front.sring.buf[rig.front.sring.offset(rig.front.req_prod_pvt) :][: len(raw)] = raw
        rig.front.req_prod_pvt = (rig.front.req_prod_pvt + 1) & U32
        rig.front.push_requests()
        rig.blk._kick()
        assert rig.dispatched[-1] == raw[: len(rig.dispatched[-1])]
    assert len(rig.dispatched) == 7
