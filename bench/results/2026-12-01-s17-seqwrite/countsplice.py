"""``python countsplice.py serve ...``: tapnbd serve, with each big WRITE's splice
outcome and the bytes queued in the socket at its header counted, printed at exit
(SIGTERM). Run from the checkout whose tapnbd is measured."""

from __future__ import annotations

import atexit
import collections
import signal
import sys
from typing import Any

from tapnbd.protocol.transmission import Request
from tapnbd.server import connection, splice
from tapnbd.server.connection import NBDConnection

counts: collections.Counter[str] = collections.Counter()
_queued = splice.queued
_splice_write = NBDConnection._splice_write


def queued(sock_fd: int) -> int:
    n = _queued(sock_fd)
    counts["queued >= 1 MiB" if n >= 1 << 20 else f"queued < {((n >> 17) + 1) * 128} KiB"] += 1
    return n


def splice_write(self: NBDConnection, req: Request) -> bool:
    spliced = _splice_write(self, req)
    counts["spliced" if spliced else "not spliced"] += 1
    return spliced


def bye(*_: Any) -> None:
    sys.exit(0)


splice.queued = queued
setattr(connection.NBDConnection, "_splice_write", splice_write)  # noqa: B010
atexit.register(lambda: print(dict(sorted(counts.items())), file=sys.stderr, flush=True))
signal.signal(signal.SIGTERM, bye)

from tapnbd.cli import main  # noqa: E402

main()
