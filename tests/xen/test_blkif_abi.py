"""blkif.py against the Linux/Xen ABI, as literal numbers.

Every value here is written out as the number in include/xen/interface/io/blkif.h
(Linux) and xen/include/public/io/blkif.h, and the struct offsets as gcc lays them out
on x86-64 (../shared/spec/blktap.md 4.2), never computed from blkif.py itself: a test
that derives its expectation from the module under test cannot see the module change.
The second half pins the edges of ``parse_request`` and ``parse_indirect`` (the last
good value and the first bad one) that a mutation run found unguarded.
"""

from __future__ import annotations

import dataclasses
import struct

import pytest

from tapnbd.xen import blkif
from tapnbd.xen.blkif import (
    BadRequest,
    DiscardRequest,
    IndirectRequest,
    Op,
    Request,
    Response,
    Segment,
    Status,
    VdiskInfo,
    pack_discard,
    pack_indirect,
    pack_request,
    pack_segments,
    parse_indirect,
    parse_request,
)

SECTORS = 1000  # a disk of 1000 sectors
NR_GREFS = 64


# The ABI, literally.


def test_constants_are_the_abi_values() -> None:
    assert blkif.PAGE_SIZE == 4096
    assert blkif.SECTOR_SIZE == 512  # "always 512-byte units, whatever sector-size says"
    assert blkif.SECTORS_PER_PAGE == 8
    assert blkif.MAX_SEGMENTS == 11  # BLKIF_MAX_SEGMENTS_PER_REQUEST
    assert blkif.MAX_REQUEST_BYTES == 45056
    assert blkif.MAX_INDIRECT_PAGES == 8  # BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
    assert blkif.SEGMENTS_PER_INDIRECT_PAGE == 512  # 4096 / sizeof(blkif_request_segment)
    assert blkif.MAX_INDIRECT_SEGMENTS == 256  # Linux blkback MAX_INDIRECT_SEGMENTS
    assert blkif.DISCARD_SECURE == 1  # BLKIF_DISCARD_SECURE (1<<0)
    assert blkif.RING_SIZE == 32  # __CONST_RING_SIZE(blkif, 4096) on x86-64
    assert blkif.RING_HEADER_SIZE == 64
    assert blkif.ENTRY_SIZE == 112
    assert blkif.ID_OFFSET == 8
    assert blkif.MAX_PERSISTENT_GRANTS == 8224  # 32 slots * (256 + 1 indirect page)
    assert blkif.PROTOCOL == "x86_64-abi"  # XEN_IO_PROTO_ABI_X86_64
    assert blkif.FEATURE_INDIRECT == "feature-max-indirect-segments"
    assert blkif.FEATURE_PERSISTENT == "feature-persistent"
    assert blkif.FEATURE_KEYS == {
        Op.WRITE_BARRIER: "feature-barrier",
        Op.FLUSH_DISKCACHE: "feature-flush-cache",
        Op.DISCARD: "feature-discard",
    }


def test_op_status_and_vdisk_numbers() -> None:
    # BLKIF_OP_*
    assert {op.name: int(op) for op in Op} == {
        "READ": 0,
        "WRITE": 1,
        "WRITE_BARRIER": 2,
        "FLUSH_DISKCACHE": 3,
        "RESERVED_1": 4,
        "DISCARD": 5,
        "INDIRECT": 6,
    }
    # BLKIF_RSP_*
    assert {s.name: int(s) for s in Status} == {"OKAY": 0, "ERROR": -1, "EOPNOTSUPP": -2}
    # VDISK_*
    assert (int(VdiskInfo.CDROM), int(VdiskInfo.REMOVABLE), int(VdiskInfo.READONLY)) == (1, 2, 4)


def test_struct_sizes() -> None:
    assert blkif.REQUEST.size == 112  # sizeof(struct blkif_request), x86-64
    assert blkif.REQUEST_HEADER.size == 24  # offsetof(struct blkif_request, u.rw.seg)
    assert blkif.SEGMENT.size == 8  # sizeof(struct blkif_request_segment)
    assert blkif.DISCARD_REQUEST.size == 32
    assert blkif.INDIRECT_REQUEST.size == 64
    assert blkif.RESPONSE.size == 16  # sizeof(struct blkif_response)
    assert blkif.RING_HEADER.size == 64  # req_prod..rsp_event, then pad[48]
    assert blkif.ID.size == 8


