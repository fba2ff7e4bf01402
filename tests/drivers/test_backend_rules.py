"""The Backend's own rules, seen from a driver that logs what reaches it: FUA emulated
by a flush after the write, zeroing and CACHE emulated in ZERO_CHUNK pieces, the
synchronous fast paths' range checks, close flushing once, errno mapping, and every
path counted. (make mutate on tapnbd/backend.py found these untested.)"""

from __future__ import annotations

import errno
from collections.abc import Sequence

import pytest

from formats.ram import RamDriver
from tapnbd.backend import ZERO_CHUNK, Backend, request_errno
from tapnbd.driver import Driver, Extent, ExtentFlags, FuaMode
from tapnbd.errors import RequestError

SIZE = 4 * ZERO_CHUNK


class Logged(RamDriver):
    """A RAM disk that logs each call; FUA native or emulated, zeroing native or not."""

    def __init__(self, fua: FuaMode = FuaMode.EMULATE) -> None:
        super().__init__(SIZE)
        self.fua = fua
        self.log: list[tuple[object, ...]] = []

    def can_fua(self) -> FuaMode:
        return self.fua

    def can_cache(self) -> bool:
        return False  # the Backend emulates it

    def can_fast_zero(self) -> bool:
        return False  # the Backend writes zeros

    async def pread(self, offset: int, length: int) -> bytes | bytearray:
        self.log.append(("read", offset, length))
        return await super().pread(offset, length)

    def pread_nowait(self, offset: int, length: int) -> bytes | bytearray:
        self.log.append(("read_nowait", offset, length))
        return super().pread_nowait(offset, length)

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self.log.append(("write", offset, len(data), fua))
        await super().pwrite(offset, data, fua)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.log.append(("trim", offset, length, fua))
        await super().trim(offset, length, fua)

    async def flush(self) -> None:
        self.log.append(("flush",))

    async def close(self) -> None:
        self.log.append(("close",))


@pytest.mark.parametrize("mode", [FuaMode.EMULATE, FuaMode.NATIVE])
async def test_fua_is_native_or_a_flush_after(mode: FuaMode) -> None:
    d = Logged(mode)
    b = Backend(d)
    native = mode == FuaMode.NATIVE
    after = [] if native else [("flush",)]
    await b.pwrite(0, b"x" * 512, fua=True)
    assert d.log == [("write", 0, 512, native), *after]
    d.log.clear()
    await b.trim(0, 512, fua=True)
    assert d.log == [("trim", 0, 512, native), *after]
    d.log.clear()
    await b.pwrite(0, b"x" * 512)  # no FUA: no flush
    await b.trim(0, 512)
    assert d.log == [("write", 0, 512, False), ("trim", 0, 512, False)]
    assert b.stats.ops["write"].fua == 1 and b.stats.ops["trim"].fua == 1


async def test_zero_is_written_in_chunks_then_flushed_for_fua() -> None:
    d = Logged()
    b = Backend(d)
    await b.pwrite(0, b"y" * 4096)
    d.log.clear()
    await b.zero(100, 2 * ZERO_CHUNK + 1, fua=True)
    assert d.log == [
        ("write", 100, ZERO_CHUNK, False),
        ("write", 100 + ZERO_CHUNK, ZERO_CHUNK, False),
        ("write", 100 + 2 * ZERO_CHUNK, 1, False),
        ("flush",),
    ]
    assert bytes(await b.pread(0, 200)) == b"y" * 100 + bytes(100)
    with pytest.raises(RequestError) as e:
        await b.zero(0, 512, fast=True)  # not cheaper than a write: ENOTSUP
    assert e.value.errno == errno.ENOTSUP


async def test_cache_is_emulated_by_reading_the_range() -> None:
    d = Logged()
    b = Backend(d)
    await b.cache(ZERO_CHUNK - 1, ZERO_CHUNK + 2)
    reads = [e for e in d.log if e[0] == "read"]
    assert reads == [("read", ZERO_CHUNK - 1, ZERO_CHUNK), ("read", 2 * ZERO_CHUNK - 1, 2)]
    assert b.stats.ops["cache"].ops == 2 and b.stats.ops["cache"].bytes == ZERO_CHUNK + 2
    with pytest.raises(RequestError) as e:
        await b.cache(SIZE - 1, 2)
    assert e.value.errno == errno.EINVAL


