"""The daemon's attached devices: make, find, describe and take down attachments.

The device work itself (nbd-client, nbdfuse, losetup) is in ``attach``; this module
keeps the daemon's table of attachments and runs that work in worker threads, as the
device's I/O may come back through the daemon's own event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import urllib.parse
from collections.abc import Iterator

from tapnbd.control import attach as devices
from tapnbd.control.attach import Attachment
from tapnbd.control.messages import AttachmentRecord
from tapnbd.errors import TapnbdError
from tapnbd.server.exports import Export


class Attachments:
    """Attachments by id, and the nbdfuse processes this daemon started."""

    def __init__(self, run_dir: str, attach_socket: str) -> None:
        self.run_dir = run_dir
        self.attach_socket = attach_socket
        self.by_id: dict[str, Attachment] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # id -> nbdfuse
        self.ids = itertools.count(1)

    def __iter__(self) -> Iterator[Attachment]:
        return iter(list(self.by_id.values()))

    def __len__(self) -> int:
        return len(self.by_id)

    def new(self, export: Export, via: devices.ViaName, read_only: bool) -> Attachment:
        att = Attachment(
            id=str(next(self.ids)),
            export=export.name,
            image=export.image,
            via=via,
            read_only=read_only,
        )
        self.by_id[att.id] = att
        return att

    def of_export(self, name: str) -> list[Attachment]:
        return [a for a in self.by_id.values() if a.export == name]

    async def attach(self, att: Attachment, export: Export) -> None:
        socket_path = self.attach_socket
        if att.via == "nbd":
            conns = 4 if export.backend.can_multi_conn else 1
            await asyncio.to_thread(devices.attach_nbd, att, socket=socket_path, connections=conns)
            return
        uri = f"nbd+unix:///{urllib.parse.quote(export.name, safe='')}?socket={socket_path}"
        mountdir = os.path.join(self.run_dir, att.id)
        proc = await asyncio.to_thread(devices.attach_fuse, att, uri=uri, mountdir=mountdir)
        self.procs[att.id] = proc

    async def detach(self, att: Attachment, lazy: bool = False) -> None:
        """fsync the device, then take it down; the record goes once it is gone."""
        if att.device:
            await asyncio.to_thread(devices.flush_device, att.device)
        if att.via == "nbd":
            await asyncio.to_thread(devices.detach_nbd, att)
        else:
            proc = self.procs.pop(att.id, None)
            await asyncio.to_thread(devices.detach_fuse, att, proc, lazy=lazy)
        self.by_id.pop(att.id, None)

    def find(self, target: str) -> Attachment:
        atts = list(self.by_id.values())
        if target.startswith("/"):
            real = os.path.realpath(target)
            for att in atts:
                if att.device and os.path.realpath(att.device) == real:
                    return att
            for att in atts:
                if att.image == real:
                    return att
        for att in atts:
            if att.export == target or att.image == target:
                return att
        raise TapnbdError(f"nothing is attached as {target}")

    @staticmethod
    def record(att: Attachment) -> AttachmentRecord:
        return AttachmentRecord(
            device=att.device,
            export=att.export,
            image=att.image,
            via=att.via,
            read_only=att.read_only,
        )
