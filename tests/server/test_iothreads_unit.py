"""IOThreads and Wire in process, over a socketpair whose reader stops reading."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from tapnbd.protocol.transmission import Request
from tapnbd.server.iothreads import THREADS, Done, IOThreads, Job, Wire

MiB = 1 << 20


def test_jobs_behind_a_full_socket_are_reclaimed(tmp_path: Path) -> None:
    """Both threads busy on a socket nobody reads (one stalled in its send, one waiting
    for the lock): the jobs still queued come back, and are never served."""
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
        iot = IOThreads(wire, fd, structured=False, seek_holes=False, done=done.append)
        os.close(fd)
        jobs = [Job(Request(0, 0, i, i * MiB, MiB), MiB, 0, i * MiB) for i in range(THREADS + 2)]
        for job in jobs:
            iot.submit(job)
        await asyncio.wait_for(stalled.wait(), 30)

        async def handed_over() -> None:
            while len(done) < THREADS:  # one thread sends, the other waits for the lock
                await asyncio.sleep(0.01)

        await asyncio.wait_for(handed_over(), 30)
        back = iot.reclaim()
        assert back == jobs[THREADS:]
        assert iot.submitted == THREADS
        iot.stop()
        await asyncio.sleep(0)

    asyncio.run(main())
    ours.close()
    theirs.close()