async def test_flush_reaches_the_driver_and_is_counted() -> None:
    d = Logged()
    b = Backend(d)
    await b.flush()
    assert d.log == [("flush",)] and b.stats.ops["flush"].ops == 1


async def test_close_flushes_once_and_only_when_writable() -> None:
    d = Logged()
    b = Backend(d)
    await b.close()
    await b.close()
    assert d.log == [("flush",), ("close",)]
    ro = Logged()
    await Backend(ro, read_only=True).close()
    assert ro.log == [("close",)]


def test_fast_paths_check_the_range_and_count() -> None:
    d = Logged()
    b = Backend(d)
    batch = b.stats.begin()  # a front end brackets what it serves at once (Stats.settle)
    assert b.try_pwrite(SIZE - 512, b"z" * 512)  # up to the very end
    assert not b.try_pwrite(SIZE - 511, b"z" * 512) and not b.try_pwrite(-1, b"z")
    assert not b.try_pwrite(0, b"")
    assert b.try_pread(SIZE - 512, 512) == b"z" * 512
    assert b.try_pread(SIZE - 511, 512) is None and b.try_pread(-1, 1) is None
    assert b.try_pread(0, 0) is None
    assert [e[0] for e in d.log] == ["read_nowait"]  # only the valid read got through
    b.stats.settle(batch)
    w, r = b.stats.ops["write"], b.stats.ops["read"]
    assert (w.ops, w.bytes, r.ops, r.bytes) == (1, 512, 1, 512)
    assert b.stats.in_flight == 0
    ro = Backend(Logged(), read_only=True)
    assert not ro.try_pwrite(0, b"z")


async def test_slow_paths_count_reads_and_writes() -> None:
    b = Backend(Logged())
    await b.pwrite(0, b"a" * 1000)
    assert bytes(await b.pread(0, 1000)) == b"a" * 1000
    w, r = b.stats.ops["write"], b.stats.ops["read"]
    assert (w.ops, w.bytes, r.ops, r.bytes) == (1, 1000, 1, 1000)
    assert await b.pread(SIZE, 0) == b""  # zero-length at the end: nothing, no error


def test_errnos_are_mapped_as_the_spec_asks() -> None:
    assert request_errno(OSError(errno.EDQUOT, "")) == errno.ENOSPC
    assert request_errno(OSError(errno.EFBIG, "")) == errno.ENOSPC
    assert request_errno(OSError(errno.EROFS, "")) == errno.EPERM
    assert request_errno(OSError(errno.ENOTSUP, "")) == errno.ENOTSUP
    assert request_errno(OSError(errno.ENOTTY, "")) == errno.EIO
    assert request_errno(ValueError("no errno")) == errno.EIO
    assert request_errno(RequestError(errno.EOVERFLOW, "")) == errno.EOVERFLOW


class Scripted(RamDriver):
    """Answers block status with a given list, zeroes natively (or says ENOTSUP), and
    fails on demand."""

    def __init__(self, extents: list[Extent], fua: FuaMode = FuaMode.EMULATE) -> None:
        super().__init__(SIZE)
        self.answer = extents
        self.fua = fua
        self.log: list[tuple[object, ...]] = []
        self.zero_errno = 0
        self.read_error: OSError | None = None

    def can_fua(self) -> FuaMode:
        return self.fua

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return self.answer

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        self.log.append(("zero", offset, length, fua, fast))
        if self.zero_errno:
            raise OSError(self.zero_errno, "")
        await super().zero(offset, length, may_trim=may_trim, fua=fua, fast=fast)

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self.log.append(("write", offset, len(data), fua))
        await super().pwrite(offset, data, fua)

    async def pread(self, offset: int, length: int) -> bytes | bytearray:
        if self.read_error is not None:
            raise self.read_error
        return await super().pread(offset, length)

    async def flush(self) -> None:
        self.log.append(("flush",))


D, H = ExtentFlags.DATA, ExtentFlags.HOLE | ExtentFlags.ZERO


