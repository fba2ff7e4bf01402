"""A connection's writer thread: big WRITE payloads that came in pipes, spliced into the file.

Over a unix socket a big WRITE's payload is never all in the socket at once (the socket
holds at most the sender's buffer, 208 KiB by default), so the loop moves each part into
a pipe as it arrives: a page move, no copy. With a writer, the pipe is the WRITE's own,
and once the whole payload is in it the loop hands it here and goes on receiving; this
thread makes the one copy, pipe to page cache, and the loop replies when told. So the
copy of one WRITE overlaps the receiving of the next, as nbdkit's threads overlap them,
with one copy instead of their two. Without it the loop makes the copies itself, part by
part, and the client's other payloads wait (bench/results/2026-12-04-s36-bonnie-pipewriter).

The thread takes payloads in the order the loop queued them and reports back in batches:
one wake-up of the loop for all that finished meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from formats.raw import splice_all
from tapnbd.backend import request_errno
from tapnbd.protocol.transmission import Request
from tapnbd.server.splice import PayloadPipe

#: Payloads one connection may have in pipes at once (two descriptors each); more wait
#: for the loop's own path. Their bytes are charged to the payload budget either way.
PIPES = 4
ENABLED = os.environ.get("TAPNBD_PIPE_WRITER", "1") != "0"


@dataclass(slots=True)
class PipeJob:
    """A WRITE whose whole payload is in ``pipe``, for ``dest`` in the file."""

    req: Request
    cost: int  # what _admit charged for it
    t0: int  # Stats.start()
    pipe: PayloadPipe
    dest: int
    err: int = 0  # the errno to answer with, once written
    message: str = ""


class PipeWriter:
    """One thread, one file descriptor (a dup: the driver may close its own first)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, fd: int, done: Callable[[list[PipeJob]], None]
    ) -> None:
        self._loop = loop
        self._fd = os.dup(fd)
        self._done = done
        self._queue: queue.SimpleQueue[PipeJob | None] = queue.SimpleQueue()
        self._finished: deque[PipeJob] = deque()
        self._woken = False
        self._thread = threading.Thread(target=self._run, name="tapnbd-pipewriter", daemon=True)
        self._thread.start()

    def submit(self, job: PipeJob) -> None:
        self._queue.put(job)

    def stop(self) -> None:
        """The thread writes what is queued, reports it, and ends."""
        self._queue.put(None)

    def _run(self) -> None:
        fd, finished = self._fd, self._finished
        try:
            while (job := self._queue.get()) is not None:
                try:
                    splice_all(job.pipe.read_fd, fd, job.dest, job.req.length)
                except OSError as e:
                    job.err, job.message = request_errno(e), str(e)
                    job.pipe.drain()  # the next payload starts in an empty pipe
                finished.append(job)
                if not self._woken:
                    self._woken = True
                    try:
                        self._loop.call_soon_threadsafe(self._report)
                    except RuntimeError:  # the loop is closed: nobody to tell
                        return
        finally:
            os.close(fd)

    def _report(self) -> None:
        # Cleared before taking: a job finished after this line wakes the loop again.
        self._woken = False
        jobs = []
        while self._finished:
            jobs.append(self._finished.popleft())
        if jobs:
            self._done(jobs)
