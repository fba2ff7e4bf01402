"""Polling for a client's next request before the event loop sleeps (``serve --poll-us``).

A client that sends one request at a time leaves the loop nothing to do between its
requests, so the loop sleeps and the CPU goes idle. On a virtual machine an idle CPU
halts, and a halted CPU wakes through the host with cold caches: measured on this
project's VM, tapnbd's loop then spends about 40 µs on a 4 KiB READ that costs it under
28 µs on a warm CPU (``bench/results/2026-12-03-s24-bonnie-read``). Watching the socket
for a few tens of microseconds first keeps the CPU awake for the next request.

The window starts at the limit and adapts to the client, in the spirit of QEMU's
``poll-max-ns``: it halves after each gap of more than ``SLOW`` limits (a client that
thinks between requests, or is idle) down to nothing, and doubles back after a shorter
one. A gap a little over the limit does not shrink it: a client whose next request
comes just too late for the window comes sooner while the CPU stays awake, and sooner
still once it does not halt. Off by default: it spends CPU that a machine running its
clients on the same cores may not have.

Only a server's one client polls. The loop serves every client, so while it watches one
socket it serves none of the others; and other clients' requests keep the loop awake
anyway, while they and the clients share the CPUs that a poll would spin on. Measured
with four fio jobs, one READ at a time each over a unix socket: polling the whole
server's sockets while it was idle still cost 15 % of the rate, and yielding the CPU
in the spin (``sched_yield``) did not win it back
(``bench/results/2026-12-03-s25-poll-clients``).
"""

from __future__ import annotations

import time

from tapnbd.server.splice import queued

#: The longest window ``--poll-us`` takes, in µs (serve, daemon start and tapdisk).
POLL_US_MAX = 1000
#: The smallest window; below it polling stops until a shorter gap comes.
START_NS = 4_000
#: A gap longer than this many limits is a client that polling does not help.
SLOW = 8


class Poller:
    """One connection's polling window, in nanoseconds; ``limit`` 0 turns it off."""

    __slots__ = ("caught", "idle_since", "limit", "window")

    def __init__(self, limit_ns: int) -> None:
        self.limit = max(0, limit_ns)
        self.window = self.limit
        self.idle_since = 0  # when the loop last went idle for this connection, or 0
        self.caught = 0  # requests that came within a window (tests and logs look)

    def wait(self, fd: int) -> bool:
        """Watch ``fd`` for up to the window; True if bytes came within it. Either way
        the gap until the next request is measured (``woken``)."""
        start = time.monotonic_ns()
        window = self.window
        if window:
            deadline = start + window
            while time.monotonic_ns() < deadline:
                if queued(fd):
                    self.idle_since = 0  # caught: the window stays as it is
                    self.caught += 1
                    return True
        self.idle_since = start
        return False

    def woken(self) -> None:
        """Bytes came after the loop slept: fit the window to the gap that was."""
        if not self.idle_since:
            return
        gap = time.monotonic_ns() - self.idle_since
        self.idle_since = 0
        if gap > SLOW * self.limit:  # slower than polling is worth: back off
            self.window = self.window // 2 if self.window > START_NS else 0
        else:
            self.window = min(self.limit, max(START_NS, 2 * self.window))