def test_request_offsets() -> None:
    segs = [(0x01020304, 1, 6), (0x0A0B0C0D, 0, 7), (0x11223344, 2, 2)]
    raw = pack_request(Op.WRITE, 0x1122334455667788, 0x0102030405060708, segs, handle=0xBEEF)
    assert len(raw) == 112
    assert raw[0] == 1  # operation@0
    assert raw[1] == 3  # nr_segments@1
    assert raw[2:4] == b"\xef\xbe"  # handle@2, little endian
    assert raw[4:8] == bytes(4)  # padding before the 8-byte id
    assert raw[8:16] == bytes.fromhex("8877665544332211")  # id@8
    assert raw[16:24] == bytes.fromhex("0807060504030201")  # sector_number@16
    # seg[i]@24 + 8i: gref@0 first_sect@4 last_sect@5 pad@6
    assert raw[24:32] == bytes.fromhex("04030201") + b"\x01\x06\0\0"
    assert raw[32:40] == bytes.fromhex("0d0c0b0a") + b"\x00\x07\0\0"
    assert raw[40:48] == bytes.fromhex("44332211") + b"\x02\x02\0\0"
    assert raw[48:112] == bytes(64)  # the unused seg[3..10]
    assert pack_segments(segs) == raw[24:48]


def test_discard_indirect_and_response_offsets() -> None:
    d = pack_discard(0x0102, 0x0304, 0x0506, flag=1, handle=0x0708)
    assert len(d) == 112
    assert d[:4] == b"\x05\x01\x08\x07"  # operation@0 flag@1 handle@2
    assert d[8:32] == struct.pack("<QQQ", 0x0102, 0x0304, 0x0506)  # id, sector, nr_sectors
    assert d[32:] == bytes(80)
    ind = pack_indirect(Op.WRITE, 0x99, 0x1234, 300, [0x41, 0x42], handle=0x0607)
    assert len(ind) == 112
    assert ind[:4] == b"\x06\x01\x2c\x01"  # operation@0 indirect_op@1 nr_segments@2 (u16)
    assert ind[8:16] == struct.pack("<Q", 0x99)  # id@8
    assert ind[16:24] == struct.pack("<Q", 0x1234)  # sector_number@16
    assert ind[24:26] == b"\x07\x06"  # handle@24
    assert ind[28:60] == struct.pack("<8I", 0x41, 0x42, 0, 0, 0, 0, 0, 0)  # indirect_grefs@28
    assert ind[60:] == bytes(52)
    # blkif_response: id@0 operation@8 status@10 (int16), 16 bytes.
    raw = bytes.fromhex("0807060504030201") + b"\x03\x00" + b"\xfe\xff" + bytes(4)
    assert blkif.unpack_response(raw) == Response(0x0102030405060708, 3, -2)
    assert blkif.unpack_response(bytes(16) + raw, 16) == Response(0x0102030405060708, 3, -2)


def test_ring_size_for_one_page() -> None:
    assert blkif.ring_size() == 32
    assert blkif.ring_size(4096, 112) == 32  # (4096 - 64) // 112 = 36 -> 32
    assert blkif.ring_size(4096, 16) == 128  # 252 -> 128
    assert blkif.ring_size(64 + 64 * 112, 112) == 64


# The edges of the checks.


def parse(raw: bytes, max_indirect: int = 0) -> Request | DiscardRequest | IndirectRequest:
    return parse_request(raw, sectors=SECTORS, nr_grefs=NR_GREFS, max_indirect=max_indirect)


def refused(raw: bytes, max_indirect: int = 0) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse(raw, max_indirect)
    return info.value


def test_eleven_segments_is_the_most() -> None:
    full = [(8 + i, 0, 7) for i in range(11)]
    req = parse(pack_request(Op.READ, 1, 0, full))
    assert isinstance(req, Request) and len(req.segments) == 11 and req.nr_sectors == 88
    e = refused(pack_request(Op.READ, 1, 0, full, nr_segments=12))
    assert e.status == Status.ERROR and str(e) == "bad nr_segments 12" == e.reason


