"""Unit tests for the sans-I/O parts: blkif layout and checks, ring.h macros, grants.

The real-process tests (test_ring.py) drive all of this end to end; these pin the
corner cases that a busy run rarely reaches: indices wrapping at 2**32, the exact
notify rules, and each malformed request on its own.
"""

from __future__ import annotations

import array
import fcntl
import json
import logging
import os
import re
import socket
import struct
from pathlib import Path

import pytest

from tapnbd.xen.blkif import (
    ENTRY_SIZE,
    MAX_SEGMENTS,
    PAGE_SIZE,
    RING_SIZE,
    BadRequest,
    DiscardRequest,
    IndirectRequest,
    Op,
    Request,
    Status,
    pack_discard,
    pack_request,
    parse_request,
    request_id,
    ring_size,
    unpack_response,
)
from tapnbd.xen.evtchn import EventChannel, EventChannelClosed, UnboundPort, bind_interdomain
from tapnbd.xen.grant import (
    HEADER,
    MAGIC,
    GrantError,
    GrantMapper,
    GrantStatus,
    GrantTable,
)
from tapnbd.xen.ring import U32, BackRing, FrontRing, SharedRing
from tapnbd.xen.xenstore import XenbusState, XenStore, XenStoreError, parse_store

SECTORS = 1 << 20  # a 512 MiB disk
NR_GREFS = 64


def parse(raw: bytes) -> Request | DiscardRequest | IndirectRequest:
    return parse_request(raw, sectors=SECTORS, nr_grefs=NR_GREFS)


def refused(raw: bytes) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse(raw)
    return info.value


# blkif layout


def test_request_layout_matches_blkif_h_offsets() -> None:
    raw = pack_request(
        Op.WRITE, 0x1122334455667788, 0xAABBCCDD, [(9, 1, 6), (10, 0, 7)], handle=0x0102
    )
    assert len(raw) == ENTRY_SIZE == 112
    # operation@0 nr_segments@1 handle@2 id@8 sector_number@16 seg[0]@24 seg[1]@32
    assert raw[0] == Op.WRITE and raw[1] == 2
    assert struct.unpack_from("<H", raw, 2)[0] == 0x0102
    assert struct.unpack_from("<Q", raw, 8)[0] == 0x1122334455667788
    assert struct.unpack_from("<Q", raw, 16)[0] == 0xAABBCCDD
    assert struct.unpack_from("<IBB", raw, 24) == (9, 1, 6)
    assert struct.unpack_from("<IBB", raw, 32) == (10, 0, 7)
    discard = pack_discard(7, 100, 200, flag=1)
    assert len(discard) == ENTRY_SIZE
    # blkif_request_discard: flag@1, nr_sectors@24
    assert discard[0] == Op.DISCARD and discard[1] == 1
    assert struct.unpack_from("<QQQ", discard, 8) == (7, 100, 200)
    rsp = struct.pack("<QBxh4x", 42, Op.READ, -2)
    assert unpack_response(rsp) == unpack_response(rsp[:16])
    assert (unpack_response(rsp).id, unpack_response(rsp).status) == (42, Status.EOPNOTSUPP)


def test_ring_geometry() -> None:
    # (4096 - 64) / 112 = 36 slots fit; __RING_SIZE rounds down to a power of two.
    assert RING_SIZE == ring_size(4096) == 32
    assert ring_size(8192) == 64
    assert ring_size(64 + 112) == 1
    with pytest.raises(ValueError):
        ring_size(64 + 111)


def test_good_requests_parse() -> None:
    req = parse(pack_request(Op.READ, 5, 1000, [(8, 0, 7), (9, 0, 3)]))
    assert isinstance(req, Request)
    assert (req.operation, req.id, req.sector_number, req.nr_sectors) == (Op.READ, 5, 1000, 12)
    assert [s.nsect for s in req.segments] == [8, 4]
    # 11 full segments, ending exactly at the last sector of the disk.
    full = [(8 + i, 0, 7) for i in range(MAX_SEGMENTS)]
    req = parse(pack_request(Op.WRITE, 6, SECTORS - 88, full))
    assert isinstance(req, Request) and req.nr_sectors == 88
    # Empty flush and barrier are allowed (REQ_PREFLUSH without data).
    for op in (Op.FLUSH_DISKCACHE, Op.WRITE_BARRIER):
        req = parse(pack_request(op, 7, 0, []))
        assert isinstance(req, Request) and req.segments == ()
    d = parse(pack_discard(8, SECTORS - 10, 10))
    assert isinstance(d, DiscardRequest) and d.nr_sectors == 10


