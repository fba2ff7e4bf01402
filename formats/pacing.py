"""How a long copy (convert, commit, rebase, compare) reports and paces itself: qemu-img's
``-p`` (progress) and ``-r`` (rate limit).

``Pace`` carries both to the library: ``begin(total)`` once the bytes to move are known,
``await admit(n)`` before ``n`` bytes are read, ``advance(n)`` once they are done. The
CLI draws the bar (tapnbd.cli._progress); the library only calls.

The limit keeps the bytes admitted since ``begin`` within ``rate`` a second: a request
waits until the bytes admitted before it would have taken their time at that rate. The
first request goes at once, so a copy of B bytes takes at least (B - last) / rate
seconds; a copy that is slower than the rate never waits. Requests in flight at once
(convert's -m) each wait their turn in the order they were admitted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Pace:
    """Progress callbacks and a rate limit (0: none) for one copy."""

    rate: int = 0
    started: Callable[[int], None] | None = None
    progressed: Callable[[int], None] | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    _t0: float | None = field(default=None, init=False)
    _admitted: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ValueError(f"rate limit {self.rate}: must be positive")

    def begin(self, total: int) -> None:
        """The copy starts, with ``total`` bytes to go (for the bar)."""
        self._t0 = self.clock()
        if self.started is not None:
            self.started(total)

    async def admit(self, n: int) -> None:
        """Wait, if the rate asks it, before ``n`` more bytes are read."""
        if not self.rate:
            return
        if self._t0 is None:
            self._t0 = self.clock()
        due = self._t0 + self._admitted / self.rate
        self._admitted += n  # counted before the wait: the next request queues behind
        wait = due - self.clock()
        if wait > 0:
            await self.sleep(wait)

    def advance(self, n: int) -> None:
        """``n`` more bytes are done."""
        if self.progressed is not None:
            self.progressed(n)
