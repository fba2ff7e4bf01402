"""Handshake exhaustion at scale (CVE-2024-7409's pattern): 200 clients that stall in the
handshake or trickle one byte a second. Real clients are still served at once, the
handshake timeout reclaims every staller, and connections past the cap are refused at
once without a greeting. (test_hostile.py has the small versions of these checks.)"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from urllib.parse import urlparse

from tests.helpers import Server, need, open_fds, run, wait_fds

STALLERS = 100  # connect, then send nothing
TRICKLERS = 100  # one byte a second of a valid handshake
TIMEOUT = 6.0  # --handshake-timeout: long enough to serve the real clients meanwhile
CAP = 230  # --max-connections: room for the 200, the real clients and some more
#: A valid start of a client's handshake, sent a byte at a time.
TRICKLE = struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 3, 0)


def connect_many(host: str, port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=10)
        s.setblocking(False)
        out.append(s)
    return out


def first_bytes(socks: list[socket.socket], within: float) -> dict[socket.socket, bytes]:
    """What each socket receives first (b"" when the server closed it) within ``within``."""
    got: dict[socket.socket, bytes] = {}
    deadline = time.monotonic() + within
    while len(got) < len(socks) and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([s for s in socks if s not in got], [], [], left)
        for s in ready:
            try:
                got[s] = s.recv(18)
            except ConnectionResetError:
                got[s] = b""
    return got


def wait_closed(socks: list[socket.socket], within: float) -> int:
    """How many of ``socks`` the server closes within ``within`` seconds."""
    open_ = set(socks)
    deadline = time.monotonic() + within
    while open_ and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(list(open_), [], [], left)
        for s in ready:
            try:
                while chunk := s.recv(65536):
                    del chunk
            except BlockingIOError:
                continue  # data (the greeting), not the end yet
            except ConnectionResetError:
                pass
            open_.discard(s)
    return len(socks) - len(open_)


class Trickle(threading.Thread):
    """Sends the next byte of TRICKLE to every socket once a second."""

    def __init__(self, socks: list[socket.socket]) -> None:
        super().__init__(daemon=True)
        self.socks = socks
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        i = 0
        while not self.stop.is_set() and i < len(TRICKLE):
            for s in self.socks:
                try:
                    s.send(TRICKLE[i : i + 1])
                    self.sent += 1
                except OSError:
                    pass  # reclaimed by the server already
            i += 1
            self.stop.wait(1.0)


def still_open(socks: list[socket.socket]) -> bool:
    """None of ``socks`` (greeted, their greeting read) has been closed by the server."""
    return not select.select(socks, [], [], 0)[0]


def test_200_slow_clients_do_not_hold_up_others(serve: Callable[..., Server]) -> None:
    """What is checked is states, not durations: the real clients were served while
    every slow client was still held, the connections over the cap got no greeting,
    and the timeout closed every held one."""
    need("nbdinfo", "qemu-io")
    # Handshakes capped no lower than connections: this test is about the timeout and
    # the connection cap (test_hostile.py checks the lower handshake cap).
    server = serve(
        "ram:64M",
        "--max-connections",
        str(CAP),
        "--max-handshakes",
        str(CAP),
        "--handshake-timeout",
        str(TIMEOUT),
    )
    u = urlparse(server.uri)
    assert u.hostname and u.port
    host, port = u.hostname, u.port
    base_fds = open_fds(server.proc.pid)

    t0 = time.monotonic()
    stallers = connect_many(host, port, STALLERS)
    tricklers = connect_many(host, port, TRICKLERS)
    slow = stallers + tricklers
    trickle = Trickle(tricklers)
    trickle.start()
    try:
        # Every slow client was admitted and greeted (nothing refused under the cap).
        greeted = first_bytes(slow, within=30)
        assert len(greeted) == len(slow) and all(g[:8] == b"NBDMAGIC" for g in greeted.values())

        # Real clients meanwhile: served while every slow client is still held.
        t1 = time.monotonic()
        assert run(["nbdinfo", "--size", server.uri]).stdout.strip() == str(64 << 20)
        qemu = run(
            ["qemu-io", "-f", "raw", "-c", "write -P 7 0 64k", "-c", "read -P 7 0 64k", server.uri]
        )
        assert "Pattern verification failed" not in qemu.stdout
        served_in = time.monotonic() - t1
        assert still_open(slow), "slow clients were dropped before the real ones were served"

        # Over the cap: 200 held, so of 40 more, 30 get a greeting and 10 are closed
        # without one. Once the real clients' connections are gone from the server:
        assert wait_fds(server.proc.pid, base_fds + len(slow)) == base_fds + len(slow)
        extra = connect_many(host, port, 40)
        t2 = time.monotonic()
        answers = first_bytes(extra, within=30)
        refused = [s for s, b in answers.items() if b == b""]
        admitted = [s for s, b in answers.items() if b[:8] == b"NBDMAGIC"]
        assert (len(admitted), len(refused)) == (CAP - len(slow), 40 - (CAP - len(slow)))
        refused_in = time.monotonic() - t2

        # The timeout reclaims every slow and every admitted extra connection.
        held = slow + admitted
        closed = wait_closed(held, within=TIMEOUT + 60)
        assert closed == len(held), f"{len(held) - closed} connections outlived the timeout"
        assert trickle.sent >= TRICKLERS  # the tricklers really were sending
        reclaimed_at = time.monotonic() - t0
        # Server side too: its descriptors are back to what it had before.
        assert wait_fds(server.proc.pid, base_fds + 2) <= base_fds + 2
        # And a new client is served as usual.
        assert run(["nbdinfo", "--size", server.uri]).stdout.strip() == str(64 << 20)
        print(
            f"{len(slow)} slow connections held; nbdinfo+qemu-io served in {served_in:.2f} s; "
            f"{len(refused)} over the cap refused in {refused_in:.2f} s; {len(held)} reclaimed "
            f"{reclaimed_at:.1f} s after the first connect (timeout {TIMEOUT} s)"
        )
    finally:
        trickle.stop.set()
        for s in slow:
            s.close()