@pytest.mark.parametrize(
    ("raw", "status", "why"),
    [
        (pack_request(Op.READ, 1, 0, [], nr_segments=0), Status.ERROR, "nr_segments"),
        (pack_request(Op.WRITE, 1, 0, [], nr_segments=0), Status.ERROR, "nr_segments"),
        (pack_request(Op.READ, 1, 0, [(8, 0, 7)], nr_segments=12), Status.ERROR, "nr_segments"),
        (pack_request(Op.READ, 1, 0, [(8, 0, 7)], nr_segments=255), Status.ERROR, "nr_segments"),
        (pack_request(Op.READ, 1, 0, [(8, 5, 4)]), Status.ERROR, "sectors"),
        (pack_request(Op.READ, 1, 0, [(8, 0, 8)]), Status.ERROR, "sectors"),
        (pack_request(Op.WRITE, 1, 0, [(8, 8, 8)]), Status.ERROR, "sectors"),
        (pack_request(Op.READ, 1, SECTORS - 7, [(8, 0, 7)]), Status.ERROR, "past the end"),
        (pack_request(Op.READ, 1, SECTORS, [(8, 0, 0)]), Status.ERROR, "past the end"),
        (pack_request(Op.READ, 1, 2**64 - 1, [(8, 0, 0)]), Status.ERROR, "past the end"),
        (pack_discard(1, SECTORS - 1, 2), Status.ERROR, "past"),
        (pack_request(Op.READ, 1, 0, [(NR_GREFS, 0, 7)]), Status.ERROR, "grant ref"),
        (pack_request(Op.READ, 1, 0, [(8, 0, 7), (2**32 - 1, 0, 7)]), Status.ERROR, "grant"),
        (pack_request(9, 1, 0, [(8, 0, 7)]), Status.EOPNOTSUPP, "unknown operation"),
        (pack_request(255, 1, 0, []), Status.EOPNOTSUPP, "unknown operation"),
        (pack_request(Op.RESERVED_1, 1, 0, [(8, 0, 7)]), Status.EOPNOTSUPP, "not offered"),
        (pack_request(Op.INDIRECT, 1, 0, [(8, 0, 7)]), Status.EOPNOTSUPP, "not offered"),
    ],
)
def test_malformed_requests_are_refused(raw: bytes, status: Status, why: str) -> None:
    # The id must survive so that the answer reaches the right request.
    raw = raw[:8] + struct.pack("<Q", 0xDEADBEEF) + raw[16:]
    e = refused(raw)
    assert e.status is status
    assert e.id == 0xDEADBEEF == request_id(raw)
    assert why in e.reason


# ring.h macros


def make_ring(start: int = 0) -> tuple[SharedRing, FrontRing, BackRing]:
    sring = SharedRing(memoryview(bytearray(4096)))
    sring.init(start)
    return sring, FrontRing(sring, start), BackRing(sring, start)


def produce(front: FrontRing, n: int) -> bool:
    """Fill n slots with their index and push; returns the notify verdict."""
    for _ in range(n):
        off = front.sring.offset(front.req_prod_pvt)
        struct.pack_into("<I", front.sring.buf, off, front.req_prod_pvt)
        front.req_prod_pvt = (front.req_prod_pvt + 1) & U32
    return front.push_requests_and_check_notify()


def consume_and_answer(back: BackRing) -> list[int]:
    """Consume every published request, answer each with its own index; return them."""
    got = []
    while back.has_unconsumed_requests():
        off = back.sring.offset(back.req_cons)
        got.append(struct.unpack_from("<I", back.sring.buf, off)[0])
        back.req_cons = (back.req_cons + 1) & U32
        struct.pack_into("<I", back.sring.buf, back.sring.offset(back.rsp_prod_pvt), got[-1])
        back.rsp_prod_pvt = (back.rsp_prod_pvt + 1) & U32
    return got


