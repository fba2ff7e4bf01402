"""Live per-export statistics: operations, bytes, errors, requests in flight, latency.

blktap kept rd_req/wr_req/rd_sect/wr_sect counters in sysfs; we keep the same per
operation plus errors by errno and a latency histogram. Latencies go into fixed
power-of-two buckets of nanoseconds (bucket ``i`` holds ``2**(i-1) < ns <= 2**i``), so
memory is fixed and a Prometheus histogram (``le`` = ``2**i`` ns) is exact, with the sum
kept beside it. Every request is counted exactly, with its bytes, and is one latency
observation.

Counting must cost nothing measurable on the hot path. A request that waits (a task)
reads the clock when it starts and when it ends. Requests served at once, in the
synchronous fast path (``Backend.try_pread``/``try_pwrite``), come in batches: the NBD
connection decodes every request a read from the socket brought and serves them one
after the other. Each of those costs one ``list.append`` of its length (about 15 ns);
the clock is read once when the batch begins (``begin``) and once when it ends and its
replies have been handed to the transport (``settle``). Each request of the batch is
then one observation of the batch's duration: an upper bound on its own time in the
server, which is exact for the last reply and, for the others, includes the time spent
on the requests ahead of it in the batch (corked replies leave together at the end).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

#: Operations counted separately. Front ends name their requests with these.
OPS = ("read", "write", "flush", "trim", "zero", "extents", "cache")
#: (ns - 1).bit_length() of a 64-bit duration is at most 64: no clamp on the hot path.
BUCKETS = 65
#: The clock latencies are read with (ns). The Xen ring's synchronous fast path reads it
#: itself (``t0 = now() if stats.enabled else 0``) and ends with done_inline().
now = _now = time.perf_counter_ns
#: TAPNBD_STATS=off starts every Stats disabled (to measure what counting costs).
ENABLED_BY_DEFAULT = os.environ.get("TAPNBD_STATS", "on").lower() not in ("0", "off", "no", "false")


@dataclass(slots=True)
class OpStats:
    """Counters for one operation."""

    bytes: int = 0
    errors: int = 0
    fua: int = 0  # requests that asked for FUA
    max_bytes: int = 0  # the largest request
    max_ns: int = 0
    sum_ns: int = 0  # of every latency counted, for a Prometheus histogram's _sum
    hist: list[int] = field(default_factory=lambda: [0] * BUCKETS)

    @property
    def ops(self) -> int:
        """Requests that succeeded: each is in one latency bucket (one add fewer per request)."""
        return sum(self.hist)

    def percentile(self, p: float) -> int:
        """Upper bound, in ns, of the bucket holding the p-th percentile (0 if none)."""
        total = sum(self.hist)
        if not total:
            return 0
        rank = p / 100 * total
        seen = 0
        for i, n in enumerate(self.hist):
            seen += n
            if seen >= rank and n:
                return min(1 << i, self.max_ns)
        return self.max_ns


class Stats:
    """Counters for one export, shared by all its connections and front ends."""

    __slots__ = (
        "_read",
        "_write",
        "connections",
        "enabled",
        "errors_by_errno",
        "in_flight",
        "inline_reads",
        "inline_writes",
        "ops",
        "started",
        "sync_error",
    )

    def __init__(self) -> None:
        self.ops = {op: OpStats() for op in OPS}
        self._read = self.ops["read"]  # for settle(), without a dict lookup
        self._write = self.ops["write"]
        self.errors_by_errno: dict[int, int] = {}
        self.in_flight = 0
        #: Lengths of the requests served at once since begin(), counted by settle().
        self.inline_reads: list[int] = []
        self.inline_writes: list[int] = []
        self.connections = 0
        self.started = time.time()
        self.enabled = ENABLED_BY_DEFAULT
        #: Why the export can no longer promise durability (Backend.sync_failed), or None.
        self.sync_error: str | None = None

    def start(self) -> int:
        if not self.enabled:
            return 0
        self.in_flight += 1
        return _now()

    def abandon(self) -> None:
        """Undo start() for a request that was handed on elsewhere, uncounted."""
        if self.enabled:
            self.in_flight -= 1

    def done(self, op: str, nbytes: int, t0: int, fua: bool = False) -> None:
        # The hot path: plain statements only (no min(), no global lookups of time).
        if not self.enabled:
            return
        dt = _now() - t0
        self.in_flight -= 1
        s = self.ops[op]
        s.bytes += nbytes
        s.sum_ns += dt
        s.hist[(dt - 1).bit_length()] += 1  # 0 ns lands in bucket 1 (le 2 ns)
        if dt > s.max_ns:
            s.max_ns = dt
        if nbytes > s.max_bytes:
            s.max_bytes = nbytes
        if fua:
            s.fua += 1

    def done_inline(self, op: str, nbytes: int, t0: int) -> None:
        """done() for a request served within one synchronous call (Backend.try_pread):
        nothing can look at ``in_flight`` meanwhile, so it is left alone, and there is
        no start() call. ``t0`` is 0 when statistics are off."""
        # done()'s body without in_flight, written out again: a call would cost more.
        if not t0:
            return
        dt = _now() - t0
        s = self.ops[op]
        s.bytes += nbytes
        s.sum_ns += dt
        s.hist[(dt - 1).bit_length()] += 1
        if dt > s.max_ns:
            s.max_ns = dt
        if nbytes > s.max_bytes:
            s.max_bytes = nbytes

    def begin(self) -> int:
        """A batch of requests begins; pass what this returns to settle() when it ends.

        Between the two, ``inline_reads``/``inline_writes`` collect the lengths of the
        requests served at once (Backend.try_pread/try_pwrite) when statistics are on;
        the caller must settle() before it yields to the event loop.
        """
        return _now() if self.enabled else 0

    def settle(self, t0: int) -> None:
        """Count the batch's requests served at once, each with the batch's duration."""
        # A batch of one request is counted written out: a call here costs as much as
        # the rest, which matters to a client that sends one request at a time. A batch
        # is nearly always all reads or all writes; the other kind of a mixed one is
        # counted by _count.
        reads, writes = self.inline_reads, self.inline_writes
        if reads:
            lengths, s = reads, self._read
        elif writes:
            lengths, s = writes, self._write
        else:
            return
        if not t0:  # off when the batch began: nothing to time them by, and no leak
            reads.clear()
            writes.clear()
            return
        dt = _now() - t0
        if len(lengths) == 1:  # _count written out for one request
            nbytes = lengths[0]
            s.bytes += nbytes
            if nbytes > s.max_bytes:
                s.max_bytes = nbytes
            s.sum_ns += dt
            s.hist[(dt - 1).bit_length()] += 1
            if dt > s.max_ns:
                s.max_ns = dt
            lengths.clear()
        else:
            _count(s, lengths, dt)
        if writes:  # (a mixed batch's)
            _count(self._write, writes, dt)

    def add_bytes(self, op: str, nbytes: int, whole: int) -> None:
        """Bytes of one request that its count left out: a WRITE whose first parts were
        spliced before the rest took the usual path, which counted the rest. ``whole``:
        the request's length, for the largest seen."""
        if not self.enabled:
            return
        s = self.ops[op]
        s.bytes += nbytes
        if whole > s.max_bytes:
            s.max_bytes = whole

    def fail(self, op: str, err: int, t0: int) -> None:
        if not self.enabled:
            return
        self.in_flight -= 1
        self.ops[op].errors += 1
        self.errors_by_errno[err] = self.errors_by_errno.get(err, 0) + 1

    def snapshot(self) -> dict[str, object]:
        """A JSON-ready copy of every counter, with latency percentiles in microseconds."""
        ops: dict[str, object] = {}
        for name, s in self.ops.items():
            ops[name] = {
                "ops": s.ops,
                "bytes": s.bytes,
                "errors": s.errors,
                "fua": s.fua,
                "max_bytes": s.max_bytes,
                "p50_us": s.percentile(50) / 1000,
                "p99_us": s.percentile(99) / 1000,
                "max_us": s.max_ns / 1000,
                "sum_ns": s.sum_ns,
                "hist": _trimmed(s.hist),
            }
        return {
            "ops": ops,
            "errors_by_errno": {str(k): v for k, v in sorted(self.errors_by_errno.items())},
            "in_flight": self.in_flight,
            "connections": self.connections,
            "sync_error": self.sync_error,
            "uptime_s": round(time.time() - self.started, 3),
        }


def _count(s: OpStats, lengths: list[int], dt: int) -> None:
    """``lengths`` requests that took ``dt`` ns each (Stats.settle), then forget them."""
    n = len(lengths)
    s.bytes += sum(lengths)
    s.sum_ns += dt * n
    s.hist[(dt - 1).bit_length()] += n
    if dt > s.max_ns:
        s.max_ns = dt
    if (biggest := max(lengths)) > s.max_bytes:
        s.max_bytes = biggest
    lengths.clear()


def _trimmed(hist: list[int]) -> list[int]:
    """``hist`` without its trailing empty buckets (a snapshot travels as JSON)."""
    end = len(hist)
    while end and not hist[end - 1]:
        end -= 1
    return hist[:end]
