"""A connection's pipe for WRITE payloads spliced from its socket (splice(2)).

A big WRITE's payload normally costs two copies: socket to buffer (the receive) and
buffer to page cache (``pwrite``). Spliced, the socket's pages go into a pipe without a
copy and the driver splices the pipe into its file: one copy. The connection decides
which WRITEs go this way (``NBDConnection._splice_write``); this module moves bytes,
keeps the pipe empty between WRITEs, and holds the state of a payload that is still
arriving (``Arriving``).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import termios
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tapnbd.errors import RequestError
    from tapnbd.protocol.transmission import Request

#: The pipe's size, and so the biggest payload spliced; F_SETPIPE_SZ may give less.
PIPE_SIZE = 1 << 20
#: A payload still arriving is written to the file in parts that end on a multiple of
#: this (of the file's offset), so a WRITE cut short by a crash before its reply left
#: whole blocks, as a disk would.
PART_ALIGN = 4096
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


def same_host(local: str, peer: str) -> bool:
    """Whether a TCP peer at ``peer`` runs on this host (a loopback address, or the
    socket's own). Its bytes then come through loopback, which hands the receiver the
    sender's own pages: spliced into a pipe they stay there until the file takes them,
    so the sender cannot reuse them and copies into colder ones. Measured with fio over
    127.0.0.1, splicing its queued payloads made the sender's CPU per MiB and the rate
    worse in three runs of three (bench/results/2026-12-04-s35-qcow-seqwrite)."""
    addr = ipaddress.ip_address(peer.partition("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback or peer == local


def queued(sock_fd: int) -> int:
    """Bytes queued in a socket, not received yet (FIONREAD)."""
    out = bytearray(4)
    fcntl.ioctl(sock_fd, termios.FIONREAD, out)
    return int.from_bytes(out, "little")


class PayloadPipe:
    """One non-blocking pipe, made lazily, empty whenever a WRITE is not in it."""

    def __init__(self) -> None:
        self.read_fd = -1
        self._write_fd = -1
        self.size = 0

    def open(self) -> bool:
        """Make the pipe if there is none yet; False when the system refuses one."""
        if self.read_fd >= 0:
            return True
        try:
            rd, wr = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            self.size = fcntl.fcntl(wr, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # over the user's pipe limits: keep what we got
            self.size = fcntl.fcntl(wr, _F_GETPIPE_SZ)
        self.read_fd, self._write_fd = rd, wr
        return True

    def fill(self, sock_fd: int, length: int) -> None:
        """Move ``length`` bytes, all queued in the socket, into the (empty) pipe.

        Raises OSError or EOFError if the socket gives fewer: the stream is then out of
        step, and the caller must drop the connection.
        """
        got = self.fill_some(sock_fd, length)
        if got < length:
            raise OSError(errno.EAGAIN, f"{length - got} bytes of a queued payload did not come")

    def fill_some(self, sock_fd: int, want: int) -> int:
        """Move up to ``want`` bytes, as many as the socket has queued and the pipe has
        room for, into the pipe; 0 when there are none. EOFError at the end of the
        stream, OSError if the socket failed."""
        got = 0
        while got < want:
            try:
                n = os.splice(sock_fd, self._write_fd, want - got, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                break
            if n == 0:
                raise EOFError("end of stream in a WRITE payload")
            got += n
        return got

    def take_back(self, length: int, buf: bytearray | memoryview) -> memoryview:
        """The ``length`` bytes in the pipe, read into ``buf``; the pipe is empty after."""
        view = memoryview(buf)[:length]
        have = 0
        while have < length:
            have += os.readv(self.read_fd, [view[have:]])
        return view

    def drain(self) -> None:
        """Drop whatever a failed write left in the pipe, so the next WRITE starts empty."""
        sink = bytearray(65536)
        try:
            while os.readv(self.read_fd, [sink]):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        for fd in (self.read_fd, self._write_fd):
            if fd >= 0:
                os.close(fd)
        self.read_fd = self._write_fd = -1


def recv_some(sock_fd: int, view: memoryview) -> int:
    """Receive into ``view`` what the socket has queued (0 if nothing); EOFError at the
    end of the stream."""
    try:
        n = os.readv(sock_fd, [view])
    except BlockingIOError:
        return 0
    if n == 0 and len(view):
        raise EOFError("end of stream in a WRITE payload")
    return n


@dataclass(slots=True)
class Arriving:
    """A big WRITE whose payload was not all in the socket when its header came.

    The payload is spliced into the pipe as it arrives. With a writer thread
    (tapnbd.server.pipewriter) the pipe is the WRITE's own, and the whole payload goes
    to the thread once it is in; else, or if the pipe fills first, each time the whole
    blocks in the pipe are spliced on into the file by the loop (``put``), so the pipe
    never holds more than what one wake-up brought. If the driver refuses a part (it is
    backing off, or the part is somewhere it must see the bytes), the rest of the
    payload is received into ``buf`` instead, and written the usual way once it is all
    in; if a part fails, the rest is received and dropped, and the WRITE answered with
    the error.
    """

    req: Request
    cost: int  # what _admit charged for it
    t0: int  # Stats.start() (0 with statistics off)
    pipe: PayloadPipe  # the connection's, or one of its own for a writer thread
    dest: int = -1  # for the writer thread: where in its file; -1: the loop puts parts
    got: int = 0  # payload bytes taken from the socket
    put: int = 0  # of those, written to the file
    buf: memoryview | None = None  # the rest, [put, length), once parts stop
    err: RequestError | None = None

    def part_end(self) -> int:
        """Where the next part ends: all that came, once all has; else the last block
        boundary (of the file's offset) within it."""
        req = self.req
        if self.got == req.length:
            return self.got
        return ((req.offset + self.got) & -PART_ALIGN) - req.offset
