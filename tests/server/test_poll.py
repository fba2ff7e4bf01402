"""``serve --poll-us``: the loop waits a moment for a client's next request before it
sleeps (tapnbd/server/poll.py). The window's rule, the wait itself on a real socket,
when the connection consults it (alone on the server, nothing in flight), and qemu-io
one request at a time through it."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tapnbd.server.connection import NBDConnection
from tapnbd.server.poll import SLOW, START_NS, Poller
from tests.helpers import Server, qemu_io
from tests.server import rawclient as rc
from tests.server.inproc import TIMEOUT, Wakes, header, loops, run, serve

LIMIT = 50_000


def _gap(p: Poller, ns: int) -> None:
    """The loop slept ``ns`` before the client's next bytes came."""
    p.idle_since = time.monotonic_ns() - ns
    p.woken()


def test_the_window_backs_off_for_a_slow_client_and_comes_back() -> None:
    p = Poller(LIMIT)
    assert p.window == LIMIT  # polls from the start: a halted CPU would hide short gaps
    _gap(p, 2 * LIMIT)  # just too late for the window: keep it
    assert p.window == LIMIT
    windows = []
    while p.window:
        _gap(p, SLOW * LIMIT + 1_000_000)  # a client that thinks, or is idle
        windows.append(p.window)
    assert windows[0] == LIMIT // 2 and len(windows) <= 5, windows  # gone in a few gaps
    _gap(p, 10_000)
    assert p.window == START_NS
    while p.window < LIMIT:
        _gap(p, 10_000)
    assert p.window == LIMIT
    p.woken()  # no wait measured: nothing changes
    assert p.window == LIMIT and Poller(0).window == 0


def test_the_wait_ends_when_bytes_come_or_its_window_has_passed() -> None:
    a, b = socket.socketpair()
    try:
        p = Poller(LIMIT)
        b.send(b"x")
        assert p.wait(a.fileno()) and p.caught == 1 and p.idle_since == 0
        a.recv(1)
        t0 = time.monotonic_ns()
        assert not p.wait(a.fileno())
        assert time.monotonic_ns() - t0 >= LIMIT and p.idle_since >= t0
        assert p.caught == 1
        off = Poller(LIMIT)
        off.window = 0
        assert not off.wait(a.fileno()) and off.idle_since
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("loop_factory", loops())
def test_the_loop_polls_only_when_its_client_has_nothing_in_flight(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 4 KiB READ is answered on the loop, so it polls after it; a 1 MiB READ goes to
    the I/O threads and is still in flight when the loop has read it, so it does not."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(range(256)) * (8 << 12))  # 8 MiB
    calls: list[int] = []
    wait = Poller.wait

    def recorded(p: Poller, fd: int) -> bool:
        calls.append(conns[0].in_flight)
        return wait(p, fd)

    conns: list[NBDConnection] = []
    monkeypatch.setattr(Poller, "wait", recorded)

    async def main() -> None:
        served = await serve(image, poll_us=1000)
        conns.append(served.conn)
        client = served.client
        try:
            assert served.conn._poller is not None
            client.queue(header(rc.CMD_READ, 1, 4096, 4096))
            err, data = await client.reply(1, 4096)
            assert err == 0 and data == image.read_bytes()[4096:8192]
            # The reply and the wait happen in one callback of the loop, and this
            # coroutine resumes on the loop only after it: the call is in by now.
            assert calls == [0]
            client.queue(header(rc.CMD_READ, 2, 0, 1 << 20))
            err, data = await client.reply(2, 1 << 20)
            assert err == 0 and data == image.read_bytes()[: 1 << 20]
            assert calls == [0], "polled with a READ still in flight"
        finally:
            await served.close()

    run(loop_factory, main)


@pytest.mark.parametrize("loop_factory", loops())
def test_the_loop_does_not_poll_while_the_server_has_another_client(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While it polls for one client the loop serves no other: with a second client
    connected the first's READs are answered without a wait, and once it has gone the
    first polls again."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    waits: list[int] = []
    wait = Poller.wait

    def recorded(p: Poller, fd: int) -> bool:
        waits.append(fd)
        return wait(p, fd)

    monkeypatch.setattr(Poller, "wait", recorded)
    lost = Wakes(monkeypatch, "connection_lost")

    async def main() -> None:
        served = await serve(image, poll_us=1000)
        server, client = served.server, served.client
        ours, theirs = socket.socketpair()
        ours.settimeout(TIMEOUT)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(server._factory, theirs)
            await asyncio.to_thread(rc.greet, ours)
            await asyncio.to_thread(rc.go, ours)
            assert len(server.connections) == 2
            for cookie in (1, 2):
                client.queue(header(rc.CMD_READ, cookie, 4096 * cookie, 4096))
                err, data = await client.reply(cookie, 4096)
                assert err == 0 and data == image.read_bytes()[4096 * cookie : 4096 * (cookie + 1)]
            assert waits == [], "polled with another client connected"
            ours.close()
            await lost.until(lambda: len(server.connections) == 1)
            client.queue(header(rc.CMD_READ, 3, 0, 4096))
            err, _ = await client.reply(3, 4096)
            assert err == 0 and waits == [served.conn._fd]
        finally:
            ours.close()
            await served.close()

    run(loop_factory, main)


def test_qemu_io_one_request_at_a_time_through_a_polling_server(
    serve: Callable[..., Server], raw_image: Path
) -> None:
    """qemu-io sends each request after the last reply: the pattern polling is for.
    Every byte reads back, and the server's log says requests came while it polled."""
    server = serve(str(raw_image), "--format", "raw", "--verbose", "--poll-us", "1000")
    cmds: list[str] = []
    for i in range(64):
        cmds.append(f"write -P {i + 1} {i * 8192} 4k")
    for i in range(64):
        cmds.append(f"read -P {i + 1} {i * 8192} 4k")
        cmds.append(f"read -P 0 {i * 8192 + 4096} 4k")
    qemu_io(server.uri, *cmds)
    log = server.wait_for_log("requests came while polling")
    (line,) = [x for x in log.splitlines() if "requests came while polling" in x]
    caught = int(line.split("requests came while polling")[0].split()[-1])
    assert caught > 0, line
