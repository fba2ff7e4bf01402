"""Fault injection through ``tapnbd serve --inject-error/--delay``, seen by real clients.

Driver errors must reach the client as the NBD errno the spec asks for (EDQUOT and
EFBIG as ENOSPC, EROFS as EPERM, anything unknown as EIO), the connection must carry
on, and a qcow image whose file fails under it half-way through writes and flushes
must stay consistent: ``tapnbd check`` finds no corruption, qemu reads it, and every
acknowledged write is there, live and after a kill -9.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import SYSTEM_PYTHON, Server, nbdsh_script, need, run, tapnbd_cmd
from tests.reliability.crash import LAYOUTS, LOAD, Round, check_image
from tests.reliability.model import Journal, verify

ERRNOS = r"""
import json, os, sys, nbd
uri, trigger = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
res = {}
def probe(name, fn):
    try:
        fn()
        res[name] = "OK"
    except nbd.Error as e:
        res[name] = e.errno
probe("read", lambda: h.pread(4096, 0))
probe("write", lambda: h.pwrite(b"\x07" * 4096, 0))
probe("trim", lambda: h.trim(4096, 8192))
probe("zero", lambda: h.zero(4096, 8192))
probe("write_fua", lambda: h.pwrite(b"\x07" * 4096, 0, flags=nbd.CMD_FLAG_FUA))
probe("flush", lambda: h.flush())
probe("cache", lambda: h.cache(4096, 0))
os.remove(trigger)  # faults off: the same connection must now work
h.pwrite(b"\x09" * 65536, 0)
res["after"] = h.pread(65536, 0) == b"\x09" * 65536
probe("flush_after", lambda: h.flush())  # a failed flush sticks (test_sync_errors.py)
h.shutdown()
print(json.dumps(res))
"""


def test_errnos_reach_the_client_and_the_connection_survives(
    serve: Callable[..., Server], raw_image: Path, tmp_path: Path
) -> None:
    trigger = tmp_path / "faults-on"
    trigger.touch()
    server = serve(
        str(raw_image),
        "--inject-error-file",
        str(trigger),
        "--inject-error",
        "EIO:100%:read",
        "--inject-error",
        "EDQUOT:100%:write",  # NBD: "map EDQUOT and EFBIG to ENOSPC"
        "--inject-error",
        "EROFS:100%:trim",  # EROFS is EPERM
        "--inject-error",
        "ENOSPC:100%:zero",
        "--inject-error",
        "ENOTTY:100%:flush,cache",  # not an NBD errno: EIO
    )
    res = nbdsh_script(ERRNOS, server.uri, str(trigger))
    assert res == {
        "read": "EIO",
        "write": "ENOSPC",
        "trim": "EPERM",
        "zero": "ENOSPC",
        "flush": "EIO",
        "cache": "EIO",
        "write_fua": "ENOSPC",
        "after": True,
        "flush_after": "EIO",
    }


def test_qemu_io_sees_the_errno(serve: Callable[..., Server], raw_image: Path) -> None:
    need("qemu-io")
    server = serve(str(raw_image), "--inject-error", "EPERM:100%:write")
    out = run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", "-c", "read 0 4k", server.uri],
        check=False,
    )
    text = out.stdout + out.stderr
    assert "write failed: Operation not permitted" in text
    # The read after the failed write worked: qemu-io's connection survived.
    assert "read 4096/4096 bytes at offset 0" in text


RATE = r"""
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
pattern = bytes(range(256)) * 16
fails = good = bad = 0
for i in range(300):
    try:
        data = h.pread(4096, 0)
        good += data == pattern
        bad += data != pattern
    except nbd.Error as e:
        assert e.errno == "EIO", e
        fails += 1
print(json.dumps({"fails": fails, "good": good, "bad": bad}))
"""


def test_error_rate(serve: Callable[..., Server], raw_image: Path, seed: int) -> None:
    raw_image.write_bytes(bytes(range(256)) * 16 * 16)  # 64 KiB, pattern in each 4 KiB
    # One client, one read at a time: the same seed injects the same faults.
    server = serve(str(raw_image), "--inject-error", "EIO:25%:read", "--inject-seed", str(seed))
    res = nbdsh_script(RATE, server.uri)
    assert isinstance(res, dict)
    # 300 reads at 25%: 75 expected, sd 7.5; these bounds fail once in ~10^9 runs.
    assert 30 <= res["fails"] <= 130, res
    assert res["good"] == 300 - res["fails"] and res["bad"] == 0


PATTERN = r"""
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
out = ""
for i in range(64):
    try:
        h.pread(512, 0)
        out += "."
    except nbd.Error:
        out += "E"