async def test_extents_are_merged_trimmed_and_checked() -> None:
    d = Scripted([Extent(50, 50, D), Extent(100, 100, D), Extent(200, 1000, H)])
    b = Backend(d)
    assert await b.extents(50, 300) == [Extent(50, 150, D), Extent(200, 150, H)]
    assert await b.extents(50, 300, req_one=True) == [Extent(50, 50, D)]  # the first only
    assert await b.extents(50, 150) == [Extent(50, 150, D)]  # nothing past the end
    d.answer = [Extent(50, 1, D), Extent(51, 1000, H)]  # a one-byte extent is fine
    assert await b.extents(50, 10) == [Extent(50, 1, D), Extent(51, 9, H)]
    d.answer = [Extent(50, 50, D), Extent(100, 100, D), Extent(200, 1000, H)]
    for bad in ([Extent(51, 10, D)], [Extent(50, 0, D)], []):
        d.answer = bad
        with pytest.raises(RequestError) as e:
            await b.extents(50, 300)
        assert e.value.errno == errno.EIO, bad
    with pytest.raises(RequestError):
        await b.extents(0, 0)  # zero-length block status


@pytest.mark.parametrize("mode", [FuaMode.EMULATE, FuaMode.NATIVE])
async def test_native_zero_and_its_fallback(mode: FuaMode) -> None:
    d = Scripted([], mode)
    b = Backend(d)
    native = mode == FuaMode.NATIVE
    await b.zero(0, 4096, fua=True)
    assert d.log == [("zero", 0, 4096, native, False)] + ([] if native else [("flush",)])
    d.log.clear()
    d.zero_errno = errno.ENOTSUP  # the driver cannot: written as zeros instead
    await b.zero(0, 4096)
    assert d.log == [("zero", 0, 4096, False, False), ("write", 0, 4096, False)]
    d.log.clear()
    with pytest.raises(RequestError) as e:
        await b.zero(0, 4096, fast=True)  # FAST_ZERO: fail rather than write
    assert e.value.errno == errno.ENOTSUP and d.log == [("zero", 0, 4096, False, True)]
    d.zero_errno = errno.EIO
    with pytest.raises(RequestError) as e:
        await b.zero(0, 4096)
    assert e.value.errno == errno.EIO


async def test_errors_are_counted_and_named() -> None:
    d = Scripted([])
    b = Backend(d)
    d.read_error = OSError(errno.EIO, "")
    with pytest.raises(RequestError) as e:
        await b.pread(0, 512)
    assert e.value.errno == errno.EIO and str(e.value)  # a message even with none given
    d.read_error = OSError(errno.ENOTTY, "")
    with pytest.raises(RequestError) as e:
        await Backend(d, read_only=True).pread(0, 512)
    assert e.value.errno == errno.EIO  # not an NBD errno
    with pytest.raises(RequestError) as e:
        await b.pwrite(SIZE, b"x")
    assert e.value.errno == errno.ENOSPC  # "write past the end -> ENOSPC"
    with pytest.raises(RequestError) as e:
        await b.trim(SIZE - 1, 2)
    assert e.value.errno == errno.EINVAL  # "ENOSPC ... for WRITE and WRITE_ZEROES" only
    assert b.stats.ops["read"].errors == 1 and b.stats.ops["write"].errors == 0
    assert b.stats.errors_by_errno == {errno.EIO: 1} and b.stats.in_flight == 0


def test_vectored_fast_paths() -> None:
    b = Backend(Logged())
    data = [memoryview(b"a" * 512), memoryview(b"b" * 512)]
    assert b.try_pwritev(SIZE - 1024, 1024, data)
    out = [memoryview(bytearray(512)), memoryview(bytearray(512))]
    assert b.try_preadv(SIZE - 1024, 1024, out)
    assert bytes(out[0]) + bytes(out[1]) == b"a" * 512 + b"b" * 512
    assert not b.try_preadv(SIZE - 1023, 1024, out) and not b.try_preadv(-1, 1024, out)
    assert not b.try_pwritev(0, 0, []) and not b.try_preadv(0, 0, [])
    w, r = b.stats.ops["write"], b.stats.ops["read"]
    assert (w.ops, w.bytes, r.ops, r.bytes) == (1, 1024, 1, 1024) and b.stats.in_flight == 0
    ro = Backend(Logged(), read_only=True)
    assert not ro.try_pwritev(0, 1024, data) and ro.try_preadv(0, 1024, out)