def test_shared_ring_init_and_index_fields() -> None:
    sring, _, _ = make_ring()
    assert (sring.req_prod, sring.req_event, sring.rsp_prod, sring.rsp_event) == (0, 1, 0, 1)
    sring.rsp_event = 2**32 + 5  # stored modulo 2**32, as RING_IDX is unsigned int
    assert sring.rsp_event == 5
    assert struct.unpack_from("<IIII", sring.buf) == (0, 1, 0, 5)
    assert bytes(sring.buf[16:64]) == bytes(48)
    with pytest.raises(ValueError):
        SharedRing(memoryview(bytes(4096)))


@pytest.mark.parametrize("start", [0, 2**32 - 3, 2**32 - 32, 2**32 - 1])
def test_indices_wrap_across_2_32(start: int) -> None:
    sring, front, back = make_ring(start)
    seen: list[int] = []
    expect = [(start + i) & U32 for i in range(200)]
    while len(seen) < 200:
        n = min(front.free_requests(), 7, 200 - ((front.req_prod_pvt - start) & U32))
        if n:
            produce(front, n)
        got = consume_and_answer(back)
        back.push_responses_and_check_notify()
        seen += got
        # The frontend consumes the responses, which carry the request's index.
        while front.has_unconsumed_responses():
            off = sring.offset(front.rsp_cons)
            assert struct.unpack_from("<I", sring.buf, off)[0] == front.rsp_cons
            front.rsp_cons = (front.rsp_cons + 1) & U32
    assert seen == expect
    assert front.free_requests() == front.nr_ents
    assert sring.req_prod == sring.rsp_prod == (start + 200) & U32


def test_full_ring_across_the_wrap() -> None:
    sring, front, back = make_ring(2**32 - 10)
    produce(front, 32)
    assert front.full() and front.free_requests() == 0
    # The backend sees exactly a ring's worth; taking them all without answering any
    # leaves no room for a 33rd request's response.
    assert back.has_unconsumed_requests() == 32
    back.req_cons = (back.req_cons + 32) & U32
    assert back.has_unconsumed_requests() == 0
    assert back.request_cons_overflow(back.req_cons)
    back.rsp_prod_pvt = back.req_cons
    assert not back.request_cons_overflow(back.req_cons)
    back.push_responses()
    assert front.has_unconsumed_responses() == 32
    front.rsp_cons = sring.rsp_prod
    assert front.free_requests() == 32 and not front.full()


def test_backend_never_trusts_more_than_a_ring_of_requests() -> None:
    sring, _, back = make_ring(2**32 - 4)
    sring.req_prod = (2**32 - 4 + 33) & U32  # a frontend claiming 33 requests
    assert back.request_prod_overflow(sring.req_prod)
    assert back.has_unconsumed_requests() == 32
    sring.req_prod = (2**32 - 4 + 32) & U32
    assert not back.request_prod_overflow(sring.req_prod)


def test_request_notify_rules() -> None:
    """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY and RING_FINAL_CHECK_FOR_REQUESTS."""
    start = 2**32 - 2  # run the whole scenario across the wrap
    sring, front, back = make_ring(start)
    # req_event starts at start + 1: the first push crosses it and must kick.
    assert produce(front, 1)
    # The backend has not re-armed: pushes while it is busy do not kick.
    assert not produce(front, 3)
    assert not produce(front, 2)
    assert len(consume_and_answer(back)) == 6
    # Drained: the final check arms req_event = req_cons + 1 and finds nothing.
    assert back.final_check_for_requests() == 0
    assert sring.req_event == (start + 7) & U32
    # The next push crosses req_event again: one kick for the batch.
    assert produce(front, 4)
    # Work that arrives between the check and the arming is seen by the re-check.
    consume_and_answer(back)
    sring.req_prod = front.req_prod_pvt = (front.req_prod_pvt + 1) & U32  # races in
    assert back.final_check_for_requests() == 1


def test_response_notify_rules() -> None:
    sring, front, back = make_ring(2**32 - 1)
    produce(front, 5)
    consume_and_answer(back)
    # rsp_event starts at start + 1: the first responses cross it.
    assert back.push_responses_and_check_notify()
    produce(front, 2)
    consume_and_answer(back)
    # The frontend has not consumed nor re-armed: no kick.
    assert not back.push_responses_and_check_notify()
    assert front.has_unconsumed_responses() == 7
    front.rsp_cons = sring.rsp_prod
    assert front.final_check_for_responses() == 0
    assert sring.rsp_event == (front.rsp_cons + 1) & U32
    produce(front, 3)
    consume_and_answer(back)
    assert back.push_responses_and_check_notify()


