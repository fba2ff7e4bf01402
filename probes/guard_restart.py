"""Does the probed-raw guard survive a daemon restart, and an attach to the export?

PYTHONPATH=. python probes/guard_restart.py
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from tests.control.tap import Tapnbd
from tests.security.test_probing import evil_sector, guest_write

MiB = 1 << 20


async def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="s32-", dir="/tmp"))
    tap = Tapnbd(base)
    try:
        head = await evil_sector(base)
        clean = base / "clean.img"
        with open(clean, "wb") as f:
            f.truncate(4 * MiB)
        uris = tap.ok("export", "add", str(clean), "--name", "c")
        uri = next(u for u in uris.split() if u.startswith("nbd"))
        print("before restart:", guest_write(uri, base, head, 0))
        print(tap.run("daemon", "stop").stderr)
        print(tap.run("list").stderr)
        print("after restart:", guest_write(uri, base, head, 0))
        print("first bytes now:", clean.read_bytes()[:8])
        print(tap.run("info", str(clean)).stderr[-400:])
    finally:
        tap.cleanup()


asyncio.run(main())
