"""The probed-raw guard: a guest may not turn its raw disk into another format.

A raw image whose format was probed (no ``--format``) is opened again, one day, by
probing. If the guest could write a QCOW header into sector 0, that next probe would
read the guest's header and follow the backing file it names, a host path (QEMU's
CVE-2008-2004). So, as QEMU's raw driver does for probed images, every write that
touches the probed bytes is checked: the new first sector is probed, and a write
that would make it anything but raw fails with EPERM and a log line saying why. An
explicit ``--format raw`` means the admin knows, and opens no guard.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import TYPE_CHECKING

from formats import PROBE_SIZE, probe_bytes
from formats.filters import FilterDriver

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tapnbd.driver import Driver

log = logging.getLogger("tapnbd.formats")


class ProbedRawGuard(FilterDriver):
    """Refuses writes that would make a probed raw image probe as another format."""

    def __init__(self, child: Driver, path: str) -> None:
        super().__init__(child)
        self.path = path
        # Writes over the probed bytes are checked one at a time: two writes that are
        # each harmless alone could otherwise assemble a header between them.
        self._head_lock = asyncio.Lock()

    async def _checked(
        self, offset: int, length: int, data: bytes | memoryview | None, op: str
    ) -> None:
        """Refuse (EPERM) if the first sector, with ``data`` at ``offset``, is not raw.

        ``data`` None means zeros (zero and trim leave zeros, or nothing, behind).
        """
        size = min(PROBE_SIZE, self.child.size())
        head = bytearray(await self.child.pread(0, size)) if size else bytearray()
        end = min(size, offset + length)
        if data is None:
            head[offset:end] = bytes(end - offset)
        else:
            head[offset:end] = memoryview(data)[: end - offset]
        name = probe_bytes(bytes(head))
        if name is not None and name != "raw":
            log.warning(
                "%s: refused a %s at offset %d: the image was probed as raw, and after "
                "it the first sector would probe as %s (give --format raw to allow it)",
                self.path,
                op,
                offset,
                name,
            )
            raise OSError(errno.EPERM, f"write would make a probed raw image probe as {name}")

    def pwrite_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        return offset >= PROBE_SIZE and self.child.pwrite_nowait(offset, data)

    def pwritev_nowait(self, offset: int, length: int, bufs: Sequence[memoryview]) -> bool:
        return offset >= PROBE_SIZE and self.child.pwritev_nowait(offset, length, bufs)

    def preadv_nowait(self, offset: int, length: int, bufs: Sequence[memoryview]) -> bool:
        return self.child.preadv_nowait(offset, length, bufs)

    # A probed raw image is what ``tapnbd serve disk.img`` serves, so big WRITEs past
    # the probed bytes keep the child's splice path; one that touches them is refused
    # before the pipe is read, and takes the checked path with its payload.
    @property
    def splices(self) -> bool:
        return self.child.splices

    def pwrite_from_pipe(self, pipe: int, offset: int, length: int) -> bool:
        return offset >= PROBE_SIZE and self.child.pwrite_from_pipe(pipe, offset, length)

    def read_fd(self) -> int:
        return self.child.read_fd()  # reads are not guarded

    def read_at(self, offset: int, length: int) -> int:
        return self.child.read_at(offset, length)

    def write_fd(self) -> int:
        return self.child.write_fd()

    def write_at(self, offset: int, length: int) -> int:
        # The first sector is where a probed image's format lies: seen and checked here.
        return self.child.write_at(offset, length) if offset >= PROBE_SIZE else -1

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if offset >= PROBE_SIZE:
            await self.child.pwrite(offset, data, fua)
            return
        async with self._head_lock:
            await self._checked(offset, len(data), data, "write")
            await self.child.pwrite(offset, data, fua)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if offset >= PROBE_SIZE:
            await self.child.trim(offset, length, fua)
            return
        async with self._head_lock:
            await self._checked(offset, length, None, "trim")
            await self.child.trim(offset, length, fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        if offset >= PROBE_SIZE:
            await self.child.zero(offset, length, may_trim=may_trim, fua=fua, fast=fast)
            return
        async with self._head_lock:
            await self._checked(offset, length, None, "zero")
            await self.child.zero(offset, length, may_trim=may_trim, fua=fua, fast=fast)
