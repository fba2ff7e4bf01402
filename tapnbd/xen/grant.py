"""Grant table emulation: a frontend's pages, shared with the backend by reference.

In Xen a guest owns its memory and lists, in a grant table, which of its page frames
another domain may map; the other domain maps a page by (domain, grant ref) and the
hypervisor checks the entry. Here the "guest memory" and its grant table are one
memfd that the frontend creates and both processes mmap::

    page 0                 header: magic, owner domid, nr_grefs, nr_frames
    page 1 ...             grant_entry_v1[nr_grefs]: {u16 flags; u16 domid; u32 frame}
    after the entries      nr_frames data pages of 4 KiB ("guest memory")

The frontend grants a frame (``GrantTable.grant``) and ends access when the request is
done; the backend maps by ref (``GrantMapper.map``), which checks the entry as
GNTTABOP_map_grant_ref does. Not emulated: the GTF_reading/GTF_writing busy bits, so a
frontend that ends access to a page the backend is using is not stopped.

The memory is not a file in the vbd directory but a memfd sealed against shrinking
and growing, handed to the backend over the event channel (SCM_RIGHTS). A mapped file
that shrinks turns the backend's next access of the lost pages into SIGBUS, which
would let any frontend kill it; a sealed memfd cannot shrink, and the backend refuses
memory without the seal (memfd_create(2): "F_SEAL_SHRINK ... the file size cannot be
reduced"). Seals are never removed, so checking them once, before fstat, holds for
the mapping's whole life.

References: xen/include/public/grant_table.h (grant_entry_v1, GTF_*, GNTST_*); Linux
drivers/xen/grant-table.c (NR_RESERVED_ENTRIES, free-list allocation).
"""

from __future__ import annotations

import enum
import fcntl
import mmap
import operator
import os
import stat
import struct
from typing import TYPE_CHECKING, cast

from tapnbd.xen.blkif import PAGE_SIZE, SECTOR_SIZE, SECTORS_PER_PAGE, SEGMENT, segment_array

if TYPE_CHECKING:
    from collections.abc import Iterable

# grant_table.h
GTF_INVALID = 0
GTF_PERMIT_ACCESS = 1
GTF_TYPE_MASK = 3
GTF_READONLY = 1 << 2
#: Refs 0..7 are reserved (console, xenstore); guests allocate from 8.
GNTTAB_NR_RESERVED_ENTRIES = 8

