"""A hostile client that pipelines big READs and never reads the replies (issue 11).

Usable from tests and by hand, against any NBD server, to compare peak memory:

    python -m tests.server.flood nbd://127.0.0.1:10809/ --pid PID --conns 4

It negotiates with the raw-socket client of ``rawclient`` (not tapnbd's codec), sends
``reads`` READs of ``length`` bytes on each connection in one burst, and holds the
connections open without reading a byte of the replies.
"""

from __future__ import annotations

import argparse
import socket
import struct
import time
from urllib.parse import unquote, urlparse

from tests.server import rawclient as rc

MiB = 1 << 20


def vm_kib(pid: int, field: str) -> int:
    """A ``VmHWM``/``VmRSS``-style field of /proc/PID/status, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def open_flood(
    uri: str, reads: int = 100, length: int = 32 * MiB, structured: bool = False
) -> socket.socket:
    """Negotiate, send ``reads`` READs of ``length`` bytes (offsets cycling over the
    export) in one burst, and return the socket without reading any reply."""
    u = urlparse(uri)
    assert u.hostname and u.port, uri
    sock = rc.connect(u.hostname, u.port)
    # A small receive window, so the kernel holds little of what the server sends.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    rc.greet(sock)
    size, _ = rc.go(sock, unquote(u.path.lstrip("/")), structured=structured)
    spans = max(size // length, 1)
    burst = b"".join(
        struct.pack(">IHHQQI", rc.REQUEST_MAGIC, 0, rc.CMD_READ, i, (i % spans) * length, length)
        for i in range(reads)
    )
    sock.sendall(burst)
    return sock


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("uri")
    p.add_argument("--pid", type=int, required=True, help="the server's pid, for its RSS")
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--reads", type=int, default=100)
    p.add_argument("--length", type=int, default=32 * MiB)
    p.add_argument("--structured", action="store_true")
    p.add_argument("--hold", type=float, default=5.0, help="seconds to hold the connections")
    args = p.parse_args()
    before = vm_kib(args.pid, "VmRSS")
    t0 = time.monotonic()
    socks = [
        open_flood(args.uri, args.reads, args.length, args.structured) for _ in range(args.conns)
    ]
    time.sleep(args.hold)  # a measurement by hand: watch the server for this long
    held, peak = vm_kib(args.pid, "VmRSS"), vm_kib(args.pid, "VmHWM")
    print(
        f"conns={args.conns} reads={args.reads}x{args.length // MiB}MiB "
        f"rss_before={before // 1024}MiB rss_held={held // 1024}MiB hwm={peak // 1024}MiB "
        f"t={time.monotonic() - t0:.1f}s",
        flush=True,
    )
    for s in socks:
        s.close()
    time.sleep(1.0)
    try:
        print(f"rss_after_close={vm_kib(args.pid, 'VmRSS') // 1024}MiB")
    except FileNotFoundError:
        print("the server exited when the clients left")


if __name__ == "__main__":
    main()