def test_notify_is_only_for_an_event_inside_the_pushed_range() -> None:
    sring, front, _ = make_ring()
    sring.req_event = 10
    assert not produce(front, 9)  # 0 -> 9: event 10 not reached
    assert produce(front, 1)  # 9 -> 10: crosses it
    assert not produce(front, 5)  # 10 -> 15: already past


# Grant tables


def test_grant_table_shares_pages_and_checks_like_xen() -> None:
    table = GrantTable.create(domid=3, nr_frames=4)
    mapper = GrantMapper(os.dup(table.fd), domid=0, owner=3)
    try:
        assert (mapper.nr_grefs, mapper.nr_frames) == (12, 4)
        frame = table.alloc_frame()
        ref = table.grant(frame, 0, readonly=False)
        assert ref == 8  # refs 0..7 are reserved; 8, 9, 10 are granted here
        table.frame(frame)[:5] = b"hello"
        page = mapper.map(ref, readonly=False)
        assert bytes(page[:5]) == b"hello"
        page[4096 - 3 :] = b"end"
        assert bytes(table.frame(frame)[-3:]) == b"end"

        ro = table.grant(table.alloc_frame(), 0, readonly=True)
        assert mapper.map(ro, readonly=True)
        other = table.grant(table.alloc_frame(), 7, readonly=False)
        cases = {
            GrantStatus.BAD_GNTREF: [12, 2**32 - 1, 11],  # 11: in the table, never granted
            GrantStatus.PERMISSION_DENIED: [other],
        }
        for status, refs in cases.items():
            for r in refs:
                with pytest.raises(GrantError) as info:
                    mapper.map(r, readonly=True)
                assert info.value.status is status
        with pytest.raises(GrantError) as info:
            mapper.map(ro, readonly=False)
        assert info.value.status is GrantStatus.PERMISSION_DENIED
        table.end_access(ref)
        with pytest.raises(GrantError):
            mapper.map(ref, readonly=False)
        with pytest.raises(GrantError, match="domid 3, not 4"):
            GrantMapper(os.dup(table.fd), owner=4)
        # The seals hold: the frontend cannot pull pages from under the mapping.
        with pytest.raises(PermissionError):
            os.ftruncate(table.fd, PAGE_SIZE)
    finally:
        mapper.close()
        table.close()


def test_grant_mapper_refuses_memory_that_can_shrink(tmp_path: Path) -> None:
    """Memory that could be truncated under the mapping (SIGBUS) is never mapped."""
    unsealed = GrantTable.create(domid=1, nr_frames=2, seals=0)
    grow_only = GrantTable.create(domid=1, nr_frames=2, seals=fcntl.F_SEAL_GROW)
    plain = tmp_path / "gnttab-1"
    plain.write_bytes(bytes(unsealed.memory))
    try:
        # GrantMapper takes each descriptor over (and closes it).
        for fd in (os.dup(unsealed.fd), os.dup(grow_only.fd), os.open(plain, os.O_RDWR)):
            with pytest.raises(GrantError, match="not a memfd sealed with F_SEAL_SHRINK"):
                GrantMapper(fd, owner=1)
    finally:
        unsealed.close()
        grow_only.close()


def test_grant_mapper_checks_the_header_against_the_memory() -> None:
    table = GrantTable.create(domid=2, nr_frames=2)
    try:
        # A header that claims more frames than the memory holds.
        HEADER.pack_into(table.memory, 0, MAGIC, 2, 10, 1000)
        with pytest.raises(GrantError, match="nr_frames 1000 need"):
            GrantMapper(os.dup(table.fd), owner=2)
        HEADER.pack_into(table.memory, 0, b"NOTGRANT", 2, 10, 2)
        with pytest.raises(GrantError, match="no grant table"):
            GrantMapper(os.dup(table.fd), owner=2)
    finally:
        table.close()


