"""formats.overlay's throwaway qcow2 overlay, and the qcow2 partial zeroing it relies on
for space, at the driver level (the server's tests compare both with qemu-nbd)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from formats.filters import FilterDriver
from formats.overlay import open_throwaway_overlay
from formats.qcow2.driver import Qcow2Driver
from formats.ram import RamDriver
from tapnbd.driver import Extent

KiB = 1 << 10


class GatedStatus(FilterDriver):
    """Block status waits for ``gate``, and says when it started waiting."""

    def __init__(self, child: RamDriver) -> None:
        super().__init__(child)
        self.asked = asyncio.Event()
        self.gate = asyncio.Event()

    async def extents(self, offset: int, length: int) -> list[Extent]:
        self.asked.set()
        await self.gate.wait()
        return await self.child.extents(offset, length)


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return tmp_path


async def test_a_write_during_a_widened_zeroing_is_kept(scratch: Path) -> None:
    """A zeroing that would flag a whole cluster zero looks at the backing file first;
    a write into the same cluster that lands meanwhile must survive it."""
    base = GatedStatus(RamDriver(1 << 20))
    d = await open_throwaway_overlay(base)
    assert isinstance(d, Qcow2Driver)
    assert os.listdir(scratch) == []  # the overlay's file and directory are unlinked
    zeroing = asyncio.ensure_future(d.zero(68 * KiB, 4 * KiB, may_trim=True, fua=False, fast=False))
    await base.asked.wait()
    await d.pwrite(72 * KiB, b"w" * 4096)  # the same cluster, allocated now
    base.gate.set()
    await zeroing
    assert bytes(await d.pread(64 * KiB, 64 * KiB)) == bytes(8 * KiB) + b"w" * 4096 + bytes(
        52 * KiB
    )
    await d.close()


async def test_the_overlay_takes_writes_and_leaves_the_base_alone(scratch: Path) -> None:
    base = RamDriver(1 << 20)
    await base.pwrite(0, b"b" * 8192)
    d = await open_throwaway_overlay(base)
    await d.pwrite(4096, b"o" * 4096)
    await d.zero(64 * KiB, 4 * KiB, may_trim=True, fua=False, fast=False)
    assert bytes(await d.pread(0, 8192)) == b"b" * 4096 + b"o" * 4096
    assert bytes(await base.pread(0, 8192)) == b"b" * 8192
    assert isinstance(d, Qcow2Driver) and d.backing is base
    await d.close()
