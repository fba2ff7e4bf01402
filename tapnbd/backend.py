"""The Backend: what every front end talks to (nbdkit's server core, QEMU's BlockBackend).

It sits between a front end (the NBD server, the Xen ring shim) and a driver stack and

- asks the driver for its capabilities once and caches them;
- validates every request (range, read-only, capability), so drivers only do I/O;
- emulates what the driver lacks: zeroing by writing zeros, FUA by flushing, extents as
  one data run, CACHE by reading;
- maps driver errors to errnos the front ends can send;
- serialises requests for drivers that declare ``parallel = False``;
- counts operations, bytes, errors and latency for ``tapnbd stats``;
- makes a failed flush stick (see ``sync_failed``).

Errors from here are always ``RequestError(errno)`` with one of EPERM, EIO, EINVAL,
ENOSPC, EOVERFLOW or ENOTSUP, the set the NBD spec allows a server to send.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from functools import partial
from typing import TYPE_CHECKING

from tapnbd.driver import BlockSize, Driver, Extent, ExtentFlags, FuaMode
from tapnbd.errors import RefusedIOError, RequestError
from tapnbd.stats import Stats, now

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

log = logging.getLogger("tapnbd.backend")

#: How long closing an export may take at shutdown or removal (its last FLUSH and the
#: driver's close). One whose image or upstream never answers (an NBD server that
#: ignores a FLUSH) is then left as a crash would leave it, which every format is
#: written to survive, so that the process can still exit.
CLOSE_TIMEOUT = 30.0

#: Zeroes are emulated by writing this much at a time (nbdkit backend_zero).
ZERO_CHUNK = 1 << 20
_ZEROES = bytes(ZERO_CHUNK)

#: errnos a front end may pass on as they are; anything else becomes EIO.
_PASS_THROUGH = {errno.EPERM, errno.EIO, errno.EINVAL, errno.ENOSPC, errno.EOVERFLOW}
#: "map EDQUOT and EFBIG to ENOSPC" (NBD spec, "Error values"); EROFS is EPERM.
_REMAP = {errno.EDQUOT: errno.ENOSPC, errno.EFBIG: errno.ENOSPC, errno.EROFS: errno.EPERM}


def request_errno(exc: BaseException) -> int:
    """The errno to report for an exception raised while serving a request."""
    if isinstance(exc, RequestError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno is not None:
        err = _REMAP.get(exc.errno, exc.errno)
        if err in _PASS_THROUGH:
            return err
        if err == errno.ENOTSUP:
            # ENOTSUP is only for FAST_ZERO; the caller decides (see Backend.zero).
            return errno.ENOTSUP
    return errno.EIO


class Backend:
    """A validated, capability-complete view of one driver stack."""

    def __init__(self, driver: Driver, *, read_only: bool = False) -> None:
        self.driver = driver
        self.size = driver.size()
        self.read_only = read_only or not driver.can_write()
        writable = not self.read_only
        # Capabilities, asked once (nbdkit backend_can_*).
        self.can_flush = driver.can_flush()
        self.fua_mode = driver.can_fua() if writable else FuaMode.NONE
        self.can_fua = self.fua_mode != FuaMode.NONE
        self.can_trim = writable and driver.can_trim()
        self.can_zero = writable
        self.can_fast_zero = writable and driver.can_fast_zero()
        self.can_extents = driver.can_extents()
        self.can_cache = True  # emulated by reading when the driver has no cache()
        self.can_multi_conn = driver.can_multi_conn()
        self.is_rotational = driver.is_rotational()
        self.block_size: BlockSize = driver.block_size()
        self._native_cache = driver.can_cache()
        # Holes are answered from extents without a read, except when a filter in front
        # (formats.filters: injected faults or delays) must see every read.
        intercepts = getattr(driver, "intercepts", None)
        self._zero_hint = self.can_extents and not (callable(intercepts) and intercepts("read"))
        self._lock = None if driver.parallel else asyncio.Lock()
        #: try_pwrite may succeed: a writable, parallel driver with a pwrite_nowait of
        #: its own (the connection's small-write lane is for these only).
        self.writes_inline = (
            writable and driver.parallel and type(driver).pwrite_nowait is not Driver.pwrite_nowait
        )
        self.stats = Stats()
        self.closed = False
        self.name = ""  # the export's, for log messages; set by whoever names it
        #: Set by the first failed flush or FUA request, never cleared (see sync_failed).
        self.sync_error: str | None = None

    # Validation. The driver may rely on 0 <= offset < offset + length <= size.

    def _check_range(self, offset: int, length: int, past_end: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RequestError(past_end, "request past the end of the disk")
        if length == 0:
            # Zero-length requests are unspecified; succeed without troubling the driver.
            raise _Nothing

    def _check_write(self, offset: int, length: int) -> None:
        if self.read_only:
            raise RequestError(errno.EPERM, "export is read-only")
        # "write past the end -> ENOSPC" (NBD spec, "Error values")
        self._check_range(offset, length, errno.ENOSPC)

    async def _call(
        self, op: str, nbytes: int, fn: Callable[[], Awaitable[object]], fua: bool = False
    ) -> object:
        """Run one driver call: serialise if needed, map errors, count it."""
        durable = fua or op == "flush"
        if durable and self.sync_error is not None:
            self.stats.fail(op, errno.EIO, self.stats.start())
            raise RequestError(
                errno.EIO, f"an earlier flush failed ({self.sync_error}); reopen the image"
            )
        t0 = self.stats.start()
        try:
            if self._lock is None:
                result = await fn()
            else:
                async with self._lock:
                    result = await fn()
        except Exception as e:
            err = request_errno(e)
            self.stats.fail(op, err, t0)
            # EIO from a flush or a FUA request: the sync failed, and writes acknowledged
            # before it may be lost. ENOSPC (a format that could not write its metadata,
            # a full disk) or EPERM refused the request itself: nothing acknowledged was
            # lost, and a later flush may succeed once there is room; nor did a
            # RefusedIOError, EIO for a request refused before it reached the image. (The
            # raw driver makes any failure of fdatasync itself stick, as EIO.)
            if durable and err == errno.EIO and not isinstance(e, RefusedIOError):
                self.sync_failed(op, e)
            if isinstance(e, RequestError):
                raise
            raise RequestError(err, str(e) or type(e).__name__) from e
        self.stats.done(op, nbytes, t0, fua)
        return result

    def sync_failed(self, op: str, exc: BaseException) -> None:
        """A flush (or a FUA request) failed with EIO: from now on every one fails so.

        PostgreSQL's "fsyncgate": after a failed fsync the kernel may already have
        dropped the dirty pages and cleared the error, so a retry that succeeds proves
        nothing. We never retry and report success; the export stays failed for
        durability until an operator reopens the image (a new Backend).
        """
        if self.sync_error is not None:
            return
        self.sync_error = self.stats.sync_error = f"{op}: {exc}"
        log.error(
            "export %r: %s failed (%s): writes since the last good flush may be lost; "
            "every later FLUSH and FUA request fails with EIO until the image is reopened",
            self.name,
            op,
            exc,
        )

    # Operations.

    # The synchronous fast path (see Driver.pread_nowait): None/False means "use the
    # async method", which also produces every error; so any doubt answers None.

    # try_pread and try_pwrite are the NBD hot path. They count a request by appending
    # its length to the Stats' batch: the caller brackets its calls with stats.begin()
    # and stats.settle(), which read the clock once for the whole batch.

    def try_pread(self, offset: int, length: int) -> bytes | bytearray | None:
        if offset < 0 or length <= 0 or offset + length > self.size or self._lock is not None:
            return None
        try:
            data = self.driver.pread_nowait(offset, length)
        except Exception:
            data = None  # the async path reports the error properly
        if data is None:
            return None
        stats = self.stats
        if stats.enabled:
            stats.inline_reads.append(length)
        return data

    def _inline(self, offset: int, length: int) -> bool:
        """The fast paths may take this request: inside the disk, driver unserialised."""
        return offset >= 0 and length > 0 and offset + length <= self.size and self._lock is None

    def try_pwrite(self, offset: int, data: bytes | memoryview) -> bool:
        length = len(data)
        # _inline and the read-only check, written out: a call costs the hot path.
        if (
            self.read_only
            or offset < 0
            or length <= 0
            or offset + length > self.size
            or self._lock is not None
        ):
            return False
        try:
            done = self.driver.pwrite_nowait(offset, data)
        except Exception:
            done = False
        if not done:
            return False
        stats = self.stats
        if stats.enabled:
            stats.inline_writes.append(length)
        return True

    def try_pwrite_from(self, pipe: int, offset: int, length: int, part: bool = False) -> bool:
        """try_pwrite of the next ``length`` bytes of ``pipe`` (Driver.pwrite_from_pipe).
        False: not now, and nothing was read. A failed write raises RequestError.

        ``part``: a part of a WRITE whose payload is still arriving; the caller counts
        the WRITE, once, when it ends."""
        if self.read_only or not self._inline(offset, length):
            return False
        try:
            done = self.driver.pwrite_from_pipe(pipe, offset, length)
        except Exception as e:
            err = request_errno(e)
            if not part:
                self.stats.fail("write", err, self.stats.start())
            raise RequestError(err, str(e) or type(e).__name__) from e
        if done and not part and self.stats.enabled:
            self.stats.inline_writes.append(length)
        return done

    def write_at(self, offset: int, length: int) -> int:
        """Where in ``driver.write_fd()`` another thread may write [offset, offset +
        length) itself (Driver.write_at), or -1: read-only, out of range, or serialised.
        The caller counts the WRITE."""
        if self.read_only or not self._inline(offset, length):
            return -1
        return self.driver.write_at(offset, length)

    def try_preadv(self, offset: int, length: int, bufs: Sequence[memoryview]) -> bool:
        """try_pread into caller's buffers, ``length`` bytes in all (Driver.preadv_nowait)."""
        return self._try_vectored("read", offset, length, bufs)

    def try_pwritev(self, offset: int, length: int, bufs: Sequence[memoryview]) -> bool:
        """try_pwrite from several buffers, ``length`` bytes in all."""
        return self._try_vectored("write", offset, length, bufs)

    def _try_vectored(self, op: str, offset: int, length: int, bufs: Sequence[memoryview]) -> bool:
        # The Xen ring's path: timed per request, so its callers need no begin/settle.
        if (op == "write" and self.read_only) or not self._inline(offset, length):
            return False
        stats = self.stats
        t0 = now() if stats.enabled else 0
        driver = self.driver
        try:
            if op == "read":
                done = driver.preadv_nowait(offset, length, bufs)
            else:
                done = driver.pwritev_nowait(offset, length, bufs)
        except Exception:
            done = False
        if not done:
            return False
        stats.done_inline(op, length, t0)
        return True

    async def pread(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        # The hot path, written out by hand: _call's closure and extra frame cost ~10%.
        if offset < 0 or length <= 0 or offset + length > self.size:
            if length == 0 and 0 <= offset <= self.size:
                return b""
            # "read past the end -> EINVAL"
            raise RequestError(errno.EINVAL, "read past the end of the disk")
        if self._lock is not None:
            return await self._call("read", length, lambda: self.driver.pread(offset, length))  # type: ignore[return-value]
        stats = self.stats
        t0 = stats.start()
        try:
            data = await self.driver.pread(offset, length)
        except Exception as e:
            err = request_errno(e)
            stats.fail("read", err, t0)
            raise RequestError(err, str(e) or type(e).__name__) from e
        stats.done("read", length, t0)
        return data

    async def reads_as_zero(self, offset: int, length: int) -> bool:
        """Whether the driver's extents say the whole range reads as zeros.

        A hint for front ends, which then answer without reading into a buffer (a hole
        costs no memory); when True the request is counted as a read. Any doubt, an
        error included, answers False and the caller reads as usual.
        """
        if not self._zero_hint or not self._inline(offset, length):
            return False
        stats = self.stats
        t0 = stats.start()
        try:
            got = await self.driver.extents(offset, length)
        except Exception:
            got = []
        first = got[0] if got else None
        if (
            first is None
            or not first.flags & ExtentFlags.ZERO
            or first.offset > offset
            or first.offset + first.length < offset + length
        ):
            stats.abandon()
            return False
        stats.done("read", length, t0)
        return True

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        try:
            self._check_write(offset, len(data))
        except _Nothing:
            return
        await self._call("write", len(data), lambda: self._pwrite(offset, data, fua), fua)

    async def _pwrite(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        native = fua and self.fua_mode == FuaMode.NATIVE
        await self.driver.pwrite(offset, data, native)
        if fua and not native:
            await self.driver.flush()

    async def flush(self) -> None:
        if not self.can_flush:
            return
        await self._call("flush", 0, self.driver.flush)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if self.read_only:
            raise RequestError(errno.EPERM, "export is read-only")
        try:
            # "Read or trim past the end ... -> EINVAL"; ENOSPC is for WRITE and
            # WRITE_ZEROES only (NBD spec, "Error values").
            self._check_range(offset, length, errno.EINVAL)
        except _Nothing:
            return
        if not self.can_trim:
            raise RequestError(errno.EINVAL, "trim is not supported")
        await self._call("trim", length, lambda: self._trim(offset, length, fua), fua)

    async def _trim(self, offset: int, length: int, fua: bool) -> None:
        native = fua and self.fua_mode == FuaMode.NATIVE
        await self.driver.trim(offset, length, native)
        if fua and not native:
            await self.driver.flush()

    async def zero(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = True,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        try:
            self._check_write(offset, length)
        except _Nothing:
            return
        if fast and not self.can_fast_zero:
            # "fail fast with ENOTSUP unless the zeroing is faster than a write"
            raise RequestError(errno.ENOTSUP, "fast zero is not supported")
        await self._call(
            "zero", length, lambda: self._zero(offset, length, may_trim, fua, fast), fua
        )

    async def _zero(self, offset: int, length: int, may_trim: bool, fua: bool, fast: bool) -> None:
        native = fua and self.fua_mode == FuaMode.NATIVE
        if self.can_fast_zero:
            try:
                await self.driver.zero(offset, length, may_trim=may_trim, fua=native, fast=fast)
            except OSError as e:
                # Without FAST_ZERO a server "MUST NOT fail with ENOTSUP": fall back.
                if e.errno != errno.ENOTSUP or fast:
                    raise
            else:
                if fua and not native:
                    await self.driver.flush()
                return
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            await self.driver.pwrite(offset, memoryview(_ZEROES)[:n], False)
            offset += n
        if fua:
            await self.driver.flush()

    async def extents(self, offset: int, length: int, req_one: bool = False) -> list[Extent]:
        """Allocation status covering [offset, offset + length), trimmed to that range.

        The result is never empty and never runs past the request (so REQ_ONE and the
        NBD rule "the last extent may run past" are both satisfied by the front end).
        """
        ask = partial(self.driver.extents, offset, length) if self.can_extents else None
        return await self._status(offset, length, req_one, ask)

    async def bitmap_extents(
        self, name: str, offset: int, length: int, req_one: bool = False
    ) -> list[Extent]:
        """Dirty (flags 1) and clean runs of the driver's bitmap ``name``, trimmed to
        [offset, offset + length) as ``extents`` trims."""
        ask = partial(self.driver.bitmap_extents, name, offset, length)
        return await self._status(offset, length, req_one, ask)

    async def depth_extents(self, offset: int, length: int, req_one: bool = False) -> list[Extent]:
        """The qemu:allocation-depth runs of [offset, offset + length), trimmed as
        ``extents`` trims."""
        ask = partial(self.driver.allocation_depth, offset, length)
        return await self._status(offset, length, req_one, ask)

    async def _status(
        self,
        offset: int,
        length: int,
        req_one: bool,
        ask: Callable[[], Awaitable[list[Extent]]] | None,
    ) -> list[Extent]:
        """One metadata context's part of a BLOCK_STATUS: the range checked, then the
        driver's answer (``ask``; None: all of it is data) trimmed to it."""
        try:
            self._check_range(offset, length, errno.EINVAL)
        except _Nothing:
            raise RequestError(errno.EINVAL, "zero-length block status") from None
        if ask is None:
            return [Extent(offset, length, ExtentFlags.DATA)]
        got = await self._call("extents", 0, ask)
        return _trimmed(got, offset, length, req_one)

    async def cache(self, offset: int, length: int) -> None:
        try:
            self._check_range(offset, length, errno.EINVAL)
        except _Nothing:
            return
        if self._native_cache:
            await self._call("cache", length, lambda: self.driver.cache(offset, length))
            return
        end = offset + length
        while offset < end:  # emulate by reading (nbdkit CACHE_EMULATE)
            n = min(ZERO_CHUNK, end - offset)
            await self._call("cache", n, lambda o=offset, n=n: self.driver.pread(o, n))  # type: ignore[misc]
            offset += n

    async def close(self) -> None:
        """Flush and close the driver stack; idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            # After a failed flush another one proves nothing (see sync_failed).
            if self.can_flush and not self.read_only and self.sync_error is None:
                await self.driver.flush()
        finally:
            await self.driver.close()

    async def close_within(self, name: str, timeout: float = CLOSE_TIMEOUT) -> bool:
        """``close``, given up after ``timeout`` seconds with an error in the log.

        True: closed, and what clients wrote is on stable storage (the last flush
        worked, or nothing needed one). False, with the reason in the log: the image
        is as a crash would leave it, so the caller's exit status must say so."""
        try:
            await asyncio.wait_for(self.close(), timeout)
        except TimeoutError:
            log.error(
                "export %r: closing did not finish in %g s (its image or upstream does not "
                "answer); left as a crash would leave it",
                name,
                timeout,
            )
            return False
        except Exception as e:
            log.error("export %r: closing failed: %s; left as a crash would leave it", name, e)
            return False
        if self.sync_error is not None:
            log.error(
                "export %r: closed without a last flush, as an earlier one failed (%s)",
                name,
                self.sync_error,
            )
            return False
        return True


class _Nothing(Exception):
    """A zero-length request: nothing to do, and nothing wrong."""


def _trimmed(got: object, offset: int, length: int, req_one: bool) -> list[Extent]:
    """A driver's extents from ``offset``, checked contiguous, merged where the flags
    repeat and trimmed to the request (one extent for REQ_ONE)."""
    end = offset + length
    out: list[Extent] = []
    pos = offset
    for e in got:  # type: ignore[attr-defined]
        if e.offset != pos or e.length <= 0:
            raise RequestError(errno.EIO, "driver returned non-contiguous extents")
        n = min(e.length, end - pos)
        if out and out[-1].flags == e.flags:
            out[-1] = Extent(out[-1].offset, out[-1].length + n, e.flags)
        else:
            out.append(Extent(pos, n, e.flags))
        pos += n
        if pos >= end or (req_one and out):
            break
    if not out:
        raise RequestError(errno.EIO, "driver returned no extents")
    return out[:1] if req_one else out
