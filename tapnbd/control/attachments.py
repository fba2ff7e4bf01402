"""The daemon's attached devices: each one a data-path process (``tapdisk``) plus a device.

``attach`` starts a tapdisk that opens the image and serves it on a private unix socket
(``tapctl``), then connects a device to that socket: the kernel's nbd client, or nbdfuse
plus a loop device (``attach``). Neither the tapdisk nor nbdfuse is in the daemon's
session, so the device keeps working when the daemon dies; a new daemon re-adopts the
running tapdisks it finds in its state file (``adopt``).

No path here ever takes down a device that is mounted: the caller gets the reason
(``attachment_busy``), which names the mount point.

Device and process work is synchronous and runs in worker threads.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from tapnbd import safefs
from tapnbd.control import attach as devices
from tapnbd.control import tapctl, tapdisk
from tapnbd.control.exports import export_stats
from tapnbd.control.messages import Attachment, ExportRecord, ExportStats
from tapnbd.errors import TapnbdError
from tapnbd.protocol.uri import unix_uri

log = logging.getLogger("tapnbd.control")


class Attachments:
    """Attachments by id, and the processes (tapdisk, nbdfuse) this daemon started."""

    def __init__(self, state_path: str, run_dir: str, stats: bool, *, poll_us: int = 0) -> None:
        self.run_dir = run_dir
        #: One directory per tapdisk (its sockets, record and log).
        self.tapdisk_root = os.path.join(state_path, "tapdisk")
        self.stats_enabled = stats
        #: Given to each tapdisk this daemon starts; a re-adopted one keeps its own.
        self.poll_us = poll_us
        self.by_id: dict[str, Attachment] = {}
        self.fuse_procs: dict[str, subprocess.Popen[bytes]] = {}
        self.tap_procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ids = itertools.count(1)

    def __iter__(self) -> Iterator[Attachment]:
        return iter(list(self.by_id.values()))

    def __len__(self) -> int:
        return len(self.by_id)

    def names(self) -> set[str]:
        return {a.export for a in self.by_id.values()}

    def of_export(self, name: str) -> list[Attachment]:
        return [a for a in self.by_id.values() if a.export == name]

    def new(self, name: str, image: str, via: devices.ViaName, read_only: bool) -> Attachment:
        att = Attachment(
            id=str(next(self.ids)), export=name, image=image, via=via, read_only=read_only
        )
        self.by_id[att.id] = att
        return att

    # Making and taking down.

    async def start(
        self,
        att: Attachment,
        fmt: str,
        save: Callable[[], None],
        *,
        share: bool = False,
        probed_raw: bool = False,
    ) -> None:
        """Start the tapdisk, then the device on its socket; undone if either fails.

        ``probed_raw``: ``fmt`` is "raw" as the daemon's export probed it, so the data
        path guards it as a probed raw image (formats.guard), as the export does.

        ``save`` records each step, so that a daemon killed half-way leaves enough in
        its state file for the next one to adopt or undo what exists.
        """
        safefs.ensure_private_dir(self.tapdisk_root)
        att.tapdisk_dir = os.path.join(self.tapdisk_root, att.id)
        att.token = tapctl.new_token()
        proc, record = await asyncio.to_thread(
            tapctl.spawn,
            att.tapdisk_dir,
            image=att.image,
            name=att.export,
            fmt=fmt,
            read_only=att.read_only,
            stats=self.stats_enabled,
            poll_us=self.poll_us,
            token=att.token,
            share=share,
            snapshot=att.snapshot,
            cache=att.cache,
            throwaway=att.throwaway,
            probed_raw=probed_raw,
            trust=att.trust,
        )
        self.tap_procs[att.id] = proc
        att.tapdisk_pid = proc.pid
        att.format = str(record.get("format", ""))
        att.size = int(record.get("size", 0))
        save()
        try:
            socket_path = tapctl.nbd_socket(att)
            if att.via == "socket":
                att.device = socket_path  # a VM's NBD client connects here
            elif att.via == "nbd":
                await asyncio.to_thread(devices.attach_nbd, att, socket=socket_path, connections=4)
            else:
                uri = unix_uri(att.export, socket_path)
                mountdir = os.path.join(self.run_dir, att.id)
                self.fuse_procs[att.id] = await asyncio.to_thread(
                    devices.attach_fuse, att, uri=uri, mountdir=mountdir
                )
            save()
            await asyncio.to_thread(tapctl.tell_device, att)
        except BaseException:
            spawned = self.tap_procs.pop(att.id, None)
            await asyncio.to_thread(tapctl.stop, att, spawned, self.tapdisk_root)
            raise

    async def detach(self, att: Attachment, lazy: bool = False) -> bool:
        """fsync the device, take it down, then stop its tapdisk (which flushes).
        False: the tapdisk closed the image without its last flush.

        The caller has checked ``attachment_busy``: nothing here looks at mounts.
        """
        if att.device and att.via != "socket":
            await asyncio.to_thread(devices.flush_device, att.device)
        if att.via == "nbd":
            await asyncio.to_thread(devices.detach_nbd, att)
        elif att.via == "fuse":
            proc = self.fuse_procs.pop(att.id, None)
            await asyncio.to_thread(devices.detach_fuse, att, proc, lazy=lazy)
        proc = self.tap_procs.pop(att.id, None)
        flushed = await asyncio.to_thread(tapctl.stop, att, proc, self.tapdisk_root)
        self.by_id.pop(att.id, None)
        return flushed

    async def busy(self, att: Attachment) -> str | None:
        """Why ``att`` must not be taken down now, or None: its device is in use
        (``attachment_busy``), or, for a socket, a client (a VM) is connected to it."""
        if att.via != "socket":
            return await asyncio.to_thread(devices.attachment_busy, att)
        if tapctl.why_not_ours(att) is not None:
            return None  # nothing serves it any more
        snap = (await asyncio.to_thread(tapctl.stats, att)).get("snapshot", {})
        n = snap.get("connections", 0) if isinstance(snap, dict) else 0
        if n:
            s = "s" if n != 1 else ""
            return f"{att.device} has {n} client{s} connected (a VM's disk?); disconnect first"
        return None

    # After a restart.

    def adopt(self, records: list[Attachment]) -> list[str]:
        """Take over the attachments whose tapdisk still runs; undo the others unless
        their device is in use. Notes for the user. (Synchronous: run it in a thread.)"""
        notes: list[str] = []
        alive: list[Attachment] = []
        dead: list[tuple[Attachment, str]] = []
        for att in records:
            why = tapctl.why_not_ours(att)
            if why is None:
                alive.append(att)
                notes.append(
                    f"re-adopted {att.device or att.image} ({att.image}): "
                    f"its data path (pid {att.tapdisk_pid}) kept running"
                )
            else:
                dead.append((att, why))
        notes += devices.cleanup_stale([a for a, _ in dead], self.run_dir, keep=alive)
        for att in alive:
            self.by_id[att.id] = att
        for att, why in dead:
            if devices.device_present(att):
                # In use, so left as it is; kept on record so that `detach` can finish.
                self.by_id[att.id] = att
                notes.append(
                    f"{att.device} ({att.image}) is still attached but {why}; its I/O "
                    f"fails: unmount it, then `tapnbd detach {att.device}`"
                )
            elif att.tapdisk_dir and not tapctl.remove_dir(att.tapdisk_dir, self.tapdisk_root):
                notes.append(f"ignored a recorded data-path directory {att.tapdisk_dir!r}")
        notes += self._stop_strays()
        ids = [int(i) for i in self.by_id if i.isdigit()]
        self.ids = itertools.count(max(ids, default=0) + 1)
        return notes

    def _stop_strays(self) -> list[str]:
        """Stop tapdisks under our directory that no record owns (a daemon killed
        between starting one and recording it), unless an nbdfuse still uses one."""
        notes = []
        owned = {a.tapdisk_dir for a in self.by_id.values()}
        root = self.tapdisk_root.rstrip("/") + "/"
        procs = [(pid, devices.cmdline(pid)) for pid in devices.all_pids()]
        for pid, cmd in procs:
            if tapdisk.MODULE not in cmd:
                continue
            dirs = [a for a in cmd if a.startswith(root)]
            if not dirs or dirs[0] in owned:
                continue
            used = any(
                c and os.path.basename(c[0]) == "nbdfuse" and any(dirs[0] + "/" in a for a in c)
                for _, c in procs
            )
            if used:
                notes.append(f"left the data path at {dirs[0]} (pid {pid}): nbdfuse uses it")
                continue
            devices.wait_exit(pid, None, patience=0.0)  # SIGTERM: it flushes and exits
            tapctl.remove_dir(dirs[0], self.tapdisk_root)
            notes.append(f"stopped a data path nobody recorded (pid {pid}, {dirs[0]})")
        return notes

    # Describing.

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
    def record(att: Attachment) -> Attachment:
        """``att`` as replies show it: without the token that identifies its tapdisk."""
        return msgspec.structs.replace(att, token="")

    @staticmethod
    def export_record(att: Attachment, clients: int = 0) -> ExportRecord:
        """The export a tapdisk serves, as ``list`` shows it: ``clients`` connections
        to its data path and no URIs (its socket is the device's alone)."""
        return ExportRecord(
            name=att.export,
            image=att.image,
            format=att.format,
            size=att.size,
            read_only=att.read_only,
            clients=clients,
            devices=[att.device] if att.device else [],
            uris=[],
            origin="attach",
            snapshot=att.snapshot,
            cache=att.cache,
            share=att.share,
            throwaway=att.throwaway,
            trust=att.trust,
        )

    async def stats(self, att: Attachment) -> ExportStats:
        reply: dict[str, Any] = await asyncio.to_thread(tapctl.stats, att)
        try:
            return export_stats(
                att.export, att.image, att.format, reply["snapshot"], bool(reply["enabled"])
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TapnbdError(
                f"malformed statistics from the data path of {att.export!r}: {e}"
            ) from None