ENTRY = struct.Struct("<HHI")
HEADER = struct.Struct("<8sHxxII")
MAGIC = b"TAPGNT01"
#: The seals a frontend puts on its memory; the backend needs F_SEAL_SHRINK.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
#: The most memory a backend maps for one frontend (the default table is ~36 MiB).
MAX_TABLE_SIZE = 1 << 30
#: The persistent-grant map of a mapper that keeps none (never written).
_NOTHING_KEPT: dict[int, int] = {}
#: Segments past which map_kept checks in bulk (a direct request has at most 11).
_BULK = 11
#: first_sect and last_sect of the segments of whole pages, to compare in bulk.
_FIRST_SECTS = (0,) * (PAGE_SIZE // 8)
_LAST_SECTS = (SECTORS_PER_PAGE - 1,) * (PAGE_SIZE // 8)
#: One blkif_request_segment in an indirect page.
SEGMENT_SIZE = SEGMENT.size
#: Segment arrays whose single buffer map_kept_indirect remembers (each up to 4 KiB).
_MAX_RUNS = 64
#: GTF_INVALID entries, to end access to a run of refs in one copy.
_NO_ENTRIES = memoryview(bytes(PAGE_SIZE))


class GrantStatus(enum.IntEnum):
    """GNTST_* results of a map operation."""

    OKAY = 0
    GENERAL_ERROR = -1
    BAD_DOMAIN = -2
    BAD_GNTREF = -3
    PERMISSION_DENIED = -8
    BAD_PAGE = -9


class GrantError(Exception):
    """A grant could not be mapped; ``status`` says why."""

    def __init__(self, status: GrantStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class _Layout:
    """Offsets of the three regions, from the header's two counts."""

    def __init__(self, nr_grefs: int, nr_frames: int) -> None:
        self.nr_grefs = nr_grefs
        self.nr_frames = nr_frames
        self.entries = PAGE_SIZE
        self.frames = self.entries + _round_up(nr_grefs * ENTRY.size, PAGE_SIZE)
        self.size = self.frames + nr_frames * PAGE_SIZE


class GrantTable:
    """The frontend's side: owns the memory, allocates frames and grant refs."""

    def __init__(self, fd: int, mm: mmap.mmap, domid: int, layout: _Layout) -> None:
        #: The memfd, to hand to the backend (``EventChannel.send_fd``).
        self.fd = fd
        self.domid = domid
        self.nr_grefs = layout.nr_grefs
        self.nr_frames = layout.nr_frames
        self._mm = mm
        self._mem = memoryview(mm)
        self._entries = layout.entries
        self._frames = layout.frames
        # Stacks, so recently freed (cache-warm) frames and refs are reused first.
        self._free_frames = list(range(layout.nr_frames - 1, -1, -1))
        self._free_refs = list(range(layout.nr_grefs - 1, GNTTAB_NR_RESERVED_ENTRIES - 1, -1))

    @classmethod
    def create(
        cls, *, domid: int, nr_frames: int, nr_grefs: int | None = None, seals: int = SEALS
    ) -> GrantTable:
        """Make fresh memory (a memfd, sealed with ``seals``) and an empty table in it."""
        if nr_grefs is None:
            nr_grefs = nr_frames + GNTTAB_NR_RESERVED_ENTRIES
        layout = _Layout(nr_grefs, nr_frames)
        fd = os.memfd_create(f"tapnbd-gnttab-{domid}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, layout.size)
            if seals:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            mm = mmap.mmap(fd, layout.size, mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        HEADER.pack_into(mm, 0, MAGIC, domid, nr_grefs, nr_frames)
        return cls(fd, mm, domid, layout)

    @property
    def free_frames(self) -> int:
        return len(self._free_frames)

    @property
    def free_refs(self) -> int:
        return len(self._free_refs)

    @property
    def memory(self) -> memoryview:
        """The whole table file; ``frame_offset`` says where a page is in it."""
        return self._mem

    def frame_offset(self, n: int) -> int:
        return self._frames + n * PAGE_SIZE

    def frame(self, n: int) -> memoryview:
        """Page ``n`` of the guest memory."""
        off = self._frames + n * PAGE_SIZE
        return self._mem[off : off + PAGE_SIZE]

    def alloc_frame(self) -> int:
        return self._free_frames.pop()

    def free_frame(self, n: int) -> None:
        self._free_frames.append(n)

    def grant(self, frame: int, domid: int, *, readonly: bool) -> int:
        """gnttab_grant_foreign_access: let ``domid`` map ``frame``; returns the ref.

        ``readonly`` for pages the backend only reads (the data of a WRITE request).
        """
        ref = self._free_refs.pop()
        self.grant_ref(ref, frame, domid, readonly=readonly)
        return ref

    def grant_ref(self, ref: int, frame: int, domid: int, *, readonly: bool) -> None:
        """gnttab_grant_foreign_access_ref: fill an entry the caller allocated."""
        off = self._entries + ref * ENTRY.size
        # frame and domid before flags (the wmb() in gnttab_grant_foreign_access): one
        # 8-byte store here, and the ref only reaches the backend through the ring.
        flags = GTF_PERMIT_ACCESS | (GTF_READONLY if readonly else 0)
        ENTRY.pack_into(self._mem, off, flags, domid, frame)

    def alloc_run(self, count: int, *, refs: bool = False) -> int:
        """The first of ``count`` consecutive free frames (or refs), now allocated.

        Takes the top of the free stack, which in a fresh table is consecutive; a
        frontend reserves its per-slot pages this way right after creating the table.
        """
        free = self._free_refs if refs else self._free_frames
        run = free[-count:][::-1]
        if len(run) < count or run[-1] - run[0] != count - 1:
            raise ValueError(f"no run of {count} free {'refs' if refs else 'frames'}")
        del free[-count:]
        return run[0]

    def run_entries(self, frame: int, count: int, domid: int, *, readonly: bool) -> bytes:
        """The grant_entry_v1 array granting frames frame..frame+count-1 to ``domid``."""
        flags = GTF_PERMIT_ACCESS | (GTF_READONLY if readonly else 0)
        return b"".join(ENTRY.pack(flags, domid, frame + i) for i in range(count))

    def set_entries(self, ref: int, entries: bytes | memoryview) -> None:
        """Write consecutive entries from ``ref`` on (from ``run_entries``): one copy."""
        off = self._entries + ref * ENTRY.size
        self._mem[off : off + len(entries)] = entries

    def end_run(self, ref: int, count: int) -> None:
        """gnttab_end_foreign_access_ref on ``count`` consecutive refs; they stay allocated."""
        off = self._entries + ref * ENTRY.size
        n = count * ENTRY.size
        self._mem[off : off + n] = _NO_ENTRIES[:n] if n <= len(_NO_ENTRIES) else bytes(n)

    def end_access(self, ref: int) -> None:
        """gnttab_end_foreign_access_ref, then give the ref back to the free list."""
        ENTRY.pack_into(self._mem, self._entries + ref * ENTRY.size, GTF_INVALID, 0, 0)
        self._free_refs.append(ref)

    def close(self) -> None:
        self._mem.release()
        try:
            self._mm.close()
        except BufferError:
            pass  # a page view is still held; the mapping goes when it is collected
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _map_sealed(fd: int) -> mmap.mmap:
    """mmap all of a memfd that cannot shrink, or raise GrantError saying why not."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = -1  # not shmem: a plain file can be truncated under the mapping
    if seals < 0 or not seals & fcntl.F_SEAL_SHRINK:
        raise GrantError(
            GrantStatus.BAD_DOMAIN,
            "the frontend's memory is not a memfd sealed with F_SEAL_SHRINK",
        )
    # The size can no longer shrink, so what fstat says stays mapped.
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or not PAGE_SIZE <= st.st_size <= MAX_TABLE_SIZE:
        raise GrantError(
            GrantStatus.BAD_DOMAIN,
            f"the frontend's memory is {st.st_size} bytes, not {PAGE_SIZE}..{MAX_TABLE_SIZE}",
        )
    try:
        return mmap.mmap(fd, st.st_size, mmap.MAP_SHARED)
    except OSError as e:
        raise GrantError(
            GrantStatus.GENERAL_ERROR, f"cannot map the frontend's memory: {e}"
        ) from None


def _merged(mem: memoryview, runs: list[tuple[int, int, int]]) -> list[memoryview]:
    """The sectors each (page offset, first_sect, last_sect) names, runs that are
    adjacent in memory as one buffer, as the block layer merges bio_vecs: a request of
    consecutive pages is one iovec for preadv."""
    out: list[memoryview] = []
    start = end = -1
    for page, first, last in runs:
        a = page + first * SECTOR_SIZE
        if a != end:
            if end >= 0:
                out.append(mem[start:end])
            start = a
        end = page + (last + 1) * SECTOR_SIZE
    if end >= 0:
        out.append(mem[start:end])
    return out


class GrantMapper:
    """The backend's side: maps another domain's granted pages by reference."""

    def __init__(self, fd: int, *, domid: int = 0, owner: int | None = None) -> None:
        """Map ``owner``'s memory from ``fd``; ``domid`` is the mapping (backend) domain.

        Takes ``fd`` over: it is closed on return, and the mapping stays.
        """
        try:
            mm = _map_sealed(fd)
        finally:
            os.close(fd)
        magic, table_owner, nr_grefs, nr_frames = HEADER.unpack_from(mm, 0)
        layout = _Layout(nr_grefs, nr_frames)
        if magic != MAGIC:
            mm.close()
            raise GrantError(GrantStatus.BAD_DOMAIN, "the frontend's memory has no grant table")
        if layout.size > (size := len(mm)):
            mm.close()
            raise GrantError(
                GrantStatus.BAD_DOMAIN,
                f"grant table header: nr_grefs {nr_grefs} and nr_frames {nr_frames} need "
                f"{layout.size} bytes, the memory has {size}",
            )
        if owner is not None and owner != table_owner:
            mm.close()
            raise GrantError(
                GrantStatus.BAD_DOMAIN, f"grant table header: domid {table_owner}, not {owner}"
            )
        self.domid = domid
        self.owner = table_owner
        self.nr_grefs = nr_grefs
        self.nr_frames = nr_frames
        self._mm = mm
        self._mem = memoryview(mm)
        self._entries = layout.entries
        self._frames = layout.frames
        self.maps = 0
        #: feature-persistent: ref -> offset of its page, for grants mapped once and
        #: kept (``persist``); None when every map checks the table entry.
        self._persistent: dict[int, int] | None = None
        self._max_persistent = 0
        #: map_kept_indirect's answers: segment descriptors -> (offset, sectors).
        self._runs: dict[bytes, tuple[int, int]] = {}

    def _frame_of(self, ref: int, readonly: bool) -> int:
        """Xen's checks of a map request; the granted frame."""
        if not 0 <= ref < self.nr_grefs:
            raise GrantError(GrantStatus.BAD_GNTREF, f"grant ref {ref} is outside the table")
        flags, domid, frame = ENTRY.unpack_from(self._mem, self._entries + ref * ENTRY.size)
        if flags & GTF_TYPE_MASK != GTF_PERMIT_ACCESS:
            raise GrantError(GrantStatus.BAD_GNTREF, f"grant ref {ref} is not granted")
        if domid != self.domid:
            raise GrantError(
                GrantStatus.PERMISSION_DENIED, f"grant ref {ref} is for domain {domid}"
            )
        if not readonly and flags & GTF_READONLY:
            raise GrantError(
                GrantStatus.PERMISSION_DENIED, f"grant ref {ref} is read-only, mapped for write"
            )
        if frame >= self.nr_frames:
            raise GrantError(GrantStatus.BAD_PAGE, f"grant ref {ref} names frame {frame}")
        return int(frame)

    def persist(self, limit: int) -> None:
        """Map grants persistently from now on (both ends offered ``feature-persistent``).

        The first map of a ref checks its entry as Xen does, always for write access
        (blkif.h note 8: "the frontend driver has to allow the backend driver to map all
        grants with write access, even when they should be mapped read-only"), and keeps
        the page; later maps of the ref reuse it without reading the table again, as
        blkback's persistent_gnts tree does. A frontend that re-grants a kept ref to
        another frame, or revokes it, still gets the page it first granted: that is
        what Xen does while a grant stays mapped, and the page was checked to be its
        own. At most ``limit`` refs are kept, so a frontend that hands new refs every
        time costs no memory; past the limit every map checks the table again.
        """
        self._persistent = {}
        self._max_persistent = limit

    @property
    def persistent(self) -> int:
        """Grants kept mapped (0 when not persistent)."""
        return len(self._persistent) if self._persistent is not None else 0

    def _page_of(self, ref: int, readonly: bool) -> int:
        """Offset of the page behind ``ref`` in the mapping, after Xen's checks."""
        kept = self._persistent
        if kept is None:
            return self._frames + self._frame_of(ref, readonly) * PAGE_SIZE
        off = kept.get(ref)
        if off is None:
            off = self._frames + self._frame_of(ref, False) * PAGE_SIZE
            if len(kept) < self._max_persistent:
                kept[ref] = off
        return off

    def map(self, ref: int, *, readonly: bool) -> memoryview:
        """GNTTABOP_map_grant_ref: the 4 KiB page behind ``ref``, after Xen's checks."""
        off = self._page_of(ref, readonly)
        self.maps += 1
        return self._mem[off : off + PAGE_SIZE]

    def map_segments(
        self, segments: Iterable[tuple[int, int, int]], *, readonly: bool
    ) -> list[memoryview]:
        """Map each (ref, first_sect, last_sect) and return the sectors they name,
        adjacent runs as one buffer (``_merged``)."""
        page_of = self._page_of
        kept = self._persistent if self._persistent is not None else _NOTHING_KEPT
        runs = []
        for ref, first, last in segments:
            page = kept.get(ref)
            runs.append((page_of(ref, readonly) if page is None else page, first, last))
        self.maps += len(runs)
        return _merged(self._mem, runs)

    def map_kept_indirect(self, ref: int, nseg: int) -> tuple[list[memoryview], int] | None:
        """``map_kept`` of the ``nseg`` segments in kept ref ``ref``'s (indirect) page.

        The descriptors are copied out of the page once. A copy seen before whose
        segments made one buffer is answered from a small cache keyed by the bytes
        themselves: a kept ref never changes, so neither does the answer, and a
        frontend that reuses its slots (blkfront does) pays a copy and a dict lookup
        instead of checking hundreds of segments. The cache holds at most
        ``_MAX_RUNS`` entries, so a frontend that never repeats itself costs no memory.
        """
        kept = self._persistent
        page = kept.get(ref) if kept else None
        size = nseg * SEGMENT_SIZE
        if page is None or size > PAGE_SIZE:
            return None
        desc = bytes(self._mem[page : page + size])
        run = self._runs.get(desc)
        if run is not None:
            start, nsect = run
            self.maps += nseg
            return [self._mem[start : start + nsect * SECTOR_SIZE]], nsect
        fields = segment_array(nseg).unpack(desc)
        mapped = self.map_kept(fields)
        if mapped is not None and len(mapped[0]) == 1 and kept is not None:
            if len(self._runs) >= _MAX_RUNS:
                self._runs.clear()
            self._runs[desc] = (kept[fields[0]] + fields[1] * SECTOR_SIZE, mapped[1])
        return mapped

    def map_kept(self, fields: tuple[int, ...]) -> tuple[list[memoryview], int] | None:
        """``map_segments`` for segments whose refs are all kept (persistent grants).

        ``fields`` is (ref, first_sect, last_sect) per segment, flat, as unpacked from a
        request. Returns the buffers (adjacent runs merged) and the sectors they hold,
        or None when grants are not persistent, a ref is not kept yet, or a segment is
        malformed: the caller then takes the checked path, which maps or names the
        fault. A kept ref was checked when it was first mapped, so nothing is read from
        the grant table here.
        """
        kept = self._persistent
        if not kept:
            return None
        mem = self._mem
        if len(fields) == 3:  # one segment: a 4 KiB request
            ref, first, last = fields
            page = kept.get(ref)
            # blkback: "last_sect >= (XEN_PAGE_SIZE >> 9) || last_sect < first_sect"
            if page is None or last >= SECTORS_PER_PAGE or first > last:
                return None
            self.maps += 1
            return [mem[page + first * SECTOR_SIZE : page + (last + 1) * SECTOR_SIZE]], (
                last - first + 1
            )
        n = len(fields) // 3
        if n > _BULK:
            # An indirect request's hundreds of segments, checked in C-level passes (as
            # blkif._segments does); the usual case, consecutive whole pages from the
            # first segment's start to the last one's end, is one buffer.
            pages = list(map(kept.get, fields[0::3]))
            firsts, lasts = fields[1::3], fields[2::3]
            if (
                None in pages
                or max(lasts) >= SECTORS_PER_PAGE
                or any(map(operator.gt, firsts, lasts))
            ):
                return None
            total = sum(lasts) - sum(firsts) + n
            p0, pn = cast("int", pages[0]), cast("int", pages[-1])
            if (
                pages == list(range(p0, p0 + n * PAGE_SIZE, PAGE_SIZE))
                and firsts[1:] == _FIRST_SECTS[: n - 1]
                and lasts[:-1] == _LAST_SECTS[: n - 1]
            ):
                self.maps += n
                return [
                    mem[p0 + firsts[0] * SECTOR_SIZE : pn + (lasts[-1] + 1) * SECTOR_SIZE]
                ], total
        runs = []
        total = 0
        for i in range(0, len(fields), 3):
            page = kept.get(fields[i])
            first = fields[i + 1]
            last = fields[i + 2]
            if page is None or last >= SECTORS_PER_PAGE or first > last:
                return None
            runs.append((page, first, last))
            total += last - first + 1
        if not runs:
            return None
        self.maps += len(runs)
        return _merged(mem, runs), total

    def close(self) -> None:
        """Unmap; pages still referenced by in-flight I/O keep the mapping alive."""
        self._mem.release()
        try:
            self._mm.close()
        except BufferError:
            pass  # a slice is still in use; the mapping goes when it is collected
