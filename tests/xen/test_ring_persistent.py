"""Persistent grants (``feature-persistent``): granted once, kept mapped, still checked.

blkif.h: with both ends offering it, "the frontend will reuse the same grants for all
transactions, allowing the backend to map them with write access". The frontend
grants its pages once; the backend checks each ref the first time it maps it and
keeps the page. A hostile frontend that claims the feature and then hands other
grants, moves or revokes them, must still not get the backend to touch a page it did
not grant, nor to keep more than MAX_PERSISTENT_GRANTS refs.
"""

from __future__ import annotations

import os
import random

import pytest

from tapnbd.xen.blkif import PAGE_SIZE, Op, Status, pack_indirect, pack_request, pack_segments
from tapnbd.xen.frontend import BlkFront, Io
from tapnbd.xen.grant import GrantError, GrantMapper, GrantStatus, GrantTable
from tests.xen.ringproc import RingFactory

MiB = 1 << 20


def pattern(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


def _entries(front: BlkFront) -> bytes:
    """The frontend's grant entries, as the backend would read them."""
    start = PAGE_SIZE
    return bytes(front.grants.memory[start : front.grants.frame_offset(0)])


@pytest.mark.parametrize("persistent", [True, False])
def test_persistent_grants_are_written_once(ring: RingFactory, persistent: bool, seed: int) -> None:
    """With the feature no request writes a grant entry; without it, I/O still works."""
    rng = random.Random(seed)  # the seed fixture prints it on failure
    backend = ring("ram:64M")
    with BlkFront(backend.path, persistent=persistent) as front:
        assert front.persistent is persistent
        table = _entries(front)
        # 4 KiB (one segment), 44 KiB (11: a full direct request), 1 MiB (indirect).
        blocks = [(rng.randrange(64 * MiB // bs) * bs, bs) for bs in (4096, 45056, MiB) * 20]
        ios = [front.submit_write(off, pattern(i & 0xFF, n)) for i, (off, n) in enumerate(blocks)]
        front.wait(ios)
        for io in ios:
            io.result()
        # Concurrent writes that overlap land in no defined order: check the others.
        # (Every block counts, not one per offset: a 4 KiB block may start where a
        # 1 MiB one does.)
        for i, (off, n) in enumerate(blocks):
            if all(j == i or o + m <= off or off + n <= o for j, (o, m) in enumerate(blocks)):
                want = pattern(i & 0xFF, n)
                assert front.read(off, n) == want, f"{n} bytes at {off} (seed {seed})"
        if persistent:
            # Granted at connect for write access, never rewritten or revoked.
            assert _entries(front) == table
    connected = "persistent grants" in backend.stderr()
    assert connected is persistent


@pytest.mark.parametrize("persistent", [True, False])
def test_reads_of_any_size_and_page_offset(ring: RingFactory, persistent: bool, seed: int) -> None:
    """Reads from one sector to past 1 MiB, starting anywhere in their first page:
    BlkFront's one-request path and its split path read back what was written."""
    rng = random.Random(seed)
    backend = ring("ram:4M")
    with BlkFront(backend.path, persistent=persistent) as front:
        image = rng.randbytes(2 * MiB)
        front.write(0, image)
        ios = []
        for _ in range(200):
            n = 512 * rng.choice([1, 7, 8, 9, 64, 88, 89, 2049, 2100, rng.randrange(1, 600)])
            off = 512 * rng.randrange((len(image) - n) // 512)
            po = 512 * rng.randrange(8)
            ios.append((off, n, po, front.submit_read(off, n, page_offset=po)))
        front.wait([io for *_, io in ios])
        for off, n, po, io in ios:
            got = io.result()
            assert got is not None and bytes(got) == image[off : off + n], (n, off, po)


def test_persistent_frontend_cannot_steer_the_backend(ring: RingFactory) -> None:
    """Read-only grants, moved and revoked refs, refs and frames out of range."""
    backend = ring("ram:8M")
    with BlkFront(backend.path) as front:
        assert front.persistent
        front.write(0, pattern(0x11, 4096) + pattern(0x22, 4096) + pattern(0x33, 4096))
        grants = front.grants
        a, b, ro = grants.alloc_frame(), grants.alloc_frame(), grants.alloc_frame()
        grants.frame(ro)[:] = pattern(0xA5, PAGE_SIZE)
        ref = grants.grant(a, 0, readonly=False)
        ref_ro = grants.grant(ro, 0, readonly=True)
        outside = grants.grant(0, 0, readonly=False)
        grants.grant_ref(outside, grants.nr_frames, 0, readonly=False)  # past the memory

        def raw(op: Op, sector: int, gref: int) -> Status:
            io = front.submit_raw(pack_request(op, 0, sector, [(gref, 0, 7)]))
            front.wait(io)
            return Status(io.status)

        # Persistent grants are mapped for write access, so a read-only one is refused
        # even for write data (blkback maps them without GNTMAP_readonly).
        assert raw(Op.WRITE, 64, ref_ro) == Status.ERROR
        assert raw(Op.READ, 0, outside) == Status.ERROR
        assert raw(Op.READ, 0, grants.nr_grefs) == Status.ERROR
        # First use maps and keeps frame a.
        assert raw(Op.READ, 0, ref) == Status.OKAY
        assert bytes(grants.frame(a)) == pattern(0x11, 4096)
        # The ref now names frame b: the backend keeps the page it mapped, as Xen keeps
        # a mapped grant, and b (never granted) is not written.
        grants.grant_ref(ref, b, 0, readonly=False)
        assert raw(Op.READ, 8, ref) == Status.OKAY
        assert bytes(grants.frame(a)) == pattern(0x22, 4096)
        assert bytes(grants.frame(b)) == bytes(4096)
        # Revoked, or pointed past the memory: still the kept page, nothing else.
        grants.end_access(ref)
        assert raw(Op.READ, 16, ref) == Status.OKAY
        assert bytes(grants.frame(a)) == pattern(0x33, 4096)
        grants.grant_ref(ref, grants.nr_frames + 100, 0, readonly=False)
        assert raw(Op.WRITE, 24, ref) == Status.OKAY
        assert front.read(24 * 512, 4096) == pattern(0x33, 4096)
        assert bytes(grants.frame(b)) == bytes(4096)
        # And the ring goes on serving a well-behaved stream.
        front.write(MiB, pattern(0x5C, 3 * 4096))
        assert front.read(MiB, 3 * 4096) == pattern(0x5C, 3 * 4096)
    assert backend.proc.poll() is None


def test_kept_grants_do_not_excuse_malformed_requests(ring: RingFactory, seed: int) -> None:
    """blkback's fast path (kept refs, page-cache hits) checks what the slow path does.

    Every ref below is kept before it is abused, so that each bad request reaches the
    fast path: bad sectors, too many or no segments, past the end, a segment whose
    ref is not granted, an indirect page holding a bad segment. Each gets ERROR, good
    writes in flight beside them land, and hand-built requests of pages that are not
    consecutive in memory still read and write the right bytes.
    """
    rng = random.Random(seed)
    backend = ring("ram:8M")
    with BlkFront(backend.path) as front:
        assert front.persistent
        sectors = front.sectors
        grants = front.grants
        frames = [grants.alloc_frame() for _ in range(14)]
        refs = [grants.grant(f, 0, readonly=False) for f in frames]
        ind_frame = grants.alloc_frame()
        ind = grants.grant(ind_frame, 0, readonly=False)
        never_granted = grants.nr_grefs - 1

        def run(raw: bytes) -> Status:
            io = front.submit_raw(raw)
            front.wait(io)
            return Status(io.status)

        # Keep every ref: a read of each page, and an indirect read of 12 of them in an
        # order that is not consecutive in memory (the bulk check's slow branch).
        for r in refs:
            assert run(pack_request(Op.READ, 0, 0, [(r, 0, 7)])) == Status.OKAY
        scattered = refs[:12]
        rng.shuffle(scattered)
        data = rng.randbytes(12 * PAGE_SIZE)
        for i, r in enumerate(scattered):
            grants.frame(frames[refs.index(r)])[:] = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        grants.frame(ind_frame)[: 12 * 8] = pack_segments([(r, 0, 7) for r in scattered])
        assert run(pack_indirect(Op.WRITE, 0, 64, 12, [ind])) == Status.OKAY
        assert run(pack_indirect(Op.WRITE, 0, 64, 12, [ind])) == Status.OKAY  # ind kept now
        assert front.read(64 * 512, 12 * PAGE_SIZE) == data

        a, b = refs[12], refs[13]
        bad = {
            "first > last": pack_request(Op.READ, 0, 0, [(a, 4, 3)]),
            "last > 7": pack_request(Op.WRITE, 0, 0, [(a, 0, 8)]),
            "first > 7": pack_request(Op.WRITE, 0, 0, [(a, 9, 9)]),
            "past the end": pack_request(Op.READ, 0, sectors - 4, [(a, 0, 7)]),
            "just past the end": pack_request(Op.WRITE, 0, sectors - 15, [(a, 0, 7), (b, 0, 7)]),
            "nr_segments 12": pack_request(Op.READ, 0, 0, [(a, 0, 7)], nr_segments=12),
            "nr_segments 0": pack_request(Op.READ, 0, 0, [], nr_segments=0),
            "second ref not granted": pack_request(
                Op.READ, 0, 0, [(a, 0, 7), (never_granted, 0, 7)]
            ),
            "indirect, 257 segments": pack_indirect(Op.READ, 0, 0, 257, [ind]),
            "indirect past the end": pack_indirect(Op.READ, 0, sectors - 8, 12, [ind]),
            "indirect flush": pack_indirect(Op.FLUSH_DISKCACHE, 0, 0, 12, [ind]),
            "indirect page not granted": pack_indirect(Op.READ, 0, 0, 12, [never_granted]),
        }
        good_data = pattern(0x5A, PAGE_SIZE)
        grants.frame(frames[13])[:] = good_data
        good = pack_request(Op.WRITE, 0, 8, [(b, 0, 7)])
        ios: list[tuple[str, Io]] = []
        for name, raw in bad.items():
            ios.append((name, front.submit_raw(raw)))
            ios.append(("good write", front.submit_raw(good)))
        front.wait([io for _, io in ios])
        got = {(name, Status(io.status)) for name, io in ios}
        assert got == {
            (name, Status.OKAY if name == "good write" else Status.ERROR) for name, _ in ios
        }
        # An indirect page of kept refs with one bad segment: pages scattered, or
        # consecutive (one buffer if the segments were good).
        for order, i, bad_seg in (
            (scattered, 5, (0, 8)),
            (scattered, 11, (6, 5)),
            (refs[:12], 11, (0, 8)),
            (refs[:12], 0, (8, 7)),
            (refs[:12], 6, (0, 8)),
        ):
            segs = [(r, 0, 7) for r in order]
            segs[i] = (order[i], *bad_seg)
            grants.frame(ind_frame)[: 12 * 8] = pack_segments(segs)
            assert run(pack_indirect(Op.WRITE, 0, 0, 12, [ind])) == Status.ERROR, (i, bad_seg)
        assert front.read(8 * 512, PAGE_SIZE) == good_data
        assert front.read(64 * 512, 12 * PAGE_SIZE) == data
        # Consecutive pages, but page 6 only half used: not one buffer.
        mem = b"".join(bytes(grants.frame(f)) for f in frames[:12])
        # Each twice: blkback remembers the answer for descriptors it has seen. The page
        # after the twelve must not be written.
        grants.frame(frames[12])[:] = pattern(0x77, PAGE_SIZE)
        for half, want in (
            ((0, 7), mem),
            ((0, 3), mem[: 6 * PAGE_SIZE + 2048] + mem[7 * PAGE_SIZE :]),
            ((4, 7), mem[: 6 * PAGE_SIZE] + mem[6 * PAGE_SIZE + 2048 :]),
        ) * 2:
            segs = [(r, 0, 7) for r in refs[:12]]
            segs[6] = (refs[6], *half)
            grants.frame(ind_frame)[: 12 * 8] = pack_segments(segs)
            front.write(200 * 512, bytes(13 * PAGE_SIZE))
            assert run(pack_indirect(Op.WRITE, 0, 200, 12, [ind])) == Status.OKAY
            back = front.read(200 * 512, 13 * PAGE_SIZE)
            assert back == want + bytes(13 * PAGE_SIZE - len(want)), half
    assert backend.proc.poll() is None
    assert "bad request" in backend.stderr()


def test_grant_mapper_keeps_at_most_its_limit() -> None:
    """In-process: the first map of a ref is checked, the kept set is bounded, and a
    ref past the limit is checked again on every map."""
    table = GrantTable.create(domid=3, nr_frames=12)
    mapper = GrantMapper(os.dup(table.fd), domid=0, owner=3)
    try:
        mapper.persist(4)
        refs = [table.grant(table.alloc_frame(), 0, readonly=False) for _ in range(8)]
        for i, r in enumerate(refs):
            table.frame(i)[:1] = bytes([i])
            (view,) = mapper.map_segments([(r, 0, 7)], readonly=True)
            assert view[0] == i
        assert mapper.persistent == 4
        # Kept: refs[0] still maps after revocation. Not kept: refs[7] is checked.
        table.end_access(refs[0])
        table.end_access(refs[7])
        assert mapper.map(refs[0], readonly=False)[0] == 0
        with pytest.raises(GrantError) as info:
            mapper.map(refs[7], readonly=False)
        assert info.value.status is GrantStatus.BAD_GNTREF
        ro = table.grant(table.alloc_frame(), 0, readonly=True)
        with pytest.raises(GrantError) as info:
            mapper.map_segments([(ro, 0, 7)], readonly=True)
        assert info.value.status is GrantStatus.PERMISSION_DENIED
        assert mapper.persistent == 4
    finally:
        mapper.close()
        table.close()
