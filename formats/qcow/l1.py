"""The L1 table: read in pieces, and kept in memory only where it holds entries.

A header may claim an L1 table of up to 2**28 entries (2 GiB) in a sparse file that uses
4 KiB of disk. Reading such a table whole costs gigabytes and tens of seconds before a
single check has run, and a backing chain multiplies it (issue 11). So the table is read
in pieces of ``PIECE`` entries (4 KiB), the file's holes are skipped (they read as zeros)
and a piece of zeros is never kept: memory is proportional to the entries the file
really holds, and time to the table's allocated bytes, never to the size the header
claims. The only pass over the whole claimed length is the MD5 of the Xen extension
(spec §2.3), which hashes holes from one shared zero buffer, and which meta.py skips
for tables over CKSUM_MAX_BYTES (64 MiB).

References: ../shared/spec/blktap.md §1.2 (L1 entries), §2.3 (checksum), §2.6 (byte order).
"""

from __future__ import annotations

import bisect
import hashlib
from array import array
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING

from formats.engine.tables import be_array as be_array
from formats.engine.tables import to_be_bytes as to_be_bytes
from tapnbd.driver import ExtentFlags

if TYPE_CHECKING:
    from tapnbd.driver import Driver

#: Entries per piece: 512, one 4 KiB page of table.
PIECE_BITS = 9
PIECE = 1 << PIECE_BITS
PIECE_MASK = PIECE - 1
PIECE_BYTES = PIECE * 8
#: Bytes read from the file at a time.
READ_BYTES = 1 << 20
_ZEROS = bytes(READ_BYTES)


class L1Table:
    """``size`` entries in host order; pieces that are all zeros are not stored."""

    __slots__ = ("pieces", "size")

    def __init__(self, size: int, pieces: dict[int, array[int]] | None = None) -> None:
        self.size = size
        #: Piece number -> its entries (PIECE of them; fewer in the last piece).
        self.pieces: dict[int, array[int]] = pieces if pieces is not None else {}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> int:
        p = self.pieces.get(i >> PIECE_BITS)
        return 0 if p is None else p[i & PIECE_MASK]

    def __setitem__(self, i: int, value: int) -> None:
        k = i >> PIECE_BITS
        p = self.pieces.get(k)
        if p is None:
            if not value:
                return
            p = self.pieces[k] = array("Q", bytes(8 * self.piece_len(k)))
        p[i & PIECE_MASK] = value

    def piece_len(self, k: int) -> int:
        """Entries in piece ``k`` (the last one may be short)."""
        return min(PIECE, self.size - (k << PIECE_BITS))

    def items(self) -> Iterator[tuple[int, int]]:
        """(index, entry) of every non-zero entry, in index order."""
        for k in sorted(self.pieces):
            base = k << PIECE_BITS
            for j, e in enumerate(self.pieces[k]):
                if e:
                    yield base + j, e

    def count(self) -> int:
        """Non-zero entries."""
        return sum(len(p) - p.count(0) for p in self.pieces.values())

    def disk_pieces(self) -> Iterator[tuple[int, bytes]]:
        """(byte offset in the table, big-endian bytes) of every stored piece."""
        for k in sorted(self.pieces):
            yield k * PIECE_BYTES, to_be_bytes(self.pieces[k])

    def cksum(self) -> int:
        """The extension's checksum of this table stored big-endian (spec §2.3)."""
        h = hashlib.md5(usedforsecurity=False)
        pos = 0
        for off, data in self.disk_pieces():
            _hash_zeros(h, off - pos)
            h.update(data)
            pos = off + len(data)
        _hash_zeros(h, self.size * 8 - pos)
        return _cksum_value(h)


def _hash_zeros(h: hashlib._Hash, n: int) -> None:
    while n > 0:
        k = min(n, READ_BYTES)
        h.update(memoryview(_ZEROS)[:k])
        n -= k


def _cksum_value(h: hashlib._Hash) -> int:
    """The first four digest bytes read little-endian, as tapdisk stored them (§2.3)."""
    return int.from_bytes(h.digest()[:4], "little")


async def data_ranges(child: Driver, offset: int, length: int) -> AsyncIterator[tuple[int, int]]:
    """(offset, length) runs of [offset, offset + length) that may hold non-zero bytes.

    Holes, as the child reports them (SEEK_DATA/SEEK_HOLE for a file), read as zeros and
    are skipped; a child that cannot tell gives the whole range.
    """
    end = offset + length
    if not child.can_extents():
        yield offset, length
        return
    pos = offset
    while pos < end:
        got = await child.extents(pos, end - pos)
        start = pos
        for e in got:
            if e.offset != pos:
                break
            n = min(e.length, end - pos)
            if n <= 0:
                break
            if not e.flags & ExtentFlags.ZERO:
                yield pos, n
            pos += n
        if pos == start:  # an answer that does not start at pos, or no answer
            yield pos, end - pos
            return


async def tables_with_data(child: Driver, tables: Sequence[int], length: int) -> AsyncIterator[int]:
    """The offsets in ``tables`` (sorted) of tables of ``length`` bytes that overlap the
    child's data, in order; the others lie in holes and read as zeros."""
    nxt = 0
    async for start, n in data_ranges(child, 0, child.size()):
        i = max(nxt, bisect.bisect_left(tables, start - length + 1))
        nxt = max(i, bisect.bisect_left(tables, start + n))
        for k in range(i, nxt):
            yield tables[k]


async def read_pieces(
    child: Driver, offset: int, size: int, md5: hashlib._Hash | None = None
) -> AsyncIterator[tuple[int, bytes]]:
    """(piece number, bytes as stored) of every piece of the table at ``offset`` that is
    not all zeros, in order, read ``READ_BYTES`` at a time over the file's data only.

    ``md5``, if given, is fed the whole table as stored, holes included.
    """
    nbytes = size * 8
    hashed = 0
    async for start, n in data_ranges(child, offset, nbytes):
        # Whole pieces covering the run, so a piece is never split across reads.
        lo = (start - offset) // PIECE_BYTES * PIECE_BYTES
        hi = min(nbytes, -(-(start + n - offset) // PIECE_BYTES) * PIECE_BYTES)
        lo = max(lo, hashed)  # a piece already read with the previous run
        pos = lo
        while pos < hi:
            want = min(READ_BYTES, hi - pos)
            data = bytes(await child.pread(offset + pos, want))
            if len(data) != want:
                raise OSError(f"short read of the L1 table at 0x{offset + pos:x}")
            if md5 is not None:
                _hash_zeros(md5, pos - hashed)
                md5.update(data)
            hashed = pos + want
            if data.count(0) == want:
                pos += want
                continue
            for o in range(0, want, PIECE_BYTES):
                piece = data[o : o + PIECE_BYTES]
                if piece.count(0) != len(piece):
                    yield (pos + o) // PIECE_BYTES, piece
            pos += want
    if md5 is not None:
        _hash_zeros(md5, nbytes - hashed)