print(json.dumps(out))
"""


def test_inject_seed_replays_the_same_faults(
    serve: Callable[..., Server], raw_image: Path, seed: int
) -> None:
    """Two servers with the same --inject-seed fail the same requests; another seed
    fails others."""
    patterns = []
    for s in (seed, seed, seed + 1):
        server = serve(str(raw_image), "--inject-error", "EIO:50%:read", "--inject-seed", str(s))
        pattern = nbdsh_script(PATTERN, server.uri)
        assert isinstance(pattern, str)
        patterns.append(pattern)
        server.stop()
    assert patterns[0] == patterns[1] and "E" in patterns[0] and "." in patterns[0]
    assert patterns[2] != patterns[0]  # 64 reads at 50%: equal once in 2^64


DELAY = r"""
import json, sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
bufs = [nbd.Buffer(4096) for _ in range(8)]
t0 = time.monotonic()
reads = [h.aio_pread(b, 4096 * i) for i, b in enumerate(bufs)]
h.pwrite(b"x" * 4096, 65536)  # not delayed
still_reading = sum(not h.aio_command_completed(c) for c in reads)
done = {}
while len(done) < len(reads):
    h.poll(-1)
    for c in reads:
        if c not in done and h.aio_command_completed(c):
            done[c] = time.monotonic() - t0
t1 = time.monotonic()
h.flush()
print(json.dumps({"still_reading": still_reading, "reads": sorted(done.values()),
                  "flush": time.monotonic() - t1}))
"""


@pytest.mark.parametrize("fmt", ["raw", "qcow"])
def test_delay(serve: Callable[..., Server], raw_image: Path, tmp_path: Path, fmt: str) -> None:
    """Delayed ops take at least their delay; an op not delayed overtakes them. (That
    delays run concurrently is test_filters' business, where each sleep is an event.)"""
    image = raw_image
    if fmt == "qcow":
        image = tmp_path / "d.qcow"
        run(tapnbd_cmd("create", str(image), "--size", "64M"))
    server = serve(str(image), "--delay", "read=2s", "--delay", "flush=100ms")
    res = nbdsh_script(DELAY, server.uri)
    assert isinstance(res, dict)
    # The write was answered while all eight delayed reads were still waiting.
    assert res["still_reading"] == 8, res
    # Lower bounds only (the loop's timer may fire a hair early against the client's).
    assert all(t >= 1.995 for t in res["reads"]) and res["flush"] >= 0.095, res


def test_bad_fault_options_are_refused(raw_image: Path, tmp_path: Path) -> None:
    cases = {
        ("--inject-error", "EWHAT:1%"): "unknown errno",
        ("--inject-error", "EIO:150%"): "rate must be",
        ("--inject-error", "EIO:1%:scribble"): "unknown operation",
        ("--delay", "read=soon"): "bad time",
        ("--inject-at", "file", "--inject-error", "EIO:1%"): "--inject-at file needs",
    }
    for args, message in cases.items():
        proc = run(
            tapnbd_cmd("serve", str(raw_image), "--port", "0", *args), check=False, timeout=30
        )
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)


def _load(uri: str, *args: str, timeout: float = 120) -> Journal:
    proc = subprocess.run(
        [SYSTEM_PYTHON, str(LOAD), uri, *args], capture_output=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return Journal.from_json(json.loads(proc.stdout))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_qcow_stays_consistent_when_its_file_fails(
    serve: Callable[..., Server], tmp_path: Path, layout: str, seed: int
) -> None:
    """EIO on 4% of the qcow file's writes and growths and 30% of its syncs, under a
    write load. Both the faults and the load are seeded (the ``seed`` fixture)."""
    need("qemu-img", "nbdcopy")
    image = tmp_path / "f.qcow"
    run(tapnbd_cmd("create", str(image), "--size", "256M", *LAYOUTS[layout]))
    server = serve(
        str(image),
        "--inject-at",
        "file",
        "--inject-seed",
        str(seed),
        "--inject-error",
        "EIO:4%:write,grow",
        # The load sends at least 62 FLUSHes, each one or two syncs of the file, so
        # each fails with a chance of 30% to 51%: none fails with p < 0.7^62 = 3e-10,
        # none succeeds with p < 0.51^62 = 1e-18, whatever the seed.
        "--inject-error",
        "EIO:30%:flush",
    )
    journal = _load(
        server.uri,
        "--count",
        "1500",
        "--region",
        str(64 << 20),
        "--flush-every",
        "24",
        "--seed",
        str(seed),
    )
    assert not journal.dead and not journal.hang
    assert set(journal.errors) == {"EIO"}, journal.errors  # nothing else, no disconnect
    assert journal.count("err") > 0 and journal.count("ok") > 1000
    # Some flush failed; from then on every flush fails (a failed flush sticks, see
    # test_sync_errors.py), so how many succeeded first is up to the dice.
    assert journal.flush_errors

    # Live: every acknowledged write reads back (reads are not faulted).
    live = tmp_path / "live.raw"
    run(["nbdcopy", server.uri, str(live)])
    v = verify(live, journal, crashed=False)
    assert not v.failures, v.failures
    assert v.must > 0

    # Then the server dies with the faults still on: the crash model must hold too.
    server.stop(9)
    r = Round(layout, 0, 0.0)
    work = tmp_path / "after"
    work.mkdir()
    check_image(image, journal, work, r)
    assert r.ok, r.failures
    # The copy was checked sector by sector. (Not ``r.must > 0``: the writes before the
    # one flush that succeeded may all have been overwritten since, seed 2016384396.)
    assert r.sectors > 0 and r.sectors == v.sectors