def test_xenstore_transactions_and_states(tmp_path: Path) -> None:
    xs = XenStore(tmp_path)
    d = "/local/domain/1/device/vbd/51712"
    assert xs.state(d) is XenbusState.UNKNOWN
    xs.write_many({f"{d}/ring-ref": 8, f"{d}/event-channel": 3, f"{d}/x/y": "z"})
    xs.switch_state(d, XenbusState.INITIALISED)
    assert xs.ls(d) == {"ring-ref": "8", "event-channel": "3", "state": "3"}
    assert xs.read_int(f"{d}/ring-ref") == 8
    xs.rm(f"{d}/x")
    assert xs.read(f"{d}/x/y") is None
    assert xs.wait(lambda s: s.get(f"{d}/state"), timeout=1) == "3"
    with pytest.raises(TimeoutError):
        xs.wait(lambda s: None, timeout=0.05)


# The memory hand-over on the event channel


async def test_event_channel_takes_exactly_one_descriptor() -> None:
    """A byte with one descriptor is the memory; none, two, or a closed peer is refused."""
    cases: list[tuple[str, list[int], str]] = [
        ("one", [0], ""),
        ("none", [], "sent 0 descriptors, not 1"),
        ("two", [0, 1], "sent 2 descriptors, not 1"),
        ("closed", [], "peer closed"),
    ]
    for name, fds, error in cases:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        front, back = EventChannel(a, 1), EventChannel(b, 1)
        opened = [os.memfd_create(f"case-{i}") for i in fds]
        try:
            if name == "closed":
                front.close()
            else:
                payload = array.array("i", opened).tobytes()
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, payload)] if opened else []
                a.sendmsg([b"\0"], ancillary)
            before = set(os.listdir("/proc/self/fd"))
            if not error:
                fd = await back.receive_fd(5)
                assert os.fstat(fd).st_ino == os.fstat(opened[0]).st_ino
                os.close(fd)
                continue
            with pytest.raises(EventChannelClosed, match=error):
                await back.receive_fd(5)
            # Descriptors that came with a refused message are closed, not leaked.
            assert set(os.listdir("/proc/self/fd")) <= before, name
        finally:
            for fd in opened:
                os.close(fd)
            front.close()
            back.close()


async def test_event_channel_waits_for_the_memory_without_blocking() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    back = EventChannel(b, 1)
    try:
        with pytest.raises(TimeoutError):
            await back.receive_fd(0.05)
    finally:
        back.close()
        a.close()


# xenstore.json as hostile input


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (b'"just a string"', "a JSON str, not an object"),
        (b'{"/a": null}', "/a: value is a NoneType, not a string"),
        (b'{"/a": {"b": "c"}}', "/a: value is a dict, not a string"),
        (b'{"a": "b"}', "key 'a' is not an absolute path"),
        (json.dumps({"/" + "k" * 3072: ""}).encode(), "is not an absolute path of at most 3072"),
        (json.dumps({"/a": "v" * 4097}).encode(), "/a: value is longer than 4096"),
        (json.dumps({f"/{i}": "" for i in range(4097)}).encode(), "4097 keys, more than 4096"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_parse_store_names_what_is_wrong(data: bytes, why: str) -> None:
    with pytest.raises(XenStoreError, match=re.escape(why)):
        parse_store(data)


def test_store_goes_on_with_the_last_valid_copy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    xs = XenStore(tmp_path)
    xs.write_many({"/a/state": 4})
    store = tmp_path / "xenstore.json"
    store.write_bytes(b"[[[")
    with caplog.at_level(logging.WARNING, logger="tapnbd.xen"):
        for _ in range(3):
            assert xs.snapshot() == {"/a/state": "4"}
    assert len(caplog.records) == 1  # one line per new reason, not one per poll
    with pytest.raises(XenStoreError, match="not JSON"):
        xs.load()
    # A write goes on from the last valid copy and replaces the garbage.
    xs.write_many({"/a/ring-ref": 8})
    assert json.loads(store.read_bytes()) == {"/a/state": "4", "/a/ring-ref": "8"}
    assert store.stat().st_mode & 0o777 == 0o600


def test_binding_a_port_that_never_accepts_fails_at_once(tmp_path: Path) -> None:
    """A frontend's listener with a full backlog must not hold the backend's loop up."""
    port = UnboundPort(tmp_path, 1, 0)
    queued: list[EventChannel] = []
    try:
        # The listener's backlog is 1 (the kernel lets one more in): fills within 16.
        with pytest.raises(EventChannelClosed, match="Resource temporarily unavailable"):
            for _ in range(16):
                queued.append(bind_interdomain(tmp_path, 1, port.port))
    finally:
        for channel in queued:
            channel.close()
        port.close()
