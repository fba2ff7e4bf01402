"""One conformance suite for every driver, through the Backend (nbdkit's contract)."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from formats import open_image
from formats.ram import RamDriver
from formats.raw import RawDriver
from tapnbd.backend import Backend
from tapnbd.driver import Driver, ExtentFlags, FuaMode
from tapnbd.errors import RequestError

SIZE = 8 << 20


async def make_raw(tmp: Path) -> Driver:
    path = tmp / "raw.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return RawDriver(str(path))


async def make_ram(tmp: Path) -> Driver:
    return RamDriver(SIZE)


async def make_qcow_optimised(tmp: Path) -> Driver:
    from formats.qcow.create import create_qcow

    await create_qcow(str(tmp / "opt.qcow"), SIZE)
    return await open_image(str(tmp / "opt.qcow"))


async def make_qcow_normal(tmp: Path) -> Driver:
    from formats.qcow.create import create_qcow

    await create_qcow(str(tmp / "normal.qcow"), SIZE, optimise=False)
    return await open_image(str(tmp / "normal.qcow"))


async def make_qcow_overlay(tmp: Path) -> Driver:
    from formats.qcow.create import create_qcow

    base = await make_raw(tmp)
    await base.close()
    await create_qcow(str(tmp / "overlay.qcow"), backing=str(tmp / "raw.img"))
    return await open_image(str(tmp / "overlay.qcow"), fmt="qcow")  # given: backing followed


async def make_qcow2(tmp: Path) -> Driver:
    from formats.qcow2.create import create_qcow2

    await create_qcow2(str(tmp / "d.qcow2"), SIZE, cluster_size=4096)
    return await open_image(str(tmp / "d.qcow2"))


async def make_qcow2_overlay(tmp: Path) -> Driver:
    from formats.qcow2.create import create_qcow2

    base = await make_raw(tmp)
    await base.close()
    await create_qcow2(str(tmp / "overlay.qcow2"), None, backing="raw.img", backing_fmt="raw")
    return await open_image(str(tmp / "overlay.qcow2"), fmt="qcow2")  # given


MAKERS: dict[str, Callable[[Path], object]] = {
    "raw": make_raw,
    "ram": make_ram,
    "qcow-optimised": make_qcow_optimised,
    "qcow-normal": make_qcow_normal,
    "qcow-overlay": make_qcow_overlay,
    "qcow2": make_qcow2,
    "qcow2-overlay": make_qcow2_overlay,
}


@pytest.fixture(params=sorted(MAKERS))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    driver = await MAKERS[request.param](tmp_path)  # type: ignore[misc]
    b = Backend(driver)
    yield b
    await b.close()


async def test_write_read_roundtrip(backend: Backend) -> None:
    data = os.urandom(65536 + 123)
    await backend.pwrite(4096 + 7, data)
    assert bytes(await backend.pread(4096 + 7, len(data))) == data
    await backend.pwrite(SIZE - 512, b"\x01" * 512, fua=True)
    assert bytes(await backend.pread(SIZE - 512, 512)) == b"\x01" * 512
    await backend.flush()


async def test_zero_and_trim_read_back_zero(backend: Backend) -> None:
    await backend.pwrite(0, b"\xff" * (1 << 20))
    await backend.zero(4096, 65536, may_trim=False)
    await backend.zero(131072, 65536, may_trim=True, fast=backend.can_fast_zero)
    assert bytes(await backend.pread(4096, 65536)) == bytes(65536)
    assert bytes(await backend.pread(131072, 65536)) == bytes(65536)
    assert bytes(await backend.pread(0, 4096)) == b"\xff" * 4096
    if backend.can_trim:
        await backend.trim(0, 1 << 20)  # contents undefined afterwards, but no error


async def test_extents_cover_the_range_in_order(backend: Backend) -> None:
    await backend.pwrite(1 << 20, b"\xaa" * (1 << 20))
    extents = await backend.extents(0, SIZE)
    pos = 0
    for e in extents:
        assert e.offset == pos and e.length > 0
        pos += e.length
    assert pos == SIZE
    data_at = [e for e in extents if e.offset <= 1 << 20 < e.offset + e.length]
    assert not data_at[0].flags & ExtentFlags.HOLE
    one = await backend.extents(0, SIZE, req_one=True)
    assert len(one) == 1 and one[0].length <= SIZE


async def test_range_and_read_only_errors(backend: Backend) -> None:
    for call, err in (
        (lambda: backend.pread(SIZE, 1), errno.EINVAL),
        (lambda: backend.pread(SIZE - 1, 2), errno.EINVAL),
        (lambda: backend.pwrite(SIZE, b"x"), errno.ENOSPC),
        (lambda: backend.zero(SIZE - 1, 2), errno.ENOSPC),
        (lambda: backend.extents(SIZE, 1), errno.EINVAL),
    ):
        with pytest.raises(RequestError) as info:
            await call()
        assert info.value.errno == err
    ro = Backend(backend.driver, read_only=True)
    with pytest.raises(RequestError) as info:
        await ro.pwrite(0, b"x")
    assert info.value.errno == errno.EPERM
    assert not ro.can_trim and not ro.can_zero and ro.fua_mode is FuaMode.NONE


class Minimal(Driver):
    """Only size/pread/pwrite/flush: the Backend must emulate the rest."""

    name = "minimal"

    def __init__(self) -> None:
        self.buf = bytearray(SIZE)
        self.flushes = 0

    def size(self) -> int:
        return SIZE

    async def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset : offset + length])

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        assert not fua, "FUA must be emulated with flush for this driver"
        self.buf[offset : offset + len(data)] = data

    async def flush(self) -> None:
        self.flushes += 1


async def test_backend_emulates_what_the_driver_lacks() -> None:
    d = Minimal()
    b = Backend(d)
    assert (b.can_trim, b.can_fast_zero, b.can_extents, b.fua_mode) == (
        False,
        False,
        False,
        FuaMode.EMULATE,
    )
    d.buf[:] = b"\x07" * SIZE
    await b.zero(0, 3 << 20)  # emulated by writing zeros, in chunks
    assert bytes(d.buf[: 3 << 20]) == bytes(3 << 20) and d.buf[3 << 20] == 7
    with pytest.raises(RequestError) as info:
        await b.zero(0, 4096, fast=True)
    assert info.value.errno == errno.ENOTSUP
    await b.pwrite(0, b"x", fua=True)
    assert d.flushes == 1  # FUA emulated by a flush
    assert [(e.offset, e.length, e.flags) for e in await b.extents(0, SIZE)] == [(0, SIZE, 0)]
    await b.cache(0, 1 << 20)  # emulated by reading
    with pytest.raises(RequestError) as info:
        await b.trim(0, 4096)
    assert info.value.errno == errno.EINVAL


class Failing(Minimal):
    async def pread(self, offset: int, length: int) -> bytes:
        raise OSError(errno.EIO, "media error")

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        raise OSError(errno.EDQUOT, "quota")


async def test_driver_errors_map_to_nbd_errnos() -> None:
    b = Backend(Failing())
    with pytest.raises(RequestError) as info:
        await b.pread(0, 1)
    assert info.value.errno == errno.EIO
    with pytest.raises(RequestError) as info:
        await b.pwrite(0, b"x")
    assert info.value.errno == errno.ENOSPC  # "map EDQUOT and EFBIG to ENOSPC"
    snap = b.stats.snapshot()
    assert snap["errors_by_errno"] == {str(errno.EIO): 1, str(errno.ENOSPC): 1}
