"""The Backend's own rules, seen from a driver that logs what reaches it: FUA emulated
by a flush after the write, zeroing and CACHE emulated in ZERO_CHUNK pieces, the
synchronous fast paths' range checks, close flushing once, errno mapping, and every
path counted. (make mutate on tapnbd/backend.py found these untested.)"""

from __future__ import annotations

import errno

import pytest

from formats.ram import RamDriver
from tapnbd.backend import ZERO_CHUNK, Backend, request_errno
from tapnbd.driver import FuaMode
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
    assert b.try_pwrite(SIZE - 512, b"z" * 512)  # up to the very end
    assert not b.try_pwrite(SIZE - 511, b"z" * 512) and not b.try_pwrite(-1, b"z")
    assert not b.try_pwrite(0, b"")
    assert b.try_pread(SIZE - 512, 512) == b"z" * 512
    assert b.try_pread(SIZE - 511, 512) is None and b.try_pread(-1, 1) is None
    assert b.try_pread(0, 0) is None
    assert [e[0] for e in d.log] == ["read_nowait"]  # only the valid read got through
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
