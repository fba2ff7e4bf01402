"""Statistics of requests served at once: counted per request, timed per batch.

Backend.try_pread/try_pwrite append a length; Stats.settle() counts the batch with one
clock read. Counts and bytes stay exact, and each request is one latency observation
(of the batch's duration), through a real client pipelining requests too.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from formats.ram import RamDriver
from tapnbd import stats as stats_mod
from tapnbd.backend import Backend
from tests.helpers import Server, nbdsh_script


def _clock(monkeypatch: pytest.MonkeyPatch, *times: int) -> Iterator[int]:
    clock = iter(times)
    monkeypatch.setattr(stats_mod, "_now", lambda: next(clock))
    return clock


def test_batch_counts_each_request_with_the_batch_duration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _clock(monkeypatch, 10_000, 10_000 + 3000)  # one read at each end: 3 us
    backend = Backend(RamDriver(1 << 20))
    stats = backend.stats
    stats.enabled = True
    t0 = stats.begin()
    for length in (512, 4096, 1024):
        assert backend.try_pread(0, length) is not None
    assert backend.try_pwrite(8192, b"w" * 2048)
    assert backend.try_pread(0, 0) is None  # refused: not counted
    stats.settle(t0)
    read, write = stats.ops["read"], stats.ops["write"]
    assert (read.ops, read.bytes, read.max_bytes) == (3, 512 + 4096 + 1024, 4096)
    assert (write.ops, write.bytes, write.max_bytes) == (1, 2048, 2048)
    # 2048 < 3000 <= 4096: bucket 12; every request of the batch is one observation.
    assert read.hist[12] == 3 and write.hist[12] == 1
    assert (read.sum_ns, write.sum_ns, read.max_ns) == (9000, 3000, 3000)
    assert stats.inline_reads == [] and stats.inline_writes == []
    stats.settle(t0)  # nothing pending: no clock read, nothing counted twice
    assert next(clock, None) is None and read.ops == 3


def test_one_request_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    _clock(monkeypatch, 1, 1 + 1025)
    backend = Backend(RamDriver(1 << 20))
    backend.stats.enabled = True
    t0 = backend.stats.begin()
    assert backend.try_pread(4096, 4096) is not None
    backend.stats.settle(t0)
    read = backend.stats.ops["read"]
    assert (read.ops, read.bytes, read.max_bytes, read.sum_ns, read.hist[11]) == (
        1,
        4096,
        4096,
        1025,
        1,
    )


def test_write_batches_one_and_several(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of writes alone (the fast lane's), of one request and of several."""
    _clock(monkeypatch, 1, 1 + 1025, 100, 100 + 5000)
    backend = Backend(RamDriver(1 << 20))
    stats = backend.stats
    stats.enabled = True
    t0 = stats.begin()
    assert backend.try_pwrite(0, b"a" * 4096)
    stats.settle(t0)
    t0 = stats.begin()
    for length in (512, 8192, 1024):
        assert backend.try_pwrite(65536, b"b" * length)
    stats.settle(t0)
    write, read = stats.ops["write"], stats.ops["read"]
    assert (write.ops, write.bytes, write.max_bytes) == (4, 4096 + 512 + 8192 + 1024, 8192)
    assert (write.hist[11], write.hist[13], write.sum_ns, write.max_ns) == (1, 3, 16025, 5000)
    assert read.ops == 0 and stats.inline_writes == []


def test_off_costs_no_clock_and_counts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    _clock(monkeypatch)  # any clock read raises StopIteration
    backend = Backend(RamDriver(1 << 20))
    backend.stats.enabled = False
    t0 = backend.stats.begin()
    assert t0 == 0
    assert backend.try_pread(0, 4096) is not None and backend.try_pwrite(0, b"x" * 512)
    assert backend.stats.inline_reads == [] and backend.stats.inline_writes == []
    backend.stats.settle(t0)
    assert backend.stats.ops["read"].ops == 0 and backend.stats.ops["write"].ops == 0


def test_settle_of_a_batch_begun_with_statistics_off_forgets_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Turned on in the middle of a batch (no t0): its requests are dropped, not kept."""
    _clock(monkeypatch)
    backend = Backend(RamDriver(1 << 20))
    backend.stats.enabled = False
    t0 = backend.stats.begin()
    backend.stats.enabled = True
    assert backend.try_pread(0, 4096) is not None
    backend.stats.settle(t0)
    assert backend.stats.inline_reads == [] and backend.stats.ops["read"].ops == 0


#: Requests pipelined by libnbd: the server decodes several from one socket read, so
#: they are served in batches. Lengths vary so that bytes and the largest are checked.
PIPELINED = """
import json, random, sys, nbd
rng = random.Random(int(sys.argv[2]))
h = nbd.NBD()
h.connect_uri(sys.argv[1])
writes = [rng.randrange(1, 17) * 4096 for _ in range(48)]
reads = [rng.randrange(1, 17) * 512 for _ in range(64)]
for i, n in enumerate(writes):
    h.aio_pwrite(bytes([i]) * n, i * 65536)
for i, n in enumerate(reads):
    h.aio_pread(nbd.Buffer(n), (i % 48) * 65536)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.shutdown()
print(json.dumps({"reads": reads, "writes": writes}))
"""


def test_pipelined_requests_counted_exactly(
    serve: Callable[..., Server], raw_image: Path, tmp_path: Path
) -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    stats_file = tmp_path / "stats.json"
    server = serve(str(raw_image), "--format", "raw", "--stats-file", str(stats_file))
    sent = nbdsh_script(PIPELINED, server.uri, str(seed))
    assert isinstance(sent, dict)
    assert server.stop() == 0
    ops = json.loads(stats_file.read_text())["disk.img"]["ops"]
    for op in ("read", "write"):
        lengths = sent[op + "s"]
        got = ops[op]
        assert (got["ops"], got["bytes"], got["max_bytes"]) == (
            len(lengths),
            sum(lengths),
            max(lengths),
        ), op
        assert sum(got["hist"]) == len(lengths) and got["sum_ns"] > 0 and got["errors"] == 0