class Declining(RamDriver):
    """Every synchronous path declines or fails: the Backend must fall back, uncounted."""

    def __init__(self, fail: bool) -> None:
        super().__init__(SIZE)
        self.fail = fail

    # RamDriver always answers (its signature says so); this one declines, as Driver may.
    def pread_nowait(self, offset: int, length: int) -> bytes | bytearray | None:  # type: ignore[override]
        if self.fail:
            raise OSError(errno.EIO, "")
        return None

    def pwrite_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        if self.fail:
            raise OSError(errno.EIO, "")
        return False

    def preadv_nowait(self, offset: int, length: int, bufs: Sequence[memoryview]) -> bool:
        return self.pread_nowait(offset, length) is not None

    def pwritev_nowait(self, offset: int, length: int, bufs: Sequence[memoryview]) -> bool:
        return self.pwrite_nowait(offset, bufs[0])


@pytest.mark.parametrize("fail", [False, True])
def test_declined_fast_paths_fall_back_uncounted(fail: bool) -> None:
    b = Backend(Declining(fail))
    buf = [memoryview(bytearray(512))]
    assert b.try_pread(0, 512) is None and not b.try_pwrite(0, b"x" * 512)
    assert not b.try_preadv(0, 512, buf) and not b.try_pwritev(0, 512, buf)
    assert b.stats.in_flight == 0
    assert b.stats.ops["read"].ops == 0 and b.stats.ops["write"].ops == 0


async def test_zero_length_requests_do_nothing_and_one_byte_does() -> None:
    d = Logged()
    b = Backend(d)
    for offset in (0, SIZE):
        assert await b.pread(offset, 0) == b""
        await b.pwrite(offset, b"")
        await b.trim(offset, 0)
        await b.zero(offset, 0)
        await b.cache(offset, 0)
    assert d.log == []
    assert b.try_pwrite(0, b"q") and b.try_pread(0, 1) == b"q"
    one = [memoryview(bytearray(1))]
    assert b.try_pwritev(1, 1, [memoryview(b"r")]) and b.try_preadv(1, 1, one)
    assert bytes(one[0]) == b"r"


async def test_capabilities_and_native_cache() -> None:
    b = Backend(Logged())
    assert b.can_fua and b.can_cache and b.can_flush and not b.can_fast_zero
    assert not Backend(Logged(), read_only=True).can_fua
    logged: list[tuple[int, int]] = []

    class Caching(RamDriver):
        async def cache(self, offset: int, length: int) -> None:
            logged.append((offset, length))

    c = Backend(Caching(SIZE))
    await c.cache(4096, 8192)
    assert logged == [(4096, 8192)] and c.stats.ops["cache"].bytes == 8192
    await c.flush()
    await c.extents(0, 4096)
    assert c.stats.ops["flush"].bytes == 0 and c.stats.ops["extents"].bytes == 0
    assert c.stats.ops["extents"].ops == 1


class NoInline(RamDriver):
    """A RAM disk without a synchronous write (as the NBD client and RBD drivers)."""

    pwrite_nowait = Driver.pwrite_nowait


class Serial(RamDriver):
    parallel = False


@pytest.mark.parametrize(
    ("driver", "read_only", "inline"),
    [
        (RamDriver(SIZE), False, True),
        (RamDriver(SIZE), True, False),
        (NoInline(SIZE), False, False),
        (Serial(SIZE), False, False),
    ],
    ids=["ram", "read-only", "no-pwrite_nowait", "serial"],
)
def test_writes_inline_only_where_try_pwrite_can_succeed(
    driver: RamDriver, read_only: bool, inline: bool
) -> None:
    """Backend.writes_inline opens the connection's small-write lane; where it is
    False, try_pwrite never succeeds, so the lane would only cost time."""
    backend = Backend(driver, read_only=read_only)
    assert backend.writes_inline is inline
    assert backend.try_pwrite(0, b"x" * 512) is inline
