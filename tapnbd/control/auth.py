"""Who may talk to the daemon: the peer of a unix socket, checked with SO_PEERCRED.

The control socket is mode 0600 already; the credential check is the second lock, and
the one that still holds if the socket's mode or directory is ever loosened.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any


def peer_uid(sock: Any) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid


def allowed(uid: int) -> bool:
    """The daemon's owner and root may control it; nobody else."""
    return uid in (0, os.geteuid())
