"""formats.filters.cachemode under a power cut (formats.filters.powerloss): what each
--cache mode promises once a write is answered."""

from __future__ import annotations

import pytest

from formats.filters.cachemode import CacheModeFilter, with_cache_mode
from formats.filters.powerloss import CrashState, PowerLossRecorder
from formats.ram import RamDriver
from tapnbd.backend import Backend
from tapnbd.driver import FuaMode
from tapnbd.errors import TapnbdError

SIZE = 1 << 20


class EmulatedFua(RamDriver):
    """A child without native FUA: the filter must flush after each write itself."""

    def can_fua(self) -> FuaMode:
        return FuaMode.EMULATE


def durable_only(rec: PowerLossRecorder) -> bytearray:
    """The file after a power cut now, with nothing beyond what was made durable."""
    return rec.materialise(CrashState(len(rec.events), frozenset()))


@pytest.mark.parametrize("child", [RamDriver, EmulatedFua])
async def test_writethrough_makes_every_write_durable(child: type[RamDriver]) -> None:
    rec = PowerLossRecorder(child(SIZE), bytes(SIZE))
    backend = Backend(with_cache_mode(rec, "writethrough"))
    assert not backend.try_pwrite(0, b"i" * 512)  # the inline path cannot promise it
    await backend.pwrite(0, b"w" * 4096)
    await backend.zero(8192, 4096)
    await backend.trim(4096, 4096)
    img = durable_only(rec)
    assert img[:4096] == b"w" * 4096
    assert rec.durable(len(rec.events))[1] == []  # nothing left in doubt


async def test_writeback_keeps_only_what_a_flush_covered() -> None:
    rec = PowerLossRecorder(RamDriver(SIZE), bytes(SIZE))
    backend = Backend(with_cache_mode(rec, "writeback"))
    await backend.pwrite(0, b"w" * 4096)
    assert durable_only(rec)[:4096] == bytes(4096)
    await backend.flush()
    assert durable_only(rec)[:4096] == b"w" * 4096


async def test_unsafe_drops_flush_and_fua() -> None:
    rec = PowerLossRecorder(RamDriver(SIZE), bytes(SIZE))
    backend = Backend(with_cache_mode(rec, "unsafe"))
    assert backend.can_fua
    await backend.pwrite(0, b"w" * 4096, fua=True)
    await backend.flush()
    assert durable_only(rec)[:4096] == bytes(4096)
    assert bytes(await backend.pread(0, 4096)) == b"w" * 4096  # still written
    assert not any(e.kind == "flush" for e in rec.events)


def test_what_each_mode_puts_on_top() -> None:
    with pytest.raises(TapnbdError, match="use writeback, writethrough, unsafe, none"):
        with_cache_mode(RamDriver(SIZE), "sometimes")
    ram = RamDriver(SIZE)
    assert with_cache_mode(ram, "writeback") is ram
    assert with_cache_mode(ram, "none") is ram  # (the files it was opened on are direct)
    for mode in ("unsafe", "writethrough", "directsync"):
        assert isinstance(with_cache_mode(ram, mode), CacheModeFilter)
