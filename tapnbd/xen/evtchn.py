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
"""

from __future__ import annotations

import os
import select
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

_DRAIN = 4096
_MAX_PORT = 4096


class EventChannelClosed(ConnectionError):
    """The other end of the event channel has gone away."""


def _address(directory: str | Path, domid: int, port: int) -> str:
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
                self._listener.bind(_address(directory, domid, port))
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
        self._listener.settimeout(timeout)
        try:
            sock, _ = self._listener.accept()
        except TimeoutError:
            raise TimeoutError(f"backend did not bind event channel {self.port}") from None
        return EventChannel(sock, self.port)

    def close(self) -> None:
        self._listener.close()


def bind_interdomain(
    directory: str | Path, remote_domid: int, remote_port: int, *, timeout: float = 5.0
) -> EventChannel:
    """EVTCHNOP_bind_interdomain: connect to the frontend's unbound port."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(_address(directory, remote_domid, remote_port))
    except OSError as e:
        sock.close()
        raise EventChannelClosed(
            f"cannot bind event channel {remote_port} of domain {remote_domid}: {e.strerror}"
        ) from None
    return EventChannel(sock, remote_port)