def test_sector_counts_and_segment_numbers() -> None:
    req = parse(pack_request(Op.WRITE, 1, 7, [(8, 2, 6), (9, 0, 7), (10, 3, 3)]))
    assert isinstance(req, Request)
    assert [s.nsect for s in req.segments] == [5, 8, 1]
    assert req.nr_sectors == 14 and req.sector_number == 7
    assert Segment(1, 0, 7).nsect == 8
    # Errors name the segment by its index.
    e = refused(pack_request(Op.READ, 1, 0, [(8, 0, 7), (9, 0, 7), (NR_GREFS, 0, 7)]))
    assert e.reason.startswith("segment 2: grant ref 64"), e.reason
    e = refused(pack_request(Op.READ, 1, 0, [(8, 0, 7), (9, 5, 4)]))
    assert e.reason.startswith("segment 1: bad sectors 5..4"), e.reason


def test_the_last_sector_and_one_past() -> None:
    # A read that ends on the last sector; one sector more is past the end.
    assert parse(pack_request(Op.READ, 1, SECTORS - 8, [(8, 0, 7)]))
    assert refused(pack_request(Op.READ, 1, SECTORS - 7, [(8, 0, 7)])).status == Status.ERROR
    # Discards likewise; sector + count, not sector - count.
    d = parse(pack_discard(2, SECTORS - 2, 2))
    assert isinstance(d, DiscardRequest) and (d.sector_number, d.nr_sectors) == (998, 2)
    assert refused(pack_discard(2, SECTORS - 1, 2)).status == Status.ERROR
    assert refused(pack_discard(2, 1, SECTORS)).status == Status.ERROR


def test_indirect_header_edges() -> None:
    # indirect_op READ and WRITE are the only ones; nr_segments in 1..max_indirect.
    for op in (Op.READ, Op.WRITE):
        ireq = parse(pack_indirect(op, 3, 0, 256, [40]), 256)
        assert isinstance(ireq, IndirectRequest) and ireq.operation is op
        assert (ireq.nr_segments, ireq.indirect_grefs) == (256, (40,))
    e = refused(pack_indirect(Op.DISCARD, 3, 0, 1, [40]), 256)
    assert e.status == Status.ERROR and e.id == 3
    assert refused(pack_indirect(Op.READ, 3, 0, 257, [40]), 256).status == Status.ERROR
    assert refused(pack_indirect(Op.READ, 3, 0, 0, [40]), 256).status == Status.ERROR
    # Without the feature, BLKIF_OP_INDIRECT is an op not offered.
    assert refused(pack_indirect(Op.READ, 3, 0, 1, [40])).status == Status.EOPNOTSUPP
    # INDIRECT_PAGES(n): ceil(n / 512) pages of descriptors.
    grefs = [40, 41, 42]
    for nseg, pages in ((1, 1), (512, 1), (513, 2), (1024, 2), (1025, 3)):
        ireq = parse(pack_indirect(Op.READ, 3, 0, nseg, grefs), 1536)
        assert isinstance(ireq, IndirectRequest)
        assert ireq.indirect_grefs == tuple(grefs[:pages]), nseg


def test_indirect_segments_edges() -> None:
    ireq = IndirectRequest(Op.READ, 0, 9, SECTORS - 16, 2, (40,))
    desc = pack_segments([(8, 0, 7), (9, 0, 7)])
    req = parse_indirect(ireq, desc, sectors=SECTORS, nr_grefs=NR_GREFS)
    assert req.segments == (Segment(8, 0, 7), Segment(9, 0, 7)) and req.nr_sectors == 16
    past = IndirectRequest(Op.READ, 0, 9, SECTORS - 15, 2, (40,))
    with pytest.raises(BadRequest) as info:
        parse_indirect(past, desc, sectors=SECTORS, nr_grefs=NR_GREFS)
    assert info.value.status == Status.ERROR and info.value.id == 9


def test_parsed_requests_are_frozen_and_slotted() -> None:
    req = parse(pack_request(Op.READ, 1, 0, [(8, 0, 7)]))
    disc = parse(pack_discard(2, 0, 8))
    ind = parse(pack_indirect(Op.READ, 3, 0, 20, [40]), 256)
    for value in (req, disc, ind, Response(1, 0, 0)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            value.id = 5  # type: ignore[misc]
        assert not hasattr(value, "__dict__"), type(value).__name__
