"""The raw driver's flush path: a failed fdatasync sticks (issue 11, "fsyncgate")."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from formats import raw
from formats.raw import RawDriver


def test_failed_fdatasync_is_never_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    calls = []

    def failing(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, "writeback error")

    async def main() -> None:
        drv = RawDriver(str(path))
        await drv.pwrite(0, b"x" * 4096)
        await drv.flush()
        with monkeypatch.context() as m:
            m.setattr(os, "fdatasync", failing)
            with pytest.raises(OSError) as e:
                await drv.flush()
            assert e.value.errno == errno.EIO and len(calls) == 1
        # The disk answers again, but the kernel may have dropped our pages: no retry.
        for _ in range(2):
            with pytest.raises(OSError, match="earlier sync failed") as e:
                await drv.flush()
            assert e.value.errno == errno.EIO
        with pytest.raises(OSError, match="earlier sync failed"):
            await drv.pwrite(0, b"y" * 4096, fua=True)
        await drv.pwrite(0, b"z" * 4096)  # plain writes go on
        assert len(calls) == 1
        await drv.close()
        reopened = RawDriver(str(path))  # reopening is how an operator clears it
        await reopened.flush()
        await reopened.close()

    asyncio.run(main())


def test_a_refused_fua_write_does_not_stick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on an RWF_DSYNC write refused the write (a full disk); it lost nothing
    acknowledged before, so later flushes go on (test_full_disk.py recovers so)."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))

    def full(fd: int, data: object, offset: int, flags: int = 0) -> None:
        raise OSError(errno.ENOSPC, "no space left")

    async def main() -> None:
        drv = RawDriver(str(path))
        with monkeypatch.context() as m:
            m.setattr(raw, "pwrite_all", full)
            with pytest.raises(OSError) as e:
                await drv.pwrite(0, b"y" * 4096, fua=True)
            assert e.value.errno == errno.ENOSPC
        await drv.flush()
        await drv.pwrite(0, b"y" * 4096, fua=True)
        await drv.close()

    asyncio.run(main())
