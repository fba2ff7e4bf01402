"""Filters: drivers that wrap another driver, in the manner of nbdkit's filters.

A filter sits in front of any driver (a whole export, or a format's image file) and
passes every call through to ``child``, capabilities included, changing only what it is
for. The two here are for testing how the rest of the stack copes with faults:

- ``ErrorFilter`` makes chosen operations fail with an errno at a given rate (nbdkit's
  error filter: ``error=EIO error-rate=1% error-pread=...``, ``error-file=``);
- ``DelayFilter`` makes chosen operations slow (nbdkit's delay filter:
  ``rdelay=5ms wdelay=...``).

``tapnbd serve --inject-error EIO:1%[:read,write] --delay read=5ms`` puts them in front
of every export; ``--inject-at file`` puts them between the qcow format and its image
file instead, so that a write can fail half-way through the format's work.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tapnbd.driver import BlockSize, Driver, Extent, FuaMode
from tapnbd.errors import TapnbdError

if TYPE_CHECKING:
    from collections.abc import Coroutine

#: Operation names, as in ``tapnbd stats``. ``grow`` is the format's file growing.
OPS = ("read", "write", "flush", "trim", "zero", "extents", "cache", "grow")


class FilterDriver(Driver):
    """Passes everything through to ``child`` (nbdkit's ``next`` calls)."""

    def __init__(self, child: Driver) -> None:
        self.child = child
        # What the stack looks like from above is what the child is.
        self.name = child.name  # type: ignore[misc]
        self.parallel = child.parallel  # type: ignore[misc]

    def __getattr__(self, attr: str) -> Any:
        # Anything the Driver interface does not name (RawDriver.grow, a path, ...).
        if attr == "child":  # not set yet: don't recurse
            raise AttributeError(attr)
        return getattr(self.child, attr)

    # Hooks for subclasses: called before each operation, and to veto the fast paths.

    async def before(self, op: str) -> None:
        """Run before ``op`` reaches the child; may raise or sleep."""

    def intercepts(self, op: str) -> bool:
        """Whether ``op`` must go through ``before`` (and so not the synchronous paths)."""
        return False

    def size(self) -> int:
        return self.child.size()

    def pread(
        self, offset: int, length: int
    ) -> Coroutine[Any, Any, bytes | bytearray | memoryview]:
        if not self.intercepts("read"):
            return self.child.pread(offset, length)
        return self._pread(offset, length)

    async def _pread(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        await self.before("read")
        return await self.child.pread(offset, length)

    def pread_nowait(self, offset: int, length: int) -> bytes | bytearray | None:
        return None if self.intercepts("read") else self.child.pread_nowait(offset, length)

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        await self.before("write")
        await self.child.pwrite(offset, data, fua)

    def pwrite_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        return False if self.intercepts("write") else self.child.pwrite_nowait(offset, data)

    async def flush(self) -> None:
        await self.before("flush")
        await self.child.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.before("trim")
        await self.child.trim(offset, length, fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        await self.before("zero")
        await self.child.zero(offset, length, may_trim=may_trim, fua=fua, fast=fast)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        await self.before("extents")
        return await self.child.extents(offset, length)

    async def cache(self, offset: int, length: int) -> None:
        await self.before("cache")
        await self.child.cache(offset, length)

    def bitmaps(self) -> list[str]:
        return self.child.bitmaps()

    async def bitmap_extents(self, name: str, offset: int, length: int) -> list[Extent]:
        await self.before("extents")
        return await self.child.bitmap_extents(name, offset, length)

    async def allocation_depth(self, offset: int, length: int) -> list[Extent]:
        await self.before("extents")
        return await self.child.allocation_depth(offset, length)

    async def close(self) -> None:
        await self.child.close()

    # Capabilities: the child's.

    def can_write(self) -> bool:
        return self.child.can_write()

    def can_flush(self) -> bool:
        return self.child.can_flush()

    def can_trim(self) -> bool:
        return self.child.can_trim()

    def can_fast_zero(self) -> bool:
        return self.child.can_fast_zero()

    def can_fua(self) -> FuaMode:
        return self.child.can_fua()

    def can_extents(self) -> bool:
        return self.child.can_extents()

    def can_cache(self) -> bool:
        return self.child.can_cache()

    def can_multi_conn(self) -> bool:
        return self.child.can_multi_conn()

    def is_rotational(self) -> bool:
        return self.child.is_rotational()

    def block_size(self) -> BlockSize:
        return self.child.block_size()

    def describe(self) -> dict[str, object]:
        return self.child.describe()


# The error filter.


@dataclass(frozen=True)
class ErrorRule:
    """Fail ``ops`` with ``err`` at ``rate`` (0..1)."""

    err: int
    rate: float
    ops: frozenset[str] = frozenset(OPS)

    def __str__(self) -> str:
        return f"{errno.errorcode.get(self.err, self.err)}:{self.rate:.2%}:{','.join(sorted(self.ops))}"


def parse_ops(text: str) -> frozenset[str]:
    ops = frozenset(o.strip() for o in text.split(",") if o.strip())
    unknown = ops - set(OPS)
    if unknown or not ops:
        raise TapnbdError(
            f"unknown operation(s) {', '.join(sorted(unknown)) or text!r}; known: {', '.join(OPS)}"
        )
    return ops


def parse_error_rule(text: str) -> ErrorRule:
    """``EIO:1%``, ``ENOSPC:0.5:write,flush``, ``5:100%`` (errno by name or number)."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 3:
        raise TapnbdError(f"--inject-error {text!r}: expected ERRNO:RATE[:OP,OP...]")
    name, rate_text = parts[0].strip(), parts[1].strip()
    if name.isdigit():
        err = int(name)
    else:
        value = getattr(errno, name.upper(), None)
        if not isinstance(value, int):
            raise TapnbdError(f"--inject-error {text!r}: unknown errno {name!r}")
        err = value
    try:
        rate = float(rate_text[:-1]) / 100 if rate_text.endswith("%") else float(rate_text)
    except ValueError:
        raise TapnbdError(f"--inject-error {text!r}: bad rate {rate_text!r}") from None
    if not 0 <= rate <= 1:
        raise TapnbdError(f"--inject-error {text!r}: rate must be 0..100%")
    ops = parse_ops(parts[2]) if len(parts) == 3 else frozenset(OPS)
    return ErrorRule(err, rate, ops)


class ErrorFilter(FilterDriver):
    """Injects errors: each call of an op in a rule fails with the rule's errno at its rate.

    With ``trigger``, errors are injected only while that file exists (nbdkit's
    ``error-file``), so a test can switch them on and off under a running server.
    ``injected`` counts the errors raised, per op.
    """

    def __init__(
        self,
        child: Driver,
        rules: Iterable[ErrorRule],
        *,
        trigger: str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(child)
        self.rules = list(rules)
        self.trigger = trigger
        self.rng = random.Random(seed)
        self.injected: dict[str, int] = {}
        self._ops = frozenset().union(*(r.ops for r in self.rules))

    def intercepts(self, op: str) -> bool:
        return op in self._ops

    def _fault(self, op: str) -> OSError | None:
        if op not in self._ops:
            return None
        if self.trigger is not None and not os.path.exists(self.trigger):
            return None
        for rule in self.rules:
            if op in rule.ops and rule.rate and self.rng.random() < rule.rate:
                self.injected[op] = self.injected.get(op, 0) + 1
                return OSError(rule.err, f"injected {os.strerror(rule.err)} ({op})")
        return None

    async def before(self, op: str) -> None:
        fault = self._fault(op)
        if fault is not None:
            raise fault

    def __getattr__(self, attr: str) -> Any:
        value = super().__getattr__(attr)
        if attr == "grow" and callable(value):
            # A format growing its file (qcow allocation): a synchronous call.
            grow: Callable[..., None] = value

            def faulty_grow(length: int, *, allocate: bool = False) -> None:
                fault = self._fault("grow")
                if fault is not None:
                    raise fault
                grow(length, allocate=allocate)

            return faulty_grow
        return value


# The delay filter.


def parse_delay(text: str) -> dict[str, float]:
    """``read=5ms``, ``write=0.1s``, ``read,write=2ms``, ``all=1ms`` (seconds if no unit)."""
    if "=" not in text:
        raise TapnbdError(f"--delay {text!r}: expected OP=TIME, e.g. read=5ms")
    ops_text, time_text = text.split("=", 1)
    t = time_text.strip().lower()
    scale = 1.0
    for suffix, factor in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
        if t.endswith(suffix):
            t, scale = t[: -len(suffix)], factor
            break
    try:
        seconds = float(t) * scale
    except ValueError:
        raise TapnbdError(f"--delay {text!r}: bad time {time_text!r}") from None
    if not 0 <= seconds <= 3600:
        raise TapnbdError(f"--delay {text!r}: time must be 0..3600 s")
    ops = frozenset(OPS) if ops_text.strip() == "all" else parse_ops(ops_text)
    return dict.fromkeys(sorted(ops - {"grow"}), seconds)


class DelayFilter(FilterDriver):
    """Sleeps before each op listed in ``delays`` ({op: seconds}), then passes it on.

    ``sleep`` is asyncio.sleep; a test passes its own to see each delay as an event.
    """

    def __init__(
        self,
        child: Driver,
        delays: Mapping[str, float],
        *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        super().__init__(child)
        self.delays = {op: s for op, s in delays.items() if s > 0}
        self.sleep = sleep

    def intercepts(self, op: str) -> bool:
        return op in self.delays

    async def before(self, op: str) -> None:
        seconds = self.delays.get(op)
        if seconds:
            await self.sleep(seconds)


# Building stacks.


@dataclass(frozen=True)
class FaultSpec:
    """What ``--inject-error``/``--delay`` asked for, and where."""

    errors: tuple[ErrorRule, ...] = ()
    delays: tuple[tuple[str, float], ...] = ()
    trigger: str | None = None
    seed: int | None = None

    @classmethod
    def parse(
        cls,
        errors: Iterable[str] = (),
        delays: Iterable[str] = (),
        *,
        trigger: str | None = None,
        seed: int | None = None,
    ) -> FaultSpec:
        merged: dict[str, float] = {}
        for d in delays:
            merged.update(parse_delay(d))
        return cls(
            tuple(parse_error_rule(e) for e in errors),
            tuple(sorted(merged.items())),
            trigger,
            seed,
        )

    def __bool__(self) -> bool:
        return bool(self.errors or self.delays)

    def wrap(self, driver: Driver) -> Driver:
        """``driver`` behind a delay filter and then an error filter (as asked)."""
        if self.delays:
            driver = DelayFilter(driver, dict(self.delays))
        if self.errors:
            driver = ErrorFilter(driver, self.errors, trigger=self.trigger, seed=self.seed)
        return driver


@contextmanager
def at_file_layer(wrap: Callable[[Driver], Driver] | None) -> Iterator[None]:
    """Images opened inside get ``wrap`` between their format and their file."""
    from formats.qcow import file_filter

    token = file_filter.set(wrap)
    try:
        yield
    finally:
        file_filter.reset(token)
