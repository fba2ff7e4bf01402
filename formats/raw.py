"""raw: a file or block device, with asynchronous I/O that never blocks the event loop.

blktap's "aio" driver. The I/O engine was chosen by measurement (see README, "I/O
engine"): a request is first tried inline with ``RWF_NOWAIT``, which the kernel answers
from the page cache or refuses with EAGAIN instead of blocking; only then does it go to a
thread pool. A page-cache hit costs one system call and no thread hop, and a slow disk
never stalls the loop. Extents come from SEEK_DATA/SEEK_HOLE, TRIM and zeroing from
fallocate (or BLKDISCARD/BLKZEROOUT on block devices), FLUSH from fdatasync and FUA from
RWF_DSYNC.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import os
import resource
import stat
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from contextvars import ContextVar
from typing import TYPE_CHECKING

from formats import Format
from formats.locks import lock_image
from formats.probes import probe_raw as probe
from tapnbd import buffers
from tapnbd.driver import BlockSize, Driver, Extent, ExtentFlags, FuaMode
from tapnbd.errors import ImageError

if TYPE_CHECKING:
    import ctypes
    from collections.abc import Sequence

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# linux/fs.h: _IO(0x12, 119) and _IO(0x12, 127)
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F


#: An inline buffered write slower than this stalled the loop. Either the kernel made the
#: thread sleep (dirty-page throttling on a slow disk, a page under writeback, a journal
#: commit), or another process had the CPU: on a busy machine a write is preempted every
#: few tens of milliseconds. Only a sleep is worth the thread pool, whose hop costs ten
#: times the CPU of a 4 KiB write: a preempted write would be preempted in the pool too.
#: So a slow write opens a PROBE_TIME window in which every write is bracketed by
#: getrusage (0.4 us each); a slow one that made a voluntary context switch (the kernel
#: put the thread to sleep; preemption counts as involuntary) sends writes to the pool:
#: FIRST_BACKOFF seconds, doubled for each sleep within a back-off of the last one
#: ending, up to WRITE_BACKOFF. A throttled disk reaches WRITE_BACKOFF after a handful
#: of sleeps; a one-off stall costs milliseconds of the pool, not a second.
SLOW_WRITE = 0.002
PROBE_TIME = 1.0
FIRST_BACKOFF = 0.01
WRITE_BACKOFF = 1.0


def voluntary_switches() -> int:
    """Times this thread has slept in the kernel (getrusage(2) ru_nvcsw)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


#: Blocking I/O runs here. Sized for queue depth, not for CPUs: the threads mostly wait.
EXECUTOR = ThreadPoolExecutor(max_workers=16, thread_name_prefix="tapnbd-io")


