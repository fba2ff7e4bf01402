"""The filters in-process, on a RAM disk: parsing, rates, the trigger file, pass-through.

The behaviour a client sees is tested through ``tapnbd serve`` in test_faults.py; these
pin down the pieces (what a spec parses to, that a filter changes nothing it is not
asked to) quickly.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from formats.filters import (
    DelayFilter,
    ErrorFilter,
    ErrorRule,
    FaultSpec,
    parse_delay,
    parse_error_rule,
)
from formats.ram import RamDriver
from tapnbd.backend import Backend
from tapnbd.errors import RequestError, TapnbdError


def test_parse_error_rules() -> None:
    assert parse_error_rule("EIO:1%") == ErrorRule(errno.EIO, 0.01)
    assert parse_error_rule("enospc:0.5:write,flush") == ErrorRule(
        errno.ENOSPC, 0.5, frozenset({"write", "flush"})
    )
    assert parse_error_rule("5:100%:read").err == errno.EIO
    for bad in ("EIO", "EIO:1%:read:x", "ENOPE:1%", "EIO:x%", "EIO:101%", "EIO:1%:frob"):
        with pytest.raises(TapnbdError):
            parse_error_rule(bad)


def test_parse_delays() -> None:
    assert parse_delay("read=5ms") == {"read": 0.005}
    assert parse_delay("read,write=2") == {"read": 2.0, "write": 2.0}
    assert set(parse_delay("all=1us")) == {
        "read", "write", "flush", "trim", "zero", "extents", "cache",
    }  # fmt: skip
    for bad in ("read", "read=fast", "read=-1ms", "nap=1ms"):
        with pytest.raises(TapnbdError):
            parse_delay(bad)


async def test_error_filter_rate_and_trigger(tmp_path: Path) -> None:
    trigger = tmp_path / "on"
    ram = RamDriver(1 << 20)
    f = ErrorFilter(ram, [parse_error_rule("EIO:30%:write")], trigger=str(trigger), seed=1)
    backend = Backend(f)
    # Trigger absent: no faults, and the capabilities are the child's.
    for i in range(50):
        await backend.pwrite(i * 512, b"x" * 512)
    assert f.injected == {} and backend.can_trim == Backend(ram).can_trim
    trigger.touch()
    failed = 0
    for i in range(1000):
        try:
            await backend.pwrite(0, bytes([i % 256]) * 512)
        except RequestError as e:
            assert e.errno == errno.EIO
            failed += 1
    assert f.injected == {"write": failed} and 230 <= failed <= 370
    assert bytes(await backend.pread(0, 1)) != b"x"  # the writes that passed landed
    assert not backend.try_pwrite(0, b"y" * 512)  # faulted ops skip the fast path
    assert backend.try_pread(0, 512) is not None  # reads are not faulted: fast path kept


class Sleeps:
    """A stand-in for asyncio.sleep: records each delay and holds it until released."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self.release = asyncio.Event()
        self.changed = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        self.changed.set()
        await self.release.wait()

    async def until(self, n: int) -> None:
        while len(self.asked) < n:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 10)


async def test_delay_filter_delays_only_what_it_is_asked() -> None:
    sleeps = Sleeps()
    backend = Backend(DelayFilter(RamDriver(1 << 20), {"write": 0.05}, sleep=sleeps))
    await backend.pread(0, 4096)  # not delayed: completes with no sleep at all
    assert sleeps.asked == []
    # Eight writes are held in their delays at the same time (per request, no lock).
    writes = [asyncio.ensure_future(backend.pwrite(i * 4096, b"z" * 4096)) for i in range(8)]
    await sleeps.until(8)
    assert sleeps.asked == [0.05] * 8 and not any(w.done() for w in writes)
    assert bytes(await backend.pread(0, 4096)) == bytes(4096)  # reads pass them by
    sleeps.release.set()
    await asyncio.gather(*writes)
    assert bytes(await backend.pread(0, 4096)) == b"z" * 4096


def test_fault_spec_wraps_in_order() -> None:
    spec = FaultSpec.parse(["EIO:1%"], ["read=1ms"])
    outer = spec.wrap(RamDriver(4096))
    assert isinstance(outer, ErrorFilter) and isinstance(outer.child, DelayFilter)
    assert not FaultSpec.parse() and outer.size() == 4096 and outer.name == "ram"
