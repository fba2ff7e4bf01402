"""blkif: the Xen block-device ring protocol's wire layout, sans I/O.

Everything here is bytes in, values out: request and response structs for the x86-64
ABI, op and status codes, ring geometry, and ``parse_request``, which turns one 112-byte
ring entry into a checked request or a ``BadRequest`` carrying the status to answer
with. No asyncio, no mmap; the ring, grants and the server live in sibling modules.

References: xen/include/public/io/blkif.h and io/ring.h (2007, plus the later DISCARD
and INDIRECT additions); Linux blkback ``dispatch_rw_block_io`` for the checks; the
offsets are those in ../shared/spec/blktap.md section 4.2, measured with gcc on x86-64.
"""

from __future__ import annotations

import enum
import operator
import struct
from dataclasses import dataclass
from itertools import repeat
from typing import NamedTuple

PAGE_SIZE = 4096
#: "sector_number, first_sect, last_sect and sectors are always 512-byte units,
#: whatever sector-size says" (blkif.h, made explicit in 2009).
SECTOR_SIZE = 512
SECTORS_PER_PAGE = PAGE_SIZE // SECTOR_SIZE
#: BLKIF_MAX_SEGMENTS_PER_REQUEST: "keeps the ring within a page".
MAX_SEGMENTS = 11
#: Largest transfer one request carries: 11 pages of 4 KiB.
MAX_REQUEST_BYTES = MAX_SEGMENTS * PAGE_SIZE
#: BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST: indirect_grefs[] in an indirect request.
MAX_INDIRECT_PAGES = 8
#: Segment descriptors in one indirect page.
SEGMENTS_PER_INDIRECT_PAGE = 512
#: What we offer in ``feature-max-indirect-segments``: Linux blkback's
#: MAX_INDIRECT_SEGMENTS, 1 MiB per request in 4 KiB pages.
MAX_INDIRECT_SEGMENTS = 256
#: The xenstore key of the indirect-segment feature.
FEATURE_INDIRECT = "feature-max-indirect-segments"
#: Written by both ends; when both say 1 "the frontend will reuse the same grants for
#: all transactions, allowing the backend to map them with write access" (blkif.h).
FEATURE_PERSISTENT = "feature-persistent"


class Op(enum.IntEnum):
    """BLKIF_OP_*; the feature key that advertises each is in FEATURE_KEYS."""

    READ = 0
    WRITE = 1
    WRITE_BARRIER = 2
    FLUSH_DISKCACHE = 3
    RESERVED_1 = 4  # SLES "packet" command; never valid
    DISCARD = 5
    INDIRECT = 6  # offered with feature-max-indirect-segments


class Status(enum.IntEnum):
    """BLKIF_RSP_*."""

    OKAY = 0
    ERROR = -1
    EOPNOTSUPP = -2


class VdiskInfo(enum.IntFlag):
    """VDISK_* bits of the ``info`` key."""

    CDROM = 0x1
    REMOVABLE = 0x2
    READONLY = 0x4


#: blkif_request_discard.flag
DISCARD_SECURE = 0x1

#: The xenstore key a backend writes to offer each optional op.
FEATURE_KEYS = {
    Op.WRITE_BARRIER: "feature-barrier",
    Op.FLUSH_DISKCACHE: "feature-flush-cache",
    Op.DISCARD: "feature-discard",
}

#: The ``protocol`` values meaning the x86-64 layout ("native" when the key is absent).
PROTOCOL = "x86_64-abi"

# struct blkif_request (x86-64): operation@0 nr_segments@1 handle@2 pad@4 id@8
# sector_number@16 seg[11]@24, each seg {gref@0 first_sect@4 last_sect@5 pad@6}; 112 bytes.
REQUEST_HEADER = struct.Struct("<BBH4xQQ")
SEGMENT = struct.Struct("<IBB2x")
REQUEST = struct.Struct("<BBH4xQQ" + "IBB2x" * MAX_SEGMENTS)
# struct blkif_request_indirect: operation@0 indirect_op@1 nr_segments@2 (u16) id@8
# sector_number@16 handle@24 indirect_grefs[8]@28, pad to 64 bytes. Its segments are in
# the indirect pages, 512 blkif_request_segment each.
INDIRECT_REQUEST = struct.Struct("<BBH4xQQH2x8I4x")
# struct blkif_request_discard: operation@0 flag@1 handle@2 id@8 sector_number@16
# nr_sectors@24; 32 bytes.
DISCARD_REQUEST = struct.Struct("<BBH4xQQQ")
# struct blkif_response: id@0 operation@8 pad@9 status@10 (int16); 16 bytes with tail pad.
RESPONSE = struct.Struct("<QBxh4x")
#: Offset of ``id`` in every request layout: the one field a bad request still yields.
ID_OFFSET = 8
ID = struct.Struct("<Q")

