"""Who may talk to the daemon: the peer of a unix socket, checked with SO_PEERCRED.

The control socket is mode 0600 already; the credential check is the second lock, and
the one that still holds if the socket's mode or directory is ever loosened.
"""

from __future__ import annotations

import os

from tapnbd.server.listener import peer_uid

__all__ = ["allowed", "peer_uid"]


def allowed(uid: int) -> bool:
    """The daemon's owner and root may control it; nobody else."""
    return uid in (0, os.geteuid())
