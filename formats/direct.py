"""DirectFile: an image file read and written past the host's page cache (O_DIRECT), for
qemu-nbd's ``--cache=none`` (``-n``) and ``--cache=directsync``.

O_DIRECT wants the file offset, the length and the buffer's address aligned to the
device's logical block size. Every request here goes through a buffer of its own from
``mmap`` (page-aligned), widened to whole ``ALIGN`` blocks: a read reads the blocks and
hands back the part asked for; a write that does not cover its first or last block
reads those blocks first and writes them back whole (read-modify-write, as QEMU's
bounce buffers do). Writes hold one lock, so two that share a block cannot undo each
other's bytes. A write past the end of a file whose size is not a multiple of
``ALIGN`` puts the size back afterwards.

The raw driver's fast paths (RWF_NOWAIT into pooled buffers, splice, the I/O threads
reading its descriptor) all assume the page cache, so here they all say no.

``direct_files()`` makes every image file opened inside it (the image, a format's file,
its backing files, as QEMU's cache mode is inherited down the chain) a DirectFile.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from formats.raw import DIRECT_IO, RawDriver, pread_all, pwrite_all
from tapnbd.driver import BlockSize
from tapnbd.errors import ImageError

#: Offsets, lengths and buffers are aligned to this: 4096 covers 512-byte and 4K
#: devices, and the block size of ext4 and XFS as they are usually made.
ALIGN = 4096


@contextmanager
def direct_files(on: bool = True) -> Iterator[None]:
    """Image files opened inside are DirectFiles (when ``on``; RawDriver.open asks)."""
    token = DIRECT_IO.set(on)
    try:
        yield
    finally:
        DIRECT_IO.reset(token)


def _aligned(n: int) -> memoryview:
    """A page-aligned buffer of ``n`` bytes (``n`` a multiple of ALIGN)."""
    return memoryview(mmap.mmap(-1, n))


class DirectFile(RawDriver):
    """A RawDriver whose descriptor has O_DIRECT, every request through aligned buffers."""

    splices = False

    def __init__(self, path: str, **kw: Any) -> None:  # RawDriver's
        super().__init__(path, **kw)
        try:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError as e:
            os.close(self.fd)
            self.fd = -1
            raise ImageError(
                f"{path}: the page cache cannot be bypassed here (O_DIRECT: {e.strerror}); "
                "use --cache=writethrough for durable writes"
            ) from None
        self._nowait = self._nowait_write = False
        self._writing = asyncio.Lock()
        self._sizing = threading.Lock()  # a write past the end, against grow()

    # No fast path assumes the page cache here.

    def pread_nowait(self, offset: int, length: int) -> None:
        return None

    def pwrite_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        return False

    def preadv_nowait(self, offset: int, length: int, bufs: Sequence[memoryview]) -> bool:
        return False

    def pwritev_nowait(self, offset: int, length: int, bufs: Sequence[memoryview]) -> bool:
        return False

    def pwrite_from_pipe(self, pipe: int, offset: int, length: int) -> bool:
        return False

    def read_fd(self) -> int:
        return -1

    def read_at(self, offset: int, length: int) -> int:
        return -1

    def write_fd(self) -> int:
        return -1  # every write goes through an aligned buffer

    # Aligned I/O.

    def _read_blocks(self, view: memoryview, a: int) -> None:
        """Blocks from ``a`` into ``view``; zeros past the end of the file."""
        got = pread_all(self.fd, view, a)
        if got < len(view):
            view[got:] = bytes(len(view) - got)

    async def pread(self, offset: int, length: int) -> bytearray:
        a = offset & -ALIGN
        b = -(-(offset + length) // ALIGN) * ALIGN
        view = _aligned(b - a)
        await self._blocking(self._read_blocks, view, a)
        return bytearray(view[offset - a : offset - a + length])

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self._check_sync()
        async with self._writing:
            await self._blocking(self._write_blocks, offset, memoryview(data), fua)

    def _write_blocks(self, offset: int, data: memoryview, fua: bool) -> None:
        a = offset & -ALIGN
        end = offset + len(data)
        b = -(-end // ALIGN) * ALIGN
        view = _aligned(b - a)
        if offset != a:
            self._read_blocks(view[:ALIGN], a)
        if end != b and not (offset != a and b - a == ALIGN):  # (one block: read above)
            self._read_blocks(view[-ALIGN:], b - ALIGN)
        view[offset - a : end - a] = data
        flags = os.RWF_DSYNC if fua else 0
        try:
            if b <= os.fstat(self.fd).st_size:
                pwrite_all(self.fd, view, a, flags)
                return
            # The last block reaches past the end: the file must end where it did, or
            # where the write does. grow() waits meanwhile, so the size read here holds.
            with self._sizing:
                size = os.fstat(self.fd).st_size
                pwrite_all(self.fd, view, a, flags)
                if b > size:
                    os.ftruncate(self.fd, max(size, end))
        except OSError as e:
            if fua and e.errno == errno.EIO:
                self._sync_error = e
            raise

    def grow(self, length: int, *, allocate: bool = False) -> None:
        with self._sizing:
            super().grow(length, allocate=allocate)

    def block_size(self) -> BlockSize:
        # Requests of any size work (through the buffers); whole blocks need no reading.
        return BlockSize(minimum=1, preferred=ALIGN)
