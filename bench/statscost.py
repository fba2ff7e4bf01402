"""What statistics cost per NBD request, measured in-process (issue 15, item 3).

A real ``NBDConnection`` over a real ``Backend`` and driver (``raw``: a 64 MiB file warm
in the page cache; ``ram``: the RAM driver) is fed pre-encoded requests, ``--batch`` of
them per ``buffer_updated`` call as pipelined requests arrive from a client at queue
depth ``--batch``, and its replies go to a transport that drops them. So the figure is
the Python the server runs per request, from decoding to the reply handed to the
transport, without the socket's system calls. Rounds alternate statistics on and off
(A B A B ...), each timed in process CPU time (``time.process_time_ns``), which other
processes on a shared machine disturb far less than the wall clock; the figure is the
minimum over rounds, in nanoseconds per request, with the median beside it.

    python -m bench.statscost [--driver raw|ram] [--op read|write] [--batch 32]
                              [--requests 50000] [--rounds 11] [--seed N]

With ``--fio RUNS`` it measures the same through a real client instead: ``tapnbd serve``
of a 256 MiB raw file warm in the page cache (``--driver ram``: a 256 MiB RAM disk),
with statistics on and off in turn (``TAPNBD_STATS=off``, as ``python -m bench fio``'s
``tapnbd-raw-nostats`` row), and fio's nbd engine reading (or writing, ``--op write``)
every 4 KiB block of it once in random order at queue depth ``--batch``, 8 times over:
a fixed number of requests (``--seq``: 1 MiB requests in order, as the fio table's seq
rows with ``--batch 8``). The figure is the server's CPU time (utime + stime from
/proc/PID/stat) per request, the minimum over RUNS interleaved pairs, with fio's IOPS
beside it (noisy here).

Not part of ``python -m bench``: a micro-benchmark to read a code change by.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.proc import cpu_seconds, run, spawn, stop, tapnbd_command, wait_until, warm
from bench.servers import serve
from formats import open_image
from tapnbd.backend import Backend
from tapnbd.driver import Driver
from tapnbd.protocol.consts import REQUEST_MAGIC, Cmd
from tapnbd.protocol.handshake import Ready
from tapnbd.server.connection import NBDConnection
from tapnbd.server.exports import Export, ExportRegistry
from tapnbd.server.listener import NBDServer

MiB = 1 << 20
SIZE = 64 * MiB
BS = 4096
_REQ = struct.Struct(">IHHQQI")


class NullTransport:
    """Just enough of an asyncio transport for NBDConnection; replies are dropped."""

    def __init__(self) -> None:
        self.replies = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return "statscost" if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.replies += 1

    def writelines(self, parts: Any) -> None:
        self.replies += 1

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _batches(op: str, batch: int, requests: int, seed: int) -> list[bytes]:
    """``requests`` requests at seeded random 4 KiB-aligned offsets, ``batch`` per chunk."""
    rng = random.Random(seed)
    typ = Cmd.READ if op == "read" else Cmd.WRITE
    payload = rng.randbytes(BS) if op == "write" else b""
    out = []
    for first in range(0, requests, batch):
        chunk = bytearray()
        for cookie in range(first, min(first + batch, requests)):
            off = rng.randrange(SIZE // BS) * BS
            chunk += _REQ.pack(REQUEST_MAGIC, 0, typ, cookie, off, BS) + payload
        out.append(bytes(chunk))
    return out


def _connection(backend: Backend) -> tuple[NBDConnection, NullTransport]:
    registry = ExportRegistry()
    export = Export("bench", backend)
    registry.add(export)
    conn = NBDConnection(NBDServer(registry))
    transport = NullTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    # libnbd (fio's nbd engine) negotiates structured replies.
    conn._enter_transmission(Ready(export.info, export.info.flags, structured=True), b"")
    return conn, transport


def _feed(conn: NBDConnection, chunks: list[bytes]) -> int:
    """Process CPU nanoseconds to serve every request in ``chunks``."""
    get_buffer, buffer_updated = conn.get_buffer, conn.buffer_updated
    t0 = time.process_time_ns()
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            buf = get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            buffer_updated(n)
            view = view[n:]
    return time.process_time_ns() - t0


async def _open(driver: str, work: Path) -> Driver:
    if driver == "ram":
        return await open_image(f"ram:{SIZE}")
    path = work / "raw.img"
    data = random.Random(1).randbytes(MiB)
    with path.open("wb") as f:
        for _ in range(SIZE // MiB):
            f.write(data)
    return await open_image(str(path), fmt="raw")


async def _main(a: argparse.Namespace) -> None:
    print(
        f"seed {a.seed}, {a.driver} {a.op} 4k, batch {a.batch}, {a.rounds} rounds of "
        f"{a.requests} requests each way, python {sys.version.split()[0]}"
    )
    chunks = _batches(a.op, a.batch, a.requests, a.seed)
    with tempfile.TemporaryDirectory(prefix="statscost-") as tmp:
        driver = await _open(a.driver, Path(tmp))
        try:
            backend = Backend(driver)
            conn, transport = _connection(backend)
            stats = backend.stats
            _feed(conn, chunks)  # warm: page cache, buffer pool (counted)
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(a.rounds):
                for enabled in (True, False):
                    stats.enabled = enabled
                    replies = transport.replies
                    spent = _feed(conn, chunks)
                    if conn.in_flight or conn._tasks:
                        raise SystemExit("a request went to the async path: not a fast-path run")
                    if transport.replies == replies:
                        raise SystemExit("no replies were written")
                    times[enabled].append(spent / a.requests)
            counted = stats.ops[a.op].ops
        finally:
            await driver.close()
    if counted != a.requests * (a.rounds + 1):  # every round with statistics on, and warm-up
        raise SystemExit(f"counted {counted} {a.op}s, expected {a.requests * (a.rounds + 1)}")
    for enabled, t in times.items():
        name = "on " if enabled else "off"
        print(f"stats {name} {min(t):7.0f} ns/request (median {statistics.median(t):.0f})")
    on, off = min(times[True]), min(times[False])
    print(f"on - off: {on - off:+.0f} ns/request; off/on {off / on:.3f}")


@contextlib.contextmanager
def _server(driver: str, image: Path, key: str, work: Path) -> Iterator[tuple[int, str]]:
    """``tapnbd serve`` (statistics off for key ``tapnbd-nostats``): its pid and URI."""
    if driver == "raw":
        with serve(key, image, "raw", logdir=work, transport="unix") as s:
            yield s.pid, s.uri
        return
    sock, out = work / "ram.sock", work / "ram.uri"
    sock.unlink(missing_ok=True)
    env = {**os.environ, "TAPNBD_STATS": "off" if key == "tapnbd-nostats" else "on"}
    cmd = [*tapnbd_command(), "serve", f"ram:{image.stat().st_size}", "--socket", str(sock)]
    proc = spawn(cmd, log=work / "ram.log", stdout=out, env=env)
    try:
        wait_until(
            lambda: "nbd" in out.read_text(),
            what="tapnbd serve ram",
            alive=lambda: proc.poll() is None,
            log=work / "ram.log",
        )
        yield proc.pid, out.read_text().strip()
    finally:
        stop(proc)


def _fio(a: argparse.Namespace) -> None:
    size = 256 * MiB
    loops = 8  # every block 8 times: /proc's clock ticks (10 ms) are then under 0.5 %
    bs = MiB if a.seq else BS
    requests = size // bs * loops
    rw = ("" if a.seq else "rand") + a.op
    print(
        f"fio {rw} {bs // 1024}k QD{a.batch} over {size // MiB} MiB {a.driver}: "
        f"{requests} requests a run, seed {a.seed}"
    )
    cpu: dict[str, list[float]] = {"tapnbd": [], "tapnbd-nostats": []}
    iops: dict[str, list[float]] = {k: [] for k in cpu}
    with tempfile.TemporaryDirectory(prefix="statscost-") as tmp:
        work = Path(tmp)
        image = work / "raw.img"
        data = random.Random(1).randbytes(MiB)
        with image.open("wb") as f:
            for _ in range(size // MiB):
                f.write(data)
        warm(image)
        for _ in range(a.fio):
            for key in cpu:  # A B A B ...: drift hits both alike
                with _server(a.driver, image, key, work) as (pid, uri):
                    cpu0 = cpu_seconds(pid)
                    out = run(
                        [
                            "fio", "--name=statscost", "--ioengine=nbd", f"--uri={uri}",
                            f"--rw={rw}", f"--bs={bs}", f"--iodepth={a.batch}",
                            f"--size={size}", f"--loops={loops}", f"--randseed={a.seed}",
                            "--output-format=json",
                        ],
                        what=f"fio against {key}",
                        timeout=300,
                    )  # fmt: skip
                    spent = cpu_seconds(pid) - cpu0
                side = json.loads(out[out.index("{") :])["jobs"][0][a.op]
                if side["total_ios"] != requests:
                    raise SystemExit(f"fio made {side['total_ios']} requests, not {requests}")
                cpu[key].append(spent / requests * 1e9)
                iops[key].append(float(side["iops"]))
    for key, t in cpu.items():
        print(
            f"{key:15} {min(t):6.0f} ns CPU/request (median {statistics.median(t):.0f}), "
            f"{statistics.median(iops[key]):.0f} IOPS median"
        )
    on, off = min(cpu["tapnbd"]), min(cpu["tapnbd-nostats"])
    print(f"on - off: {on - off:+.0f} ns/request; off/on {off / on:.3f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--driver", choices=("raw", "ram"), default="raw")
    ap.add_argument("--op", choices=("read", "write"), default="read")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--requests", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    ap.add_argument("--fio", type=int, metavar="RUNS", help="measure tapnbd serve under fio")
    ap.add_argument("--seq", action="store_true", help="with --fio: 1 MiB in order, not 4k")
    a = ap.parse_args(argv)
    if a.fio:
        _fio(a)
    else:
        asyncio.run(_main(a))


if __name__ == "__main__":
    main()
