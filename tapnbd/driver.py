"""The driver seam: one small table of optional operations, in nbdkit's shape.

A driver only does I/O. The Backend (tapnbd.backend) validates every request before a
driver sees it, so a driver may rely on::

    0 <= offset and 0 < length and offset + length <= self.size()

and never on anything the client sent beyond that. Capabilities follow from which
methods a subclass overrides (nbdkit's ``plugin_can_write`` is "pwrite is present"):
a driver without ``pwrite`` is read-only, one without ``zero`` gets zeroing emulated by
the Backend, one without ``flush`` gets neither FLUSH nor FUA, and so on.

Errors are ``OSError`` with an errno; the Backend maps it to the front end's error code
(EIO when there is no errno). Formats wrap a child driver (QEMU's ``bs->file``): the qcow
format reads and writes its image through a RawDriver, and its backing file is another
driver stack.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from collections.abc import Sequence

MiB = 1 << 20

#: The largest READ or WRITE payload any front end accepts, and what the NBD spec asks
#: every server to support ("maximum payload >= 2^25" when nothing is advertised).
MAX_PAYLOAD = 32 * MiB


class FuaMode(enum.IntEnum):
    """How a driver honours FUA (nbdkit's NBDKIT_FUA_*)."""

    NONE = 0
    EMULATE = 1  # the Backend flushes after the write
    NATIVE = 2  # the driver makes the write durable itself


class ExtentFlags(enum.IntFlag):
    """``base:allocation`` status bits (NBD spec, "Metadata querying")."""

    DATA = 0
    HOLE = 1  # NBD_STATE_HOLE: not allocated
    ZERO = 2  # NBD_STATE_ZERO: reads as zeros


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of the disk with one allocation status."""

    offset: int
    length: int
    flags: ExtentFlags = ExtentFlags.DATA


@dataclass(frozen=True, slots=True)
class BlockSize:
    """Block size constraints (NBD_INFO_BLOCK_SIZE): minimum, preferred, maximum payload."""

    minimum: int = 1
    preferred: int = 4096
    maximum: int = MAX_PAYLOAD


def overrides(obj: object, name: str) -> bool:
    """True when ``obj``'s class overrides Driver.<name>."""
    return getattr(type(obj), name) is not getattr(Driver, name)


class Driver:
    """Base class of every disk driver (raw, ram, qcow, and filters).

    Subclasses implement ``size`` and ``pread`` and whatever else they can do natively.
    """

    #: Format name, as shown by ``tapnbd info`` and accepted by ``--format``.
    name: ClassVar[str] = "driver"

    #: False when the driver cannot take requests concurrently; the Backend then
    #: serialises them (nbdkit's SERIALIZE_REQUESTS thread model).
    parallel: ClassVar[bool] = True

    def size(self) -> int:
        """Virtual size in bytes."""
        raise NotImplementedError

    async def pread(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Return exactly ``length`` bytes from ``offset``."""
        raise NotImplementedError

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; durable before return when ``fua`` (NATIVE only).

        ``data`` is lent: it is reused once pwrite returns, so keep no reference to it
        (nbdkit's pwrite has the same rule for its buffer).
        """
        raise NotImplementedError

    # Optional synchronous fast paths. A request that a driver can answer at once (RAM,
    # a page-cache hit, a qcow cluster whose address is known) is then served without
    # a coroutine, which is a fifth of the cost of a 4 KiB request. Returning None/False
    # means "not now": the caller falls back to the async method, which must then work.

    def pread_nowait(self, offset: int, length: int) -> bytes | bytearray | None:
        """The data, if it can be had without waiting; else None."""
        return None

    def pwrite_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        """Write without waiting (not FUA) and return True, or do nothing and return False."""
        return False

    # The same with the data in several buffers, consecutive on the disk from ``offset``
    # (a Xen blkif request's granted pages). The defaults copy through the two above; a
    # driver over a file overrides them to read and write the buffers in one preadv or
    # pwritev, with no copy.

    def preadv_nowait(self, offset: int, length: int, bufs: Sequence[memoryview]) -> bool:
        """Fill ``bufs`` (``length`` bytes in all) without waiting and return True, or False."""
        data = self.pread_nowait(offset, length)
        if data is None:
            return False
        view = memoryview(data)
        pos = 0
        for buf in bufs:
            n = len(buf)
            buf[:] = view[pos : pos + n]
            pos += n
        return True

    def pwritev_nowait(self, offset: int, length: int, bufs: Sequence[memoryview]) -> bool:
        """Write ``bufs`` (``length`` bytes in all) without waiting, as pwrite_nowait."""
        return self.pwrite_nowait(offset, bufs[0] if len(bufs) == 1 else b"".join(bufs))

    def read_fd(self) -> int:
        """A descriptor that ``read_at`` maps reads into, or -1.

        Only a driver whose reads can be plain preads of one file says yes: raw (at the
        same offsets) and QCOW v1 over exactly the raw driver (at its data clusters'
        offsets). The connection's I/O threads then read that file themselves, off the
        loop (tapnbd.server.iothreads). Filters say no unless they override it, so
        nothing they must see is bypassed.
        """
        return -1

    def read_at(self, offset: int, length: int) -> int:
        """Where in ``read_fd()`` the bytes [offset, offset + length) lie, as one run,
        if known now without I/O; else -1 (the request takes the driver's own path)."""
        return -1

    def write_fd(self) -> int:
        """A descriptor that ``write_at`` maps writes into, or -1.

        Only the raw driver says yes (at the same offsets): a connection's writer thread
        then splices big WRITE payloads into that file itself, off the loop
        (tapnbd.server.pipewriter). Filters say no unless they override it, so nothing
        they must see is bypassed.
        """
        return -1

    def write_at(self, offset: int, length: int) -> int:
        """Where in ``write_fd()`` a write of [offset, offset + length) goes, as one run,
        if it may go there with no more said; else -1 (the driver's own path)."""
        return -1

    @property
    def splices(self) -> bool:
        """True when ``pwrite_from_pipe`` can take writes (splice(2) into one file).
        Filters inherit False, so nothing they must see is bypassed."""
        return False

    def pwrite_from_pipe(self, pipe: int, offset: int, length: int) -> bool:
        """Write the next ``length`` bytes of ``pipe`` at ``offset``, now, without
        waiting for anything but the write itself (``pwrite_nowait``'s contract). The
        server splices a WRITE's payload from the socket into the pipe, so its bytes
        reach the page cache in one copy instead of two. False: not now, and nothing
        was read from the pipe. On an error, what is left in the pipe is the caller's.
        """
        return False

    async def flush(self) -> None:
        """Make every completed write durable, metadata included."""
        raise NotImplementedError

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard a range; its contents are undefined until rewritten."""
        raise NotImplementedError

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        """Make a range read as zeros.

        ``may_trim``: holes are allowed (NBD: NO_HOLE not set). ``fast``: raise
        OSError(ENOTSUP) unless zeroing is cheaper than writing, without changing data.
        Raising ENOTSUP when not ``fast`` makes the Backend fall back to writing zeros.
        """
        raise NotImplementedError

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocation status from ``offset``: at least one extent, contiguous, in order.

        The list may stop early (the caller asks again) and the last extent may run past
        ``offset + length``; the Backend trims it.
        """
        raise NotImplementedError

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch a range (a hint; no change in meaning)."""
        raise NotImplementedError

    # Persistent dirty bitmaps (qcow2's), for the qemu:dirty-bitmap:NAME context.

    def bitmaps(self) -> list[str]:
        """Names of the dirty bitmaps ``bitmap_extents`` can report."""
        return []

    async def bitmap_extents(self, name: str, offset: int, length: int) -> list[Extent]:
        """Runs of bitmap ``name`` from ``offset``, contiguous and in order, flags 1
        (dirty) or 0 (clean); as ``extents``, the list may stop early."""
        raise OSError(errno.ENOTSUP, "this driver has no dirty bitmaps")

    # The qemu:allocation-depth context.

    async def allocation_depth(self, offset: int, length: int) -> list[Extent]:
        """Runs from ``offset`` whose flags say which layer of the backing chain answers
        them: 1 this image, 2 its backing file and so on, 0 none (as ``extents``, the list
        may stop early). An image with no chain answers everything itself, as qemu's raw
        does: one run at depth 1."""
        return [Extent(offset, length, ExtentFlags(1))]

    async def close(self) -> None:
        """Release resources; called once, after a final flush."""

    # Capabilities. The defaults follow from what the subclass overrides.

    def can_write(self) -> bool:
        return overrides(self, "pwrite")

    def can_flush(self) -> bool:
        return overrides(self, "flush")

    def can_trim(self) -> bool:
        return overrides(self, "trim")

    def can_fast_zero(self) -> bool:
        """Whether ``zero(fast=True)`` can ever succeed."""
        return overrides(self, "zero")

    def can_fua(self) -> FuaMode:
        return FuaMode.EMULATE if self.can_flush() else FuaMode.NONE

    def can_extents(self) -> bool:
        return overrides(self, "extents")

    def can_cache(self) -> bool:
        return overrides(self, "cache")

    def can_multi_conn(self) -> bool:
        """True when FLUSH on one connection covers writes made on any other.

        Every driver here is opened once per export and shared by all connections, so a
        flush covers everything that reached the driver; drivers with per-connection
        caches must override this.
        """
        return True

    def is_rotational(self) -> bool:
        return False

    def block_size(self) -> BlockSize:
        return BlockSize()

    def describe(self) -> dict[str, object]:
        """Facts for ``tapnbd info`` and the daemon's listing."""
        return {"format": self.name, "virtual-size": self.size()}