# One assert per layout, so that each can fail on its own.
assert REQUEST.size == 112
assert RESPONSE.size == 16
assert DISCARD_REQUEST.size == 32
assert INDIRECT_REQUEST.size == 64
assert REQUEST_HEADER.size + MAX_SEGMENTS * SEGMENT.size == REQUEST.size

# struct blkif_sring: req_prod@0 req_event@4 rsp_prod@8 rsp_event@12 pad[48]@16 ring[]@64
RING_HEADER = struct.Struct("<IIII48x")
RING_HEADER_SIZE = RING_HEADER.size
#: A ring slot is the union of request and response.
ENTRY_SIZE = max(REQUEST.size, RESPONSE.size)


def ring_size(page_size: int = PAGE_SIZE, entry_size: int = ENTRY_SIZE) -> int:
    """__RING_SIZE: the slots that fit after the header, rounded down to a power of two.

    ring.h does the rounding with the __RD2..__RD32 macro cascade; this is the same
    "highest set bit" in one step.
    """
    fit = (page_size - RING_HEADER_SIZE) // entry_size
    if fit < 1:
        raise ValueError(f"a {page_size}-byte page holds no {entry_size}-byte entries")
    return 1 << (fit.bit_length() - 1)


#: 32 on x86-64: (4096 - 64) / 112 = 36, rounded down.
RING_SIZE = ring_size()
#: Grants a backend keeps mapped persistently. blkif.h: "ideally it should be RING_SIZE *
#: BLKIF_MAX_SEGMENTS_PER_REQUEST"; with indirect requests a full ring holds up to 256
#: data pages and an indirect page per slot, so that many (8224: a dict entry each).
MAX_PERSISTENT_GRANTS = RING_SIZE * (MAX_INDIRECT_SEGMENTS + 1)


class Segment(NamedTuple):
    """One blkif_request_segment: sectors first_sect..last_sect (inclusive) of a page.

    A NamedTuple, not a dataclass: up to 11 are built per request on the hot path.
    """

    gref: int
    first_sect: int
    last_sect: int

    @property
    def nsect(self) -> int:
        return self.last_sect - self.first_sect + 1


@dataclass(frozen=True, slots=True)
class Request:
    """A checked READ, WRITE, WRITE_BARRIER or FLUSH_DISKCACHE request."""

    operation: Op
    handle: int
    id: int
    sector_number: int
    segments: tuple[Segment, ...]
    #: Total sectors over all segments; they are consecutive on the disk.
    nr_sectors: int


@dataclass(frozen=True, slots=True)
class DiscardRequest:
    """A checked BLKIF_OP_DISCARD request."""

    operation: Op
    flag: int
    handle: int
    id: int
    sector_number: int
    nr_sectors: int


@dataclass(frozen=True, slots=True)
class IndirectRequest:
    """A checked BLKIF_OP_INDIRECT header; its segments are still in the indirect pages."""

    operation: Op  # indirect_op: READ or WRITE
    handle: int
    id: int
    sector_number: int
    nr_segments: int
    #: The grant refs of the ceil(nr_segments / 512) indirect pages.
    indirect_grefs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Response:
    """One blkif_response."""

    id: int
    operation: int
    status: int


