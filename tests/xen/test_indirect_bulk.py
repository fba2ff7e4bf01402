"""parse_indirect's bulk check of many segments against the one-by-one loop.

Requests of more than 11 segments are checked with C-level passes over the fields;
the loop stays the reference and names a bad segment. Seeded random descriptor
arrays, valid and not, must get the same answer, or the same refusal, from both.
"""

from __future__ import annotations

import random

import pytest

from tapnbd.xen.blkif import (
    MAX_SEGMENTS,
    SECTORS_PER_PAGE,
    BadRequest,
    IndirectRequest,
    Op,
    Request,
    Segment,
    _check_segments,
    pack_segments,
    parse_indirect,
    segment_array,
)

SEED = 20261201
NR_GREFS = 1 << 12
SECTORS = 1 << 24


def _one_by_one(desc: bytes, nseg: int) -> tuple[tuple[Segment, ...], int] | str:
    try:
        fields = segment_array(nseg).unpack_from(desc, 0)
        return _check_segments(fields, nseg, 9, Op.WRITE, NR_GREFS)
    except BadRequest as e:
        return e.reason


def _parsed(desc: bytes, nseg: int) -> tuple[tuple[Segment, ...], int] | str:
    ireq = IndirectRequest(Op.WRITE, 0, 9, 0, nseg, (40,))
    try:
        req = parse_indirect(ireq, desc, sectors=SECTORS, nr_grefs=NR_GREFS)
    except BadRequest as e:
        return e.reason
    assert isinstance(req, Request)
    return req.segments, req.nr_sectors


def _segment(rng: random.Random, bad: str) -> tuple[int, int, int]:
    first = rng.randrange(SECTORS_PER_PAGE)
    last = rng.randrange(first, SECTORS_PER_PAGE)
    gref = rng.randrange(NR_GREFS)
    if bad == "gref":
        gref = rng.randrange(NR_GREFS, 1 << 32)
    elif bad == "last":
        last = rng.randrange(SECTORS_PER_PAGE, 256)
    elif bad == "order" and first:
        last = rng.randrange(first)
    return gref, first, last


@pytest.mark.parametrize("bad", ["", "gref", "last", "order"])
def test_bulk_check_agrees_with_the_loop(bad: str) -> None:
    rng = random.Random(f"{SEED}-{bad}")
    print(f"seed {SEED}-{bad}")
    for _ in range(300):
        nseg = rng.randrange(MAX_SEGMENTS + 1, 513)
        segs = [_segment(rng, "") for _ in range(nseg)]
        for _ in range(rng.randrange(1, 4) if bad else 0):
            segs[rng.randrange(nseg)] = _segment(rng, bad)
        desc = pack_segments(segs)
        want = _one_by_one(desc, nseg)
        got = _parsed(desc, nseg)
        assert got == want, (nseg, segs)
        if isinstance(got, tuple):
            assert all(type(s) is Segment for s in got[0])
            assert got[1] == sum(s.nsect for s in got[0])
        elif bad:
            assert got.startswith("segment "), got
