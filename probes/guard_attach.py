"""Does a device's data path (attach to a probed raw export) keep the probed-raw guard?

PYTHONPATH=. python probes/guard_attach.py
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
        tap.ok("export", "add", str(clean), "--name", "c")
        out = tap.ok("attach", "c", "--via", "socket")
        print(out)
        (att,) = tap.list()["attachments"]
        uri = f"nbd+unix:///c?socket={att['device']}"
        print("through the device's data path:", guest_write(uri, base, head, 0))
        print("first bytes now:", clean.read_bytes()[:8])
    finally:
        tap.cleanup()


asyncio.run(main())