@functools.cache
def _libc() -> ctypes.CDLL:
    """libc for fallocate, loaded on first use: ctypes and find_library (which runs
    ldconfig) would cost every CLI start about 10 ms."""
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return libc


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes

    if _libc().fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def pread_all(fd: int, buf: memoryview, offset: int) -> int:
    """Blocking read into ``buf`` until full or EOF; returns the bytes read."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def pwrite_all(fd: int, data: bytes | memoryview, offset: int, flags: int = 0) -> None:
    view = memoryview(data)
    while view:
        n = os.pwritev(fd, [view], offset, flags)
        view, offset = view[n:], offset + n


def splice_all(pipe: int, fd: int, offset: int, length: int) -> None:
    """The next ``length`` bytes of ``pipe`` into ``fd`` at ``offset``; the caller put
    at least that many into the pipe."""
    end = offset + length
    while offset < end:
        n = os.splice(pipe, fd, end - offset, offset_dst=offset)
        if n == 0:
            raise OSError(errno.EIO, "the pipe ran dry")
        offset += n


#: File types by ``stat.S_IFMT``, for refusals that say what the path was.
_FILE_TYPES = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFBLK: "a block device",
}


def open_file(path: str, *, read_only: bool = True, block_devices: bool = True) -> int:
    """Open an image file: a regular file, or a block device when ``block_devices``.

    The path may come from an image header, so it is hostile until fstat says what it
    is: the open is O_NONBLOCK (opening a FIFO would otherwise wait for a writer) and
    O_NOCTTY, and anything but a regular file (or an allowed block device) is refused
    before a byte is read. O_NONBLOCK is cleared after the check: it means nothing to
    regular files and block devices, but say what we mean.
    """
    flags = os.O_RDONLY if read_only else os.O_RDWR
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or (stat.S_ISBLK(mode) and block_devices)):
            kind = _FILE_TYPES.get(stat.S_IFMT(mode), "not a regular file")
            if stat.S_ISBLK(mode):
                why = "a backing file is a block device only with --allow-block-devices"
            else:
                why = "only regular files and block devices are images"
            raise ImageError(f"{path}: is {kind}; {why}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def truncate_to_empty(fd: int) -> None:
    """Cut a new image's file to 0 bytes, without leaving ext4 to write it back at close.

    ext4 (auto_da_alloc) marks an inode cut to 0 bytes, even one that was empty, and
    the first close of the file after that writes back every dirty page of it, in the
    closing process's time: the close of a 1 GiB convert's target took 0.3-0.4 s, most
    of it sys CPU. qemu-img closes the file it created before writing the image, which
    clears the mark while nothing is dirty; closing a second open of it here does the
    same (the image locks are OFD locks: this close drops none).
    """
    os.ftruncate(fd, 0)
    try:
        os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY))
    except OSError:
        pass  # no /proc: the target's close writes it back, as before


def create_raw(
    path: str,
    size: int,
    *,
    reserve: bool = False,
    share: bool = False,
    target_fd: int | None = None,
) -> None:
    """Create a raw image: sparse, or fully allocated with ``reserve``.

    Locked first, as every image tool that writes (formats.locks).
    """
    from formats.locks import locked_target  # it imports this module

    with ExitStack() as stack:
        fd = target_fd
        if fd is None:
            fd = stack.enter_context(locked_target(path, share=share))
        truncate_to_empty(fd)
        if reserve:
            try:
                fallocate(fd, 0, 0, size)
            except OSError as e:
                raise ImageError(f"{path}: cannot reserve space: {e.strerror}") from None
        else:
            os.ftruncate(fd, size)
        os.fsync(fd)


async def open_raw(path: str, read_only: bool) -> Driver:
    from formats import open_rules

    rules = open_rules()
    return await RawDriver.open(
        path,
        read_only=read_only,
        lock=True,
        share=rules.share,
        block_devices=rules.block_devices,
    )


FORMAT = Format("raw", probe, open_raw)

#: Set inside formats.direct.direct_files: image files opened then are DirectFiles.
#: (Here, so that an open asks without importing formats.direct.)
DIRECT_IO: ContextVar[bool] = ContextVar("direct_io", default=False)
#: Set inside formats.filters.cachemode.files_for("unsafe"): image files opened then
#: never sync (qemu's cache.no-flush, which cache=unsafe sets on every node): the
#: formats' own flushes of their metadata do nothing either.
NO_FLUSH: ContextVar[bool] = ContextVar("no_flush", default=False)


class RawDriver(Driver):
    """A raw image file or block device."""

    name = "raw"
    #: Never sync: FLUSH and FUA do nothing (see NO_FLUSH).
    unsafe = False

    def __init__(
        self,
        path: str,
        *,
        read_only: bool = False,
        lock: bool = False,
        share: bool = False,
        block_devices: bool = True,
        fd: int | None = None,
    ) -> None:
        # ``fd``: already opened by open_file (RawDriver.open does that off the loop).
        if fd is None:
            fd = open_file(path, read_only=read_only, block_devices=block_devices)
        self.fd = fd
        self.path = path
        self.read_only = read_only
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if lock:
            # QEMU's locks for a reader or a writer (formats.locks), so that no other
            # writer changes the image under us, nor we under its readers. The kernel
            # drops them when we exit, so a successor can open the image once we are gone.
            try:
                lock_image(self.fd, path, write=not read_only, share=share)
            except BaseException:
                os.close(self.fd)
                raise
        self._size = os.lseek(self.fd, 0, os.SEEK_END)
        self._sync_error: OSError | None = None  # see flush
        # Fast paths switch themselves off on their first ENOTSUP/EINVAL (nbdkit file_zero).
        self._nowait = True
        self._nowait_write = True
        self._inline_after = 0.0  # writes go to the pool until then (see SLOW_WRITE)
        self._backoff = 0.0  # the last back-off's length
        self._probe_until = 0.0  # writes are checked for sleeps until then
        self._punch = not self.is_block
        self._zero_range = not self.is_block
        self._seek_data = not self.is_block
        self._falloc = not self.is_block

    @classmethod
    async def open(
        cls, path: str, *, read_only: bool, lock: bool, share: bool, block_devices: bool
    ) -> RawDriver:
        """The driver, with the open and fstat done in the thread pool: a daemon
        serving other exports never waits on an image's open(2) (NFS, a slow disk)."""
        loop = asyncio.get_running_loop()
        fd = await loop.run_in_executor(
            EXECUTOR,
            functools.partial(open_file, path, read_only=read_only, block_devices=block_devices),
        )
        drv: RawDriver
        if cls is RawDriver and DIRECT_IO.get():  # --cache=none or directsync
            from formats.direct import DirectFile

            drv = DirectFile(path, read_only=read_only, lock=lock, share=share, fd=fd)
        else:
            drv = cls(path, read_only=read_only, lock=lock, share=share, fd=fd)
        drv.unsafe = NO_FLUSH.get()
        return drv

    def size(self) -> int:
        return self._size

    def _blocking(self, fn: object, *args: object) -> asyncio.Future[object]:
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(EXECUTOR, fn, *args)  # type: ignore[arg-type]

    def pread_nowait(self, offset: int, length: int) -> bytearray | None:
        if not self._nowait:
            return None
        buf = buffers.take(length)
        if self._preadv_nowait([buf], offset) == length:
            return buf
        buffers.give(buf)
        return None

    def _preadv_nowait(self, bufs: Sequence[memoryview | bytearray], offset: int) -> int:
        """preadv with RWF_NOWAIT: the bytes read, or -1 where it would have to wait.

        Other errors are raised; the caller's slow path meets them again and reports them.
        """
        try:
            return os.preadv(self.fd, bufs, offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return -1
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._nowait = False  # no RWF_NOWAIT here: the thread pool from now on
            return -1

    def read_fd(self) -> int:
        return self.fd

    def read_at(self, offset: int, length: int) -> int:
        return offset

    def write_fd(self) -> int:
        return self.fd

    def write_at(self, offset: int, length: int) -> int:
        return offset

    def _slow_write(self, now: float, slept: bool) -> None:
        """A write that ended at ``now`` was slow; ``slept``: probed, and it slept."""
        if not slept:
            self._probe_until = now + PROBE_TIME  # preempted, or not probed: look closer
            return
        if now - self._inline_after < self._backoff:
            self._backoff = min(2 * self._backoff, WRITE_BACKOFF)  # slept again: longer
        else:
            self._backoff = FIRST_BACKOFF
        self._inline_after = now + self._backoff
        self._probe_until = self._inline_after + PROBE_TIME

    def pwrite_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        if self._nowait_write or (t0 := time.monotonic()) < self._inline_after:
            return False  # the async path tries RWF_NOWAIT, or the pool is in charge
        before = voluntary_switches() if t0 < self._probe_until else -1
        pwrite_all(self.fd, data, offset)
        if (t1 := time.monotonic()) - t0 > SLOW_WRITE:
            self._slow_write(t1, before >= 0 and voluntary_switches() != before)
        return True

    def preadv_nowait(self, offset: int, length: int, bufs: Sequence[memoryview]) -> bool:
        return self._nowait and self._preadv_nowait(bufs, offset) == length

    splices = True

    def pwrite_from_pipe(self, pipe: int, offset: int, length: int) -> bool:
        if self._nowait_write or (t0 := time.monotonic()) < self._inline_after:
            return False  # as pwrite_nowait
        before = voluntary_switches() if t0 < self._probe_until else -1
        splice_all(pipe, self.fd, offset, length)
        if (t1 := time.monotonic()) - t0 > SLOW_WRITE:
            self._slow_write(t1, before >= 0 and voluntary_switches() != before)
        return True

    def pwritev_nowait(self, offset: int, length: int, bufs: Sequence[memoryview]) -> bool:
        if self._nowait_write or (t0 := time.monotonic()) < self._inline_after:
            return False  # as pwrite_nowait
        before = voluntary_switches() if t0 < self._probe_until else -1
        n = os.pwritev(self.fd, bufs, offset)
        if n < length:  # short: finish from where it stopped
            pwrite_all(self.fd, b"".join(bufs)[n:], offset + n)
        if (t1 := time.monotonic()) - t0 > SLOW_WRITE:
            self._slow_write(t1, before >= 0 and voluntary_switches() != before)
        return True

    async def pread(self, offset: int, length: int) -> bytearray:
        buf = buffers.take(length)
        view = memoryview(buf)
        done = 0
        if self._nowait:
            done = max(self._preadv_nowait([view], offset), 0)
        if done < length:
            done += await self._blocking(pread_all, self.fd, view[done:], offset + done)  # type: ignore[operator]
            if done < length:  # the file shrank under us; the rest reads as zeros
                view[done:] = bytes(length - done)
        return buf

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        fua = fua and not self.unsafe
        if not fua and self._nowait_write:
            try:
                n = os.pwritev(self.fd, [data], offset, os.RWF_NOWAIT)
            except BlockingIOError:
                n = 0
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                # Most file systems refuse RWF_NOWAIT on buffered writes.
                self._nowait_write, n = False, 0
            if n == len(data):
                return
            data, offset = memoryview(data)[n:], offset + n
        elif not fua and self.pwrite_nowait(offset, data):
            # Without RWF_NOWAIT, a buffered write is a copy into the page cache and
            # returns at once, unless the kernel throttles dirty pages; pwrite_nowait
            # times it, and one that slept sends the next writes to the pool for a while.
            return
        if not fua:
            await self._blocking(pwrite_all, self.fd, data, offset, 0)
            return
        self._check_sync()
        try:
            await self._blocking(pwrite_all, self.fd, data, offset, os.RWF_DSYNC)
        except OSError as e:
            if e.errno == errno.EIO:  # the sync part failed (ENOSPC refused the write)
                self._sync_error = e
            raise

    async def flush(self) -> None:
        # A failed fdatasync sticks: the kernel reports a writeback error once and may
        # have dropped the dirty pages, so a later fdatasync that succeeds would be a
        # lie (PostgreSQL's "fsyncgate"). Every flush after a failure fails, unretried,
        # until the image is reopened; formats that flush their file mid-request (qcow's
        # flush epochs) meet the same error.
        if self.unsafe:
            return
        self._check_sync()
        try:
            await self._blocking(os.fdatasync, self.fd)
        except OSError as e:
            self._sync_error = e
            raise

    def _check_sync(self) -> None:
        if self._sync_error is not None:
            raise OSError(
                errno.EIO, f"{self.path}: an earlier sync failed ({self._sync_error.strerror})"
            )

    def can_fua(self) -> FuaMode:
        return FuaMode.NATIVE

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if self.is_block:
            await self._blocking(
                fcntl.ioctl, self.fd, BLKDISCARD, struct.pack("=QQ", offset, length)
            )
        elif self._punch:
            await self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        # Without hole punching TRIM is a no-op, which the spec allows (it is a hint).
        if fua:
            await self.flush()

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        if self.is_block:
            await self._blocking(
                fcntl.ioctl, self.fd, BLKZEROOUT, struct.pack("=QQ", offset, length)
            )
        elif may_trim and self._punch:
            await self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        elif self._zero_range:
            await self._fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        else:
            raise OSError(errno.ENOTSUP, "no fast way to zero")
        if fua:
            await self.flush()

    async def _fallocate(self, mode: int, offset: int, length: int) -> None:
        try:
            await self._blocking(fallocate, self.fd, mode, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            if mode & FALLOC_FL_PUNCH_HOLE:
                self._punch = False
            else:
                self._zero_range = False
            raise OSError(errno.ENOTSUP, "fallocate not supported here") from None

    def can_trim(self) -> bool:
        return not self.read_only

    def can_write(self) -> bool:
        return not self.read_only

    async def extents(self, offset: int, length: int) -> list[Extent]:
        if not self._seek_data:
            return [Extent(offset, length, ExtentFlags.DATA)]
        end = min(offset + length, self._size)
        out: list[Extent] = []
        pos = offset
        try:
            while pos < end:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
                if data > pos:
                    out.append(
                        Extent(pos, min(data, end) - pos, ExtentFlags.HOLE | ExtentFlags.ZERO)
                    )
                    pos = data
                    if pos >= end:
                        break
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
                out.append(Extent(pos, min(hole, end) - pos, ExtentFlags.DATA))
                pos = hole
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data past pos: a hole up to the end of file
                out.append(Extent(pos, end - pos, ExtentFlags.HOLE | ExtentFlags.ZERO))
            elif e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                self._seek_data = False
                return [Extent(offset, length, ExtentFlags.DATA)]
            else:
                raise
        return out

    def grow(self, length: int, *, allocate: bool = False) -> None:
        """Extend the file to at least ``length`` bytes; never shrinks it. Synchronous.

        For formats that append to their file (qcow): the call is one quick system call,
        so making it without suspending keeps concurrent growers from racing. ``allocate``
        reserves blocks with fallocate; otherwise ftruncate leaves a hole that reads as
        zeros. A block device cannot grow: ENOSPC when it is too small.
        """
        if length <= self._size:
            return
        if self.is_block:
            raise OSError(errno.ENOSPC, "block device is too small")
        current = os.fstat(self.fd).st_size
        if length > current:
            grown = False
            if allocate and self._falloc:
                try:
                    fallocate(self.fd, 0, current, length - current)
                    grown = True
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
                    self._falloc = False
            if not grown:
                os.ftruncate(self.fd, length)
        self._size = max(length, current)

    async def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def block_size(self) -> BlockSize:
        if self.is_block:
            return BlockSize(minimum=512)
        return BlockSize()

    async def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
