"""The daemon's record of each export (control.exports.Kept) across a remove."""

from __future__ import annotations

import asyncio

from tapnbd.control.exports import Exports
from tapnbd.control.messages import Trust
from tapnbd.server.exports import Export, ExportRegistry
from tapnbd.server.listener import NBDServer


class _Draining:
    """An NBD connection to ``export`` whose drain waits for ``gate``."""

    def __init__(self, export: Export) -> None:
        self.export = export
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def drain(self) -> None:
        self.entered.set()
        await self.gate.wait()


async def test_a_name_reused_while_the_old_export_drains_keeps_its_record() -> None:
    """``export remove`` waits for the old export's clients; an export added under the
    same name meanwhile must keep its own record (format, origin, trust), not lose it
    when the old one's removal ends."""
    registry = ExportRegistry()
    server = NBDServer(registry)
    exports = Exports(server, registry, stats=True)
    trusted = Trust(allow_block_devices=True)
    old = await exports.open("ram:1048576", "disk", False, "auto", "export", trust=trusted)
    client = _Draining(old)
    server.connections.add(client)  # type: ignore[arg-type]
    removing = asyncio.create_task(exports.remove(old))
    await client.entered.wait()
    new = await exports.open("ram:2097152", "disk", True, "auto", "attach")
    client.gate.set()
    assert await removing
    server.connections.discard(client)
    record = exports.record(new, [])
    assert (record.origin, record.read_only, record.size) == ("attach", True, 2097152)
    assert record.trust == Trust()
    assert [r.name for r in (exports.record(e) for e in exports)] == ["disk"]
    assert await exports.remove(new)
    assert not exports.kept
