"""IOThreads and Wire in process: over a socketpair whose reader stops reading, and how
many threads a connection starts."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tapnbd.protocol.transmission import Request
from tapnbd.server.iothreads import SHARED_THREADS, THREADS, Done, IOThreads, Job, Wire
from tests.server import rawclient as rc
from tests.server.inproc import TIMEOUT, header, loops, run, serve

MiB = 1 << 20


@pytest.mark.parametrize("threads", sorted({THREADS, SHARED_THREADS}))
def test_jobs_behind_a_full_socket_are_reclaimed(tmp_path: Path, threads: int) -> None:
    """Every thread busy on a socket nobody reads (one stalled in its send, any other
    waiting for the lock): the jobs still queued come back, and are never served."""
    image = tmp_path / "img"
    image.write_bytes(os.urandom(8 * MiB))
    ours, theirs = socket.socketpair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stalled = asyncio.Event()
        done: list[Done] = []
        wire: Wire

        def changed() -> None:
            if wire.stalled:
                stalled.set()

        wire = Wire(loop, ours.fileno(), changed)
        fd = os.open(image, os.O_RDONLY)
        iot = IOThreads(
            wire, fd, structured=False, seek_holes=False, done=done.append, threads=threads
        )
        os.close(fd)
        jobs = [Job(Request(0, 0, i, i * MiB, MiB), MiB, 0, i * MiB) for i in range(threads + 2)]
        for job in jobs:
            iot.submit(job)
        await asyncio.wait_for(stalled.wait(), 30)

        async def handed_over() -> None:
            while len(done) < threads:  # one thread sends, any other waits for the lock
                await asyncio.sleep(0.01)

        await asyncio.wait_for(handed_over(), 30)
        back = iot.reclaim()
        assert back == jobs[threads:]
        assert iot.submitted == threads
        alive = [t for t in threading.enumerate() if t.name.startswith("tapnbd-send-")]
        assert len(alive) >= threads and len(iot.busy) == threads
        iot.stop()

        async def closed() -> None:  # the last thread out closes the descriptors it used
            while iot.wire.sock.fileno() != -1:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(closed(), 30)

    asyncio.run(main())
    ours.close()
    theirs.close()


@pytest.mark.parametrize("loop_factory", loops())
def test_a_connection_among_others_starts_one_thread(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], tmp_path: Path
) -> None:
    """Alone, a connection's first big READ starts THREADS threads; with another client
    connected, SHARED_THREADS (the clients' READs overlap one another's already)."""
    image = tmp_path / "disk.raw"
    data = os.urandom(4 * MiB)
    image.write_bytes(data)

    async def main() -> None:
        served = await serve(image)
        server, first = served.server, served.conn
        ours, theirs = socket.socketpair()
        ours.settimeout(TIMEOUT)
        try:
            served.client.queue(header(rc.CMD_READ, 1, 0, MiB))
            err, got = await served.client.reply(1, MiB)
            assert err == 0 and got == data[:MiB]
            assert first._iot is not None and first._iot.threads == THREADS
            await asyncio.get_running_loop().connect_accepted_socket(server._factory, theirs)
            (second,) = server.connections - {first}
            await asyncio.to_thread(rc.greet, ours)
            await asyncio.to_thread(rc.go, ours)
            await asyncio.to_thread(rc.request, ours, rc.CMD_READ, MiB, MiB, cookie=2)
            err, cookie, got = await asyncio.to_thread(rc.simple_reply, ours, MiB)
            assert (err, cookie) == (0, 2) and got == data[MiB : 2 * MiB]
            assert second._iot is not None and second._iot.threads == SHARED_THREADS
            assert len(second._iot.busy) == SHARED_THREADS
        finally:
            ours.close()
            await served.close()

    run(loop_factory, main)
