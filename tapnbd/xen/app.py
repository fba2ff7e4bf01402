"""``tapnbd ring serve``'s runner: open an image, serve it as a vbd until a signal."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import TYPE_CHECKING

from tapnbd.safefs import ensure_private_dir
from tapnbd.xen.xenbus import DEFAULT_DEVID, DEFAULT_DOMID, VbdServer

if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from formats import OpenRules
    from tapnbd.xen.blkback import RingStats


async def serve_image(
    image: str,
    directory: str | Path,
    *,
    fmt: str = "auto",
    read_only: bool = False,
    once: bool = False,
    domid: int = DEFAULT_DOMID,
    devid: int = DEFAULT_DEVID,
    rules: OpenRules | None = None,
    on_ready: Any = None,
    snapshot: str | None = None,
) -> RingStats:
    """Open ``image`` and serve it as vbd ``domid``/``devid`` until SIGINT/SIGTERM.

    ``rules`` relax the image trust rules as ``serve``'s options do (default: the safe ones).
    ``snapshot`` serves an internal qcow2 snapshot instead of the active image, read-only.
    """
    from formats import open_image
    from tapnbd.backend import Backend

    # The vbd directory holds the xenstore that decides what we map and write: ours
    # alone (made 0700, or an existing one that is ours and not writable by others).
    ensure_private_dir(os.fspath(directory))
    # A snapshot opens read-only, so the Backend is read-only too.
    driver = await open_image(image, fmt=fmt, read_only=read_only, rules=rules, snapshot=snapshot)
    backend = Backend(driver, read_only=read_only)
    server = VbdServer(backend, directory, domid=domid, devid=devid, params=image, once=once)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.stop)
    try:
        task = asyncio.ensure_future(server.run())
        ready = asyncio.ensure_future(server.wait_ready())
        await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and on_ready is not None:
            on_ready(server)
        ready.cancel()
        await task
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await backend.close()
    return server.stats
