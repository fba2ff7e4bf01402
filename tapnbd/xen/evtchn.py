"""Event channels: the doorbell between frontend and backend, as a unix socket pair.

Xen's interdomain event channel is a pair of ports with a "pending" bit: notifying sets
the peer's bit, and notifications sent while it is still set merge into one upcall.
Here a channel is one connected AF_UNIX stream socket. ``notify`` writes one byte
without blocking; the receiver drains everything that has arrived and counts it as one
event, so notifications that pile up merge as they do in Xen. If the socket buffer is
full the peer has a backlog of unread kicks already, and this one is dropped.

Setting up follows Xen's two steps. The frontend allocates an unbound port
(EVTCHNOP_alloc_unbound), which listens on an abstract-namespace socket named after the
vbd directory, the domain and the port, and writes the port number to xenstore
(``event-channel``). The backend reads it and binds (EVTCHNOP_bind_interdomain), which
connects. Abstract names have no path-length limit beyond 107 bytes and no file to
clean up. A closed socket is also how each side learns that the other has died:
the kernel closes it when the process exits, even on SIGKILL.

Abstract names are open to every local user: anyone may bind a port's name before the
frontend does, or connect to the frontend's listener before the backend. So each side
checks the peer's uid (SO_PEERCRED) before it trusts the channel: the backend only
binds to its own uid's frontend, and the frontend only hands its memory to the vbd
directory's owner or root.

The first byte on a new channel, from the frontend, carries its memory (grant.py) as an
SCM_RIGHTS file descriptor; every later byte is a kick.
"""

from __future__ import annotations

import array
import asyncio
import os
import select
import socket
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

_DRAIN = 4096
_MAX_PORT = 4096
#: Room for a few descriptors, so extra ones a hostile peer sends arrive (and are closed)
#: rather than being lost to MSG_CTRUNC.
_FD_ROOM = socket.CMSG_SPACE(8 * array.array("i").itemsize)
#: struct ucred: pid, uid, gid.
_UCRED = struct.Struct("iII")


class EventChannelClosed(ConnectionError):
    """The other end of the event channel has gone away."""


def port_address(directory: str | Path, domid: int, port: int) -> str:
    """The abstract socket name of ``domid``'s event channel ``port`` in a vbd."""
    st = os.stat(directory)
    return f"\0tapnbd-evtchn/{st.st_dev:x}:{st.st_ino:x}/{domid}/{port}"


class EventChannel:
    """One bound end of an interdomain event channel."""

    __slots__ = ("_poll", "coalesced", "port", "received", "sent", "sock")

    def __init__(self, sock: socket.socket, port: int) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.port = port
        #: notify() calls that reached the socket (Xen: EVTCHNOP_send).
        self.sent = 0
        #: notify() calls dropped because the peer had unread kicks already.
        self.coalesced = 0
        #: Events consumed; one may stand for several notifications.
        self.received = 0
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def peer_uid(self) -> int:
        """The uid of the process at the other end, as the kernel saw it connect."""
        creds = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        return int(_UCRED.unpack(creds)[1])

    def notify(self) -> None:
        """notify_remote_via_evtchn: ring the peer's doorbell."""
        try:
            self.sock.send(b"\1", socket.MSG_DONTWAIT)
        except BlockingIOError:
            self.coalesced += 1
            return
        except OSError as e:
            raise EventChannelClosed(f"event channel {self.port}: {e.strerror}") from None
        self.sent += 1

    def send_fd(self, fd: int) -> None:
        """Hand ``fd`` to the peer: the frontend's memory, sent once after the bind."""
        fds = array.array("i", [fd])
        self.sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])

    async def receive_fd(self, timeout: float) -> int:
        """The descriptor the peer sends first (``send_fd``); the caller owns it.

        Waits without blocking the loop. Raises EventChannelClosed if the peer goes, or
        sends a byte without exactly one descriptor; TimeoutError after ``timeout``.
        """
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()
        fileno = self.sock.fileno()

        def wake() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(fileno, wake)
        try:
            await asyncio.wait_for(readable, timeout)
        finally:
            loop.remove_reader(fileno)
        try:
            data, ancdata, _, _ = self.sock.recvmsg(1, _FD_ROOM, socket.MSG_CMSG_CLOEXEC)
        except OSError as e:
            raise EventChannelClosed(f"event channel {self.port}: {e.strerror}") from None
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if len(fds) == 1 and data:
            return fds[0]
        for fd in fds:
            os.close(fd)
        what = "closed" if not data else f"sent {len(fds)} descriptors, not 1"
        raise EventChannelClosed(f"event channel {self.port}: peer {what}")

    def consume(self) -> bool:
        """Clear the pending bit: read every kick that has arrived. False once closed."""
        got = False
        while True:
            try:
                data = self.sock.recv(_DRAIN, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                return False
            if not data:
                return False
            got = True
            if len(data) < _DRAIN:
                break
        if got:
            self.received += 1
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until an event arrives (True) or ``timeout`` seconds pass (False).

        Raises EventChannelClosed if the peer has gone.
        """
        ms = None if timeout is None else max(0, int(timeout * 1000))
        if not self._poll.poll(ms):
            return False
        if not self.consume():
            raise EventChannelClosed(f"event channel {self.port}: peer closed")
        return True

    def close(self) -> None:
        try:
            self._poll.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()


class UnboundPort:
    """EVTCHNOP_alloc_unbound: a port in ``domid`` that ``remote_domid`` may bind."""

    def __init__(self, directory: str | Path, domid: int, remote_domid: int) -> None:
        self.domid = domid
        self.remote_domid = remote_domid
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        for port in range(1, _MAX_PORT):
            try:
                self._listener.bind(port_address(directory, domid, port))
            except OSError:
                continue
            self.port = port
            break
        else:
            self._listener.close()
            raise OSError(f"no free event channel port in domain {domid}")
        self._listener.listen(1)

    def accept(self, timeout: float) -> EventChannel:
        """Wait for the backend's bind; the result is the connected channel."""
        channel = self.try_accept(timeout)
        if channel is None:
            raise TimeoutError(f"backend did not bind event channel {self.port}")
        return channel

    def try_accept(self, timeout: float) -> EventChannel | None:
        """The backend's bind if it comes within ``timeout`` seconds, else None."""
        self._listener.settimeout(timeout)
        try:
            sock, _ = self._listener.accept()
        except TimeoutError:
            return None
        return EventChannel(sock, self.port)

    def close(self) -> None:
        self._listener.close()


def bind_interdomain(directory: str | Path, remote_domid: int, remote_port: int) -> EventChannel:
    """EVTCHNOP_bind_interdomain: connect to the frontend's unbound port.

    Never waits: a unix socket connects at once to a listener with room in its backlog,
    and a listener without room (one that never accepts) fails with EAGAIN rather than
    holding the backend up.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        sock.connect(port_address(directory, remote_domid, remote_port))
    except OSError as e:
        sock.close()
        raise EventChannelClosed(
            f"cannot bind event channel {remote_port} of domain {remote_domid}: {e.strerror}"
        ) from None
    return EventChannel(sock, remote_port)
