"""A connection's pipe for WRITE payloads spliced from its socket (splice(2)).

A big WRITE's payload normally costs two copies: socket to buffer (the receive) and
buffer to page cache (``pwrite``). Spliced, the socket's pages go into a pipe without a
copy and the driver splices the pipe into its file: one copy. The connection decides
which WRITEs go this way (``NBDConnection._splice_write``); this module only moves
bytes, and keeps the pipe empty between WRITEs.
"""

from __future__ import annotations

import fcntl
import os
import termios

#: The pipe's size, and so the biggest payload spliced; F_SETPIPE_SZ may give less.
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


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
        got = 0
        while got < length:
            n = os.splice(sock_fd, self._write_fd, length - got, flags=os.SPLICE_F_NONBLOCK)
            if n == 0:
                raise EOFError("end of stream in a queued WRITE payload")
            got += n

    def take_back(self, length: int, buf: bytearray) -> memoryview:
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
