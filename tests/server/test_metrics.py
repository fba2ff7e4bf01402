"""``serve --metrics``: Prometheus counters and a real latency histogram, scraped with
curl after requests made by libnbd, so every count is known exactly."""

from __future__ import annotations

import re
import select
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tapnbd import stats as stats_mod
from tapnbd.control.messages import ExportStats, OpCounters
from tapnbd.control.metrics import LE_BUCKETS, MAX_CLIENTS, prometheus_text
from tapnbd.stats import Stats
from tests.helpers import Server, nbdsh_script, need, open_fds, run, tapnbd_cmd

#: 3 writes of 4 KiB, 5 reads of 4 KiB, 2 flushes, then one read past the end (EINVAL).
REQUESTS = """
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.set_strict_mode(0)  # let the out-of-range read reach the server
for i in range(3):
    h.pwrite(b"x" * 4096, i * 4096)
for i in range(5):
    h.pread(4096, i * 4096)
h.flush()
h.flush()
try:
    h.pread(4096, h.get_size())
except nbd.Error as e:
    err = e.errno
h.shutdown()
print(json.dumps(err))
"""

SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})? (\S+)$")


def scrape(sock: Path) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    need("curl")
    text = run(["curl", "-sf", "--unix-socket", str(sock), "http://x/metrics"]).stdout
    out = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            pairs = (kv.split("=", 1) for kv in m[2].split(",")) if m[2] else ()
            out[(m[1], frozenset((k, v.strip('"')) for k, v in pairs))] = float(m[3])
    return out


def lab(**kw: str) -> frozenset[tuple[str, str]]:
    return frozenset(kw.items())


def test_scrape_counts_match_requests(
    serve: Callable[..., Server], raw_image: Path, tmp_path: Path
) -> None:
    sock = tmp_path / "metrics.sock"
    server = serve(str(raw_image), "--metrics", f"unix:{sock}")
    assert nbdsh_script(REQUESTS, server.uri) == "EINVAL"  # the spec's errno past the end
    m = scrape(sock)
    name = "tapnbd_request_duration_seconds"
    for op, n, nbytes in (("read", 5, 5 * 4096), ("write", 3, 3 * 4096), ("flush", 2, 0)):
        e = {"export": "disk.img", "op": op}
        assert m[("tapnbd_requests_total", lab(**e))] == n
        assert m[("tapnbd_bytes_total", lab(**e))] == nbytes
        assert m[(f"{name}_count", lab(**e))] == n
        assert m[(f"{name}_bucket", lab(**e, le="+Inf"))] == n
        assert m[(f"{name}_sum", lab(**e))] > 0
        bounds = [m[(f"{name}_bucket", lab(**e, le=repr((1 << i) / 1e9)))] for i in LE_BUCKETS]
        assert bounds == sorted(bounds) and bounds[-1] == n  # cumulative; none over 34 s
    # The refused read (the connection checks ranges) is no read and no latency sample.
    assert m[(f"{name}_count", lab(export="disk.img", op="trim"))] == 0
    assert m[("tapnbd_up", frozenset())] == 1


def test_metrics_address_off_loopback_refused(raw_image: Path) -> None:
    proc = subprocess.run(
        tapnbd_cmd("serve", str(raw_image), "--port", "0", "--metrics", "0.0.0.0:9100"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "0.0.0.0:9100" in proc.stderr and "loopback" in proc.stderr


@pytest.mark.parametrize(("ns", "bucket"), [(1, 0), (2, 1), (3, 2), (1024, 10), (1025, 11)])
def test_latency_bucket_bounds(monkeypatch: pytest.MonkeyPatch, ns: int, bucket: int) -> None:
    """Bucket i holds 2**(i-1) < ns <= 2**i, so le=2**i ns is exact (no off-by-one)."""
    clock = iter([1000, 1000 + ns])
    monkeypatch.setattr(stats_mod, "_now", lambda: next(clock))
    s = Stats()
    s.enabled = True
    s.done("read", 512, s.start())
    hist = s.ops["read"].hist
    assert hist[bucket] == 1 and sum(hist) == 1
    assert s.ops["read"].sum_ns == ns and s.in_flight == 0


def test_prometheus_histogram_text() -> None:
    hist = [0] * 12
    hist[3], hist[10], hist[11] = 4, 2, 1  # 4 under 1.024 us, 2 at it, 1 above
    c = OpCounters(7, 7 * 4096, 0, 0.0, 0.0, 2.0, sum_ns=5000, hist=hist)
    e = ExportStats("d", "/d", "raw", {"read": c}, {}, 0, 0, 1.0, True)
    lines = prometheus_text([e], {}).splitlines()
    assert "# TYPE tapnbd_request_duration_seconds histogram" in lines
    b = 'tapnbd_request_duration_seconds_bucket{export="d",op="read",le='
    assert b + '"1.024e-06"} 6' in lines
    assert b + '"2.048e-06"} 7' in lines
    assert b + '"+Inf"} 7' in lines
    assert 'tapnbd_request_duration_seconds_sum{export="d",op="read"} 5e-06' in lines
    assert 'tapnbd_request_duration_seconds_count{export="d",op="read"} 7' in lines
    assert not any("p50" in line or "p99" in line for line in lines)


def test_idle_scrapers_cannot_take_the_servers_descriptors(
    serve: Callable[..., Server], raw_image: Path, tmp_path: Path
) -> None:
    """The attacker: another local user opens many connections to the metrics port (a
    loopback port is open to every uid) and says nothing. Without a cap, each would
    hold one of the server's descriptors until none is left for the NBD socket's
    accept. Over MAX_CLIENTS, a newcomer is closed at once, and the ones let in are
    closed when their exchange runs past its deadline."""
    sock = tmp_path / "metrics.sock"
    server = serve(str(raw_image), "--metrics", f"unix:{sock}")
    before = open_fds(server.proc.pid)
    idle = []
    for _ in range(MAX_CLIENTS + 40):
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(sock))
        idle.append(c)
    # Every newcomer over the cap sees its end of file (an event, no sleep).
    open_ = set(idle)
    while len(open_) > MAX_CLIENTS:
        ready, _, _ = select.select(list(open_), [], [], 30)
        assert ready, f"{len(open_)} idle connections still held after 30 s"
        for c in ready:
            assert c.recv(1) == b""
            open_.discard(c)
    # The server holds MAX_CLIENTS of them, no more, and still serves NBD.
    assert len(open_) == MAX_CLIENTS
    assert open_fds(server.proc.pid) <= before + MAX_CLIENTS
    assert nbdsh_script(REQUESTS, server.uri) == "EINVAL"
    # Those let in are dropped at their deadline (the count given back first), and a
    # scraper gets in again.
    while open_:
        ready, _, _ = select.select(list(open_), [], [], 30)
        assert ready, "an idle scraper let in was never dropped"
        open_.difference_update(ready)
    for c in idle:
        c.close()
    assert scrape(sock)[("tapnbd_up", frozenset())] == 1
