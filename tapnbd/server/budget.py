"""The server-wide budget of payload bytes in flight (issue 11: bounded memory).

Every READ reply being built and every WRITE payload being received holds up to 32 MiB
of the server's memory until its reply is handed to the transport or its write is done.
Connections charge each such request here *before* they decode it (so before a WRITE's
payload buffer is allocated or a READ's buffer is read into); when the budget is spent,
a connection stops decoding and reading and waits to be woken, rather than allocating.

Once a reply is handed to the transport its bytes are the connection's reply backlog,
which the connection bounds itself (it stops decoding while the transport is over its
high-water mark). So a server's payload memory is at most this budget plus, for each
connection, one backlog.

All calls are made on the event loop thread: a driver that reads in a thread (issue 15)
still has its request charged and released by the connection, on the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

#: Default budget, shared by all connections: eight 32 MiB requests in flight.
DEFAULT_PAYLOAD_BUDGET = 256 << 20


class PayloadBudget:
    """Bytes of payload in flight, server-wide, and the connections waiting for some."""

    def __init__(self, limit: int = DEFAULT_PAYLOAD_BUDGET) -> None:
        if limit <= 0:
            raise ValueError(f"payload budget must be positive, not {limit}")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.waits = 0  # times a connection had to wait: for tests and stats
        self._waiters: list[Callable[[], None]] = []
        self._wake_pending = False

    def take(self, nbytes: int) -> bool:
        """Charge ``nbytes``; False (nothing charged) when that would exceed the limit.

        A request is always admitted when nothing is in flight, so one bigger than the
        whole budget still runs (alone) instead of waiting for ever.
        """
        used = self.used + nbytes
        if used > self.limit and self.used:
            return False
        self.used = used
        if used > self.peak:
            self.peak = used
        return True

    def give(self, nbytes: int) -> None:
        """Release bytes charged by ``take``; wake the waiters (soon, not from here)."""
        self.used -= nbytes
        if self._waiters and not self._wake_pending:
            self._wake_pending = True
            # Not synchronously: give() runs inside some connection's request handling,
            # and the woken connections decode and dispatch requests of their own.
            asyncio.get_running_loop().call_soon(self._wake)

    def wait(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` once some bytes have been given back."""
        self.waits += 1
        if wake not in self._waiters:
            self._waiters.append(wake)

    def forget(self, wake: Callable[[], None]) -> None:
        """A waiting connection went away."""
        if wake in self._waiters:
            self._waiters.remove(wake)

    def _wake(self) -> None:
        self._wake_pending = False
        waiters, self._waiters = self._waiters, []
        for wake in waiters:  # first come, first served; who still cannot fit waits again
            wake()