class BadRequest(Exception):
    """A request the backend refuses; answer ``id`` with ``status`` and carry on."""

    def __init__(self, id: int, operation: int, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.id = id
        self.operation = operation
        self.status = status
        self.reason = reason


_RW_OPS = frozenset({Op.READ, Op.WRITE, Op.WRITE_BARRIER, Op.FLUSH_DISKCACHE})
#: Ops that may come with no data: an empty barrier or cache flush (blkback accepts
#: nseg == 0 only with REQ_PREFLUSH).
_EMPTY_OK = frozenset({Op.WRITE_BARRIER, Op.FLUSH_DISKCACHE})


def parse_request(
    raw: bytes | bytearray | memoryview, *, sectors: int, nr_grefs: int, max_indirect: int = 0
) -> Request | DiscardRequest | IndirectRequest:
    """Decode and check one ring entry.

    ``raw`` should be a private copy of the slot: the frontend can rewrite shared memory
    at any time, so checking and then re-reading the slot would be a TOCTOU hole.
    ``sectors`` is the disk size in 512-byte sectors, ``nr_grefs`` the size of the
    frontend's grant table, ``max_indirect`` the feature-max-indirect-segments offered
    (0: BLKIF_OP_INDIRECT is not). Raises ``BadRequest`` with ERROR for a malformed
    request and EOPNOTSUPP for an op this backend does not know. An indirect request
    comes back as an ``IndirectRequest``: map its pages, then ``parse_indirect``.
    """
    op_code, nseg, handle, req_id, sector = REQUEST_HEADER.unpack_from(raw)
    try:
        op = Op(op_code)
    except ValueError:
        raise BadRequest(
            req_id, op_code, Status.EOPNOTSUPP, f"unknown operation {op_code}"
        ) from None

    if op is Op.DISCARD:
        _, flag, handle, req_id, sector, count = DISCARD_REQUEST.unpack_from(raw)
        if sector + count > sectors:
            raise BadRequest(
                req_id, op, Status.ERROR, f"discard of sectors {sector}+{count} past {sectors}"
            )
        return DiscardRequest(op, flag, handle, req_id, sector, count)
    if op is Op.INDIRECT and max_indirect:
        return _parse_indirect_header(raw, max_indirect)
    if op not in _RW_OPS:
        raise BadRequest(req_id, op, Status.EOPNOTSUPP, f"operation {op.name} is not offered")

    # blkback: "nseg == 0 && !PREFLUSH || nseg > BLKIF_MAX_SEGMENTS_PER_REQUEST" -> error
    if nseg > MAX_SEGMENTS or (nseg == 0 and op not in _EMPTY_OK):
        raise BadRequest(req_id, op, Status.ERROR, f"bad nr_segments {nseg}")
    segments, total = _segments(raw, REQUEST_HEADER.size, nseg, req_id, op, nr_grefs)
    # vbd_translate: "(sector_number + nr_sects) > vbd_sz" -> access denied
    if nseg and sector + total > sectors:
        raise BadRequest(
            req_id, op, Status.ERROR, f"sectors {sector}+{total} past the end ({sectors})"
        )
    return Request(op, handle, req_id, sector, segments, total)


def _parse_indirect_header(
    raw: bytes | bytearray | memoryview, max_indirect: int
) -> IndirectRequest:
    _, op_code, nseg, req_id, sector, handle, *grefs = INDIRECT_REQUEST.unpack_from(raw)
    # blkback: "Invalid indirect operation" unless READ or WRITE; answered with it.
    if op_code not in (Op.READ, Op.WRITE):
        raise BadRequest(req_id, op_code, Status.ERROR, f"bad indirect_op {op_code}")
    op = Op(op_code)
    # blkback: "nseg == 0 || nseg > MAX_INDIRECT_SEGMENTS" -> error
    if not 0 < nseg <= max_indirect:
        raise BadRequest(req_id, op, Status.ERROR, f"bad indirect nr_segments {nseg}")
    pages = -(-nseg // SEGMENTS_PER_INDIRECT_PAGE)  # INDIRECT_PAGES(nseg)
    return IndirectRequest(op, handle, req_id, sector, nseg, tuple(grefs[:pages]))


def parse_indirect(
    ireq: IndirectRequest, descriptors: bytes, *, sectors: int, nr_grefs: int
) -> Request:
    """The request an indirect header and a private copy of its segment array make."""
    op, req_id, sector = ireq.operation, ireq.id, ireq.sector_number
    segments, total = _segments(descriptors, 0, ireq.nr_segments, req_id, op, nr_grefs)
    if sector + total > sectors:
        raise BadRequest(
            req_id, op, Status.ERROR, f"sectors {sector}+{total} past the end ({sectors})"
        )
    return Request(op, ireq.handle, req_id, sector, segments, total)


_SEGMENT_ARRAYS: dict[int, struct.Struct] = {}


def segment_array(n: int) -> struct.Struct:
    """blkif_request_segment[n], compiled once per count."""
    st = _SEGMENT_ARRAYS.get(n)
    if st is None:
        st = _SEGMENT_ARRAYS[n] = struct.Struct("<" + "IBB2x" * n)
    return st


#: segment_array(n) for the n <= 11 a direct request carries, indexed by n (a tuple
#: index on blkback's fast path instead of a call and a dict lookup).
DIRECT_SEGMENTS = tuple(segment_array(n) for n in range(MAX_SEGMENTS + 1))


def _segments(
    raw: bytes | bytearray | memoryview, offset: int, nseg: int, req_id: int, op: int, nr_grefs: int
) -> tuple[tuple[Segment, ...], int]:
    """Decode and check ``nseg`` segments (only those: the unused slots are not looked at)."""
    fields = segment_array(nseg).unpack_from(raw, offset)
    if nseg > MAX_SEGMENTS:
        # An indirect request's hundreds of segments: the same checks as the loop below,
        # as C-level passes over the fields (half the time at 256 segments, the most of
        # a 1 MiB request's Python). A bad segment is found again by the loop, which
        # names it.
        grefs, firsts, lasts = fields[0::3], fields[1::3], fields[2::3]
        if (
            max(lasts) < SECTORS_PER_PAGE
            and max(grefs) < nr_grefs
            and not any(map(operator.gt, firsts, lasts))
        ):
            segs = tuple(
                map(tuple.__new__, repeat(Segment), zip(grefs, firsts, lasts, strict=True))
            )
            return segs, sum(lasts) - sum(firsts) + nseg
    return _check_segments(fields, nseg, req_id, op, nr_grefs)


def _check_segments(
    fields: tuple[int, ...], nseg: int, req_id: int, op: int, nr_grefs: int
) -> tuple[tuple[Segment, ...], int]:
    """Check the segments one by one: the reference, and the message for a bad one."""
    segments = []
    total = 0
    for i in range(0, 3 * nseg, 3):
        gref, first, last = fields[i : i + 3]
        # blkback: "last_sect >= (XEN_PAGE_SIZE >> 9) || last_sect < first_sect" -> error
        if last >= SECTORS_PER_PAGE or first > last:
            raise BadRequest(
                req_id, op, Status.ERROR, f"segment {i // 3}: bad sectors {first}..{last}"
            )
        if gref >= nr_grefs:
            raise BadRequest(
                req_id, op, Status.ERROR, f"segment {i // 3}: grant ref {gref} outside the table"
            )
        segments.append(Segment(gref, first, last))
        total += last - first + 1
    return tuple(segments), total


def request_id(raw: bytes | bytearray | memoryview) -> int:
    """The ``id`` of a ring entry, readable whatever else is wrong with it."""
    return int(ID.unpack_from(raw, ID_OFFSET)[0])


def pack_request(
    operation: int,
    id: int,
    sector_number: int,
    segments: list[tuple[int, int, int]] | tuple[tuple[int, int, int], ...] = (),
    *,
    handle: int = 0,
    nr_segments: int | None = None,
) -> bytes:
    """Build a 112-byte request; ``nr_segments`` may lie (tests build bad requests)."""
    if len(segments) > MAX_SEGMENTS:
        raise ValueError(f"at most {MAX_SEGMENTS} segments fit in a request")
    flat: list[int] = []
    for seg in segments:
        flat.extend(seg)
    flat.extend([0, 0, 0] * (MAX_SEGMENTS - len(segments)))
    nseg = len(segments) if nr_segments is None else nr_segments
    return REQUEST.pack(operation, nseg, handle, id, sector_number, *flat)


def pack_indirect(
    indirect_op: int,
    id: int,
    sector_number: int,
    nr_segments: int,
    indirect_grefs: list[int] | tuple[int, ...],
    *,
    handle: int = 0,
) -> bytes:
    """Build a BLKIF_OP_INDIRECT request, padded to a full ring entry."""
    grefs = list(indirect_grefs) + [0] * (MAX_INDIRECT_PAGES - len(indirect_grefs))
    return INDIRECT_REQUEST.pack(
        Op.INDIRECT, indirect_op, nr_segments, id, sector_number, handle, *grefs
    ).ljust(ENTRY_SIZE, b"\0")


def pack_segments(segments: list[tuple[int, int, int]] | tuple[tuple[int, int, int], ...]) -> bytes:
    """blkif_request_segment[], as an indirect page holds them."""
    return segment_array(len(segments)).pack(*(x for seg in segments for x in seg))


def pack_discard(
    id: int, sector_number: int, nr_sectors: int, *, flag: int = 0, handle: int = 0
) -> bytes:
    """Build a discard request, padded to a full ring entry."""
    return DISCARD_REQUEST.pack(Op.DISCARD, flag, handle, id, sector_number, nr_sectors).ljust(
        ENTRY_SIZE, b"\0"
    )


def unpack_response(raw: bytes | bytearray | memoryview, offset: int = 0) -> Response:
    return Response(*RESPONSE.unpack_from(raw, offset))
