"""Big READs off the event loop: two I/O threads per connection share its socket.

A 1 MiB READ costs two copies, the file's pages into a buffer (``preadv``) and the
buffer into the socket (``writev``); on the loop thread they run back to back. Here two
threads per connection each take a READ from a queue, read it into a pooled buffer and
send the reply themselves, so one thread's read overlaps the other's send (one thread
gained nothing in the prototype of issue 15; four were no better than two). A
connection that starts its threads while the server has other clients starts one
(``SHARED_THREADS``): the clients' READs overlap one another's.

The socket then has several writers, and no reply may be interleaved with another's
bytes. ``Wire`` is the socket's one way out once threads exist (the transport is never
written to again):

- whoever holds ``lock`` may write, and writes whole replies;
- the loop's own (small) replies are appended to ``pending`` and written by whoever
  holds the lock: the loop without blocking (``add_writer`` on EAGAIN), a thread
  blocking, before its own reply and again after it lets the lock go. The loop appends
  *before* it tries the lock, and a thread looks at ``pending`` *after* it lets it go,
  so a reply appended while a thread held the lock is never left behind.

What the loop still owns: admission, the payload budget, in-flight counts and
statistics. The connection charges a READ when it queues it for the threads (at most
QUEUED at a time, so that a thread done with one READ takes the next without waiting
for the loop); the thread reports back once the reply is read and handed to the
socket, the point where the loop path hands a reply to its transport, and the
connection releases the charge there, on the loop. Reports go in batches: one
``call_soon_threadsafe`` wakes the loop for every job that finishes before it runs. A thread
that has to wait for the socket says so once (``stalled``): the connection stops
decoding, as it does when a transport calls ``pause_writing``, and takes back the
READs still queued (``reclaim``), so a client that does not read holds no charge.

The threads read a ``dup`` of the image's descriptor and write a ``dup`` of the
socket's, closed when the last thread leaves: a descriptor closed under them (an export
removed, a connection aborted) can never be reused for another file while they run.
Stopping (``stop``): a sentinel per thread, then ``shutdown(SHUT_RDWR)``, which wakes a
thread blocked on the socket (its send fails); jobs still queued are not served.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
from collections import deque
from typing import TYPE_CHECKING, NamedTuple

from formats.raw import pread_all
from tapnbd import buffers
from tapnbd.backend import request_errno
from tapnbd.server.replies import flatten, read_parts, zero_parts

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Sequence

    from tapnbd.protocol.transmission import Request

log = logging.getLogger("tapnbd.server")

#: READs at least this big go to the threads; smaller ones stay on the loop, where a
#: page-cache hit costs one system call and no hop (random 4k reads are faster there).
THREAD_MIN = 128 * 1024
#: Threads per connection: one reads while the other sends. TAPNBD_IO_THREADS=0 keeps
#: every request on the loop (to measure what the threads gain).
THREADS = 2
#: ... unless the server has other clients when they start: then each connection's
#: READs overlap the others', and a second thread per connection only adds hand-offs
#: (256 KiB READs one at a time on two to four connections: 1.16-1.30 times the rate
#: with one thread, bench/results/2026-12-03-s25-big-reads).
SHARED_THREADS = 1
#: READs queued for the threads at once: fio's and nbdcopy's usual queue depth.
#: TAPNBD_IO_QUEUED sets it, to measure again.
QUEUED = max(1, int(os.environ.get("TAPNBD_IO_QUEUED", "8")))
ENABLED = os.environ.get("TAPNBD_IO_THREADS", "2") != "0"
#: Pieces in one writev (Linux's IOV_MAX is 1024).
MAX_IOV = 1024

Piece = bytes | bytearray | memoryview


class Job:
    """One READ for a thread, and what the loop needs back when it is done."""

    __slots__ = ("charged", "req", "src", "t0")

    def __init__(self, req: Request, charged: int, t0: int, src: int) -> None:
        self.req = req
        self.charged = charged  # payload charged to the budget, set and cleared on the loop
        self.t0 = t0  # Stats.start()
        self.src = src  # where the data lies in the file (Driver.read_at)


class Done(NamedTuple):
    """A finished job: errno 0 once its reply is on its way, else the loop replies."""

    job: Job
    err: int
    message: str


def _advance(parts: Sequence[Piece], n: int) -> list[Piece]:
    """What is left of ``parts`` once ``n`` bytes of them are written."""
    rest: list[Piece] = []
    for p in parts:
        if n >= len(p):
            n -= len(p)
            continue
        rest.append(memoryview(p)[n:] if n else p)
        n = 0
    return rest


class Wire:
    """The connection's socket, shared by the loop and the I/O threads."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock_fd: int,
        changed: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.sock = socket.socket(fileno=os.dup(sock_fd))
        self.sock.setblocking(False)  # shared with the loop's descriptor anyway
        self.fd = self.sock.fileno()
        self.lock = threading.Lock()
        #: The loop's replies waiting for the socket; only the lock holder pops.
        self.pending: deque[list[Piece]] = deque()
        # Bytes appended to pending (written by the loop only) and written from it (by
        # the lock holder only): two single-writer counters, so no lost updates.
        self.queued = 0
        self.sent = 0
        self.written = 0  # every byte written, the threads' replies too (lock holder)
        #: A thread waits for the socket to take more (the client is not reading).
        self.stalled = False
        #: Set by the loop while it has stopped decoding for this wire's backlog.
        self.paused = False
        self.broken = False  # a write failed: the connection is over
        #: Set by the loop once the connection is closing: tell it when pending is out.
        self.closing = False
        self._changed = changed  # the connection's hook, called on the loop
        self._writer = False

    @property
    def backlog(self) -> int:
        return self.queued - self.sent

    # The loop's side: never blocks.

    def send(self, parts: list[Piece]) -> None:
        """Queue one whole reply and write what the socket takes now."""
        if self.broken:
            return
        self.pending.append(parts)  # first append, then try the lock (see module doc)
        self.queued += sum(len(p) for p in parts)
        self.flush()

    def flush(self) -> None:
        if not self.lock.acquire(False):
            # A thread writes; it takes pending after its own reply. Stop watching the
            # socket meanwhile, or an idle loop would spin on a writable socket.
            self._watch(False)
            return
        try:
            blocked = self._drain(wait=False)
        finally:
            self.lock.release()
        self._watch(blocked)

    def _watch(self, on: bool) -> None:
        if on == self._writer or (self.broken and on):
            return
        self._writer = on
        if on:
            self.loop.add_writer(self.fd, self._writable)
        else:
            self.loop.remove_writer(self.fd)

    def _writable(self) -> None:
        self.flush()
        self._changed()

    # Both sides, with the lock held.

    def _drain(self, wait: bool) -> bool:
        """Write pending replies; True when the socket is full (only if not ``wait``)."""
        pending = self.pending
        while pending:
            if not self._write(pending[0], wait, counted=True):
                return True
            if self.broken:
                pending.clear()
                return False
            pending.popleft()
        return False

    def _write(self, parts: list[Piece], wait: bool, counted: bool = False) -> bool:
        """Write ``parts`` whole (``wait``) or as far as the socket takes them; False
        when the socket is full and not ``wait``.

        On a partial write the rest replaces ``parts``' contents, so the reply stays at
        the head of pending and is finished before any other. ``counted``: the bytes
        are pending's, counted in ``queued``.
        """
        rest: list[Piece] = parts
        sock = self.sock
        while rest and not self.broken:
            try:
                n = sock.sendmsg(rest[:MAX_IOV], (), socket.MSG_NOSIGNAL)
            except BlockingIOError:
                if not wait:
                    parts[:] = rest
                    return False
                self._wait_writable()
                continue
            except OSError as e:
                self._broke(e)
                break
            self.written += n
            if counted:
                self.sent += n
            rest = _advance(rest, n)
        return True

    def _broke(self, e: OSError) -> None:
        if not self.broken:
            self.broken = True
            log.debug("send failed: %s", e)
            self._notify()

    # The threads' side: blocks.

    def _wait_writable(self) -> None:
        if not self.stalled:
            self.stalled = True
            self._notify()
        p = select.poll()
        # shutdown(SHUT_RDWR) wakes this with POLLOUT|POLLHUP; the next send then fails.
        p.register(self.fd, select.POLLOUT)
        p.poll()

    def send_blocking(self, parts: list[Piece]) -> None:
        """A thread's reply: whatever the loop queued first, then ``parts``, whole."""
        with self.lock:
            self._drain(wait=True)
            self._write(parts, wait=True)

    def settle(self) -> None:
        """A thread is done with a job: take what the loop queued while it held the lock,
        and tell the loop when the socket flows again, or when it may close."""
        while self.pending and not self.broken:
            with self.lock:
                self._drain(wait=True)
        if self.stalled:
            self.stalled = False
            self._notify()
        elif self.paused or self.closing:
            self._notify()

    def _notify(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._changed)
        except RuntimeError:
            pass  # the loop is closed: the server is gone

    def kill(self) -> None:
        """Fail every write from now on, and wake a thread blocked in one."""
        self.broken = True
        self._watch(False)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class IOThreads:
    """The threads of one connection, and their queue of READs."""

    def __init__(
        self,
        wire: Wire,
        file_fd: int,
        *,
        structured: bool,
        seek_holes: bool,
        done: Callable[[Done], None],
        threads: int = THREADS,
    ) -> None:
        self.wire = wire
        self.threads = threads
        self.file_fd = os.dup(file_fd)
        self.structured = structured
        self.seek_holes = seek_holes
        self.jobs: deque[Job | None] = deque()
        self._ready = threading.Condition()
        #: Jobs given to the threads and not reported back (on the loop only).
        self.submitted = 0
        self.stopped = False
        self._done = done
        #: Finished jobs for the loop, taken in batches: one wake-up of the loop for
        #: all the jobs that finish before it runs, not one per job.
        self._finished: deque[Done] = deque()
        self._told = False
        self._alive = threads
        self._alive_lock = threading.Lock()
        #: Per thread (one writer each): it holds a job, whose reply may be unwritten.
        self.busy = [False] * threads
        for i in range(threads):
            threading.Thread(
                target=self._run, args=(i,), name=f"tapnbd-send-{i}", daemon=True
            ).start()

    def submit(self, job: Job) -> None:
        self.submitted += 1
        with self._ready:
            self.jobs.append(job)
            self._ready.notify()

    def reclaim(self) -> list[Job]:
        """Take back the jobs no thread has started (the socket is full: a job queued
        behind it would hold its payload charge for as long as the client waits)."""
        with self._ready:
            jobs = [j for j in self.jobs if j is not None]
            if len(jobs) == len(self.jobs):
                self.jobs.clear()
            else:
                return []  # stopping: the threads report them
        self.submitted -= len(jobs)
        return jobs

    def _take(self) -> Job | None:
        with self._ready:
            while not self.jobs:
                self._ready.wait()
            return self.jobs.popleft()

    def stop(self) -> None:
        """Called on the loop when the connection ends (see module doc)."""
        self.stopped = True
        with self._ready:
            self.jobs.extend([None] * self.threads)
            self._ready.notify_all()
        self.wire.kill()

    def _run(self, slot: int) -> None:
        try:
            while (job := self._take()) is not None:
                self.busy[slot] = True
                try:
                    self._serve(job)
                finally:
                    self.busy[slot] = False
                    self.wire.settle()
        finally:
            with self._alive_lock:
                self._alive -= 1
                last = self._alive == 0
            if last:
                os.close(self.file_fd)
                self.wire.sock.close()

    def _serve(self, job: Job) -> None:
        if self.stopped or self.wire.broken:
            self._report(job, errno.ESHUTDOWN, "connection closed")
            return
        req = job.req
        buf: bytearray | None = None
        try:
            if self._is_hole(job.src, req.length):
                parts = zero_parts(req, self.structured)
            else:
                buf = buffers.take(req.length)
                view = memoryview(buf)
                n = pread_all(self.file_fd, view, job.src)
                if n < req.length:  # the file shrank under us; the rest reads as zeros
                    view[n:] = bytes(req.length - n)
                del view
                parts = read_parts(req, buf, self.structured)
        except OSError as e:
            if buf is not None:
                buffers.give(buf)
            self._report(job, request_errno(e), str(e))
            return
        out = flatten(parts)
        del parts
        # Handed over: from here the bytes are the connection's reply backlog, as a
        # reply queued in a transport is. The loop releases the request's charge now,
        # and stops decoding if the send has to wait (Wire.stalled).
        self._report(job, 0, "")
        self.wire.send_blocking(out)
        del out
        if buf is not None:
            buffers.give(buf)  # every view of it is gone: the reply is written

    def _is_hole(self, offset: int, length: int) -> bool:
        """Whether the file has no data in the range (SEEK_DATA): answer without reading."""
        if not self.seek_holes:
            return False
        try:
            return os.lseek(self.file_fd, offset, os.SEEK_DATA) >= offset + length
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data from offset to the end of the file
                return True
            self.seek_holes = False
            return False

    def _report(self, job: Job, err: int, message: str) -> None:
        # Append, then look at _told; the loop clears _told, then takes (_take_finished):
        # a job appended while the loop takes is either taken now or wakes it again.
        self._finished.append(Done(job, err, message))
        if self._told:
            return
        self._told = True
        try:
            self.wire.loop.call_soon_threadsafe(self._take_finished)
        except RuntimeError:
            pass  # the loop is closed: the server is gone

    def _take_finished(self) -> None:
        """On the loop: report every finished job."""
        self._told = False
        finished, done = self._finished, self._done
        while finished:
            done(finished.popleft())
