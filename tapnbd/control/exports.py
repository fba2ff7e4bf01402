"""The daemon's exports: open, name, find, describe and close the images it serves.

An export is an image opened once (a driver stack under a Backend) and registered by
name with the daemon's NBD server. ``origin`` says who made it: ``export add`` (kept
until removed, restored after a restart) or ``attach`` (closed with its last device).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from formats import is_local_path
from formats.filters.cachemode import open_for_cache
from formats.filters.discard import check_modes, with_modes
from formats.filters.window import from_offset
from formats.imagemap import described, overlay_wanted
from tapnbd.backend import Backend
from tapnbd.control.messages import AttachRequest, ExportRecord, ExportStats, OpCounters, Trust
from tapnbd.errors import TapnbdError
from tapnbd.protocol.handshake import TLSMode
from tapnbd.server.exports import Export, ExportRegistry
from tapnbd.server.listener import NBDServer
from tapnbd.server.standalone import export_name

#: Longest export name accepted (the NBD spec's limit on names is 4096 bytes).
MAX_NAME = 256


def canonical_image(spec: str) -> str:
    """How an image is identified: its real path, or a ``ram:``/``rbd:``/NBD name as given."""
    if not is_local_path(spec):
        return spec
    if not os.path.isabs(spec):
        raise TapnbdError(f"image path {spec!r} must be absolute (the client resolves it)")
    return os.path.realpath(spec)


def check_name(name: str) -> str:
    if not name:
        raise TapnbdError("an export name cannot be empty")
    if len(name.encode()) > MAX_NAME or not name.isprintable():
        raise TapnbdError(f"invalid export name {name!r}: printable, at most {MAX_NAME} bytes")
    return name


def export_stats(
    name: str, image: str, fmt: str, snap: dict[str, Any], enabled: bool
) -> ExportStats:
    """A Stats snapshot (``tapnbd.stats``) as the control protocol carries it."""
    return ExportStats(
        name=name,
        image=image,
        format=fmt,
        ops={op: OpCounters(**c) for op, c in snap["ops"].items()},
        errors_by_errno=dict(snap["errors_by_errno"]),
        in_flight=snap["in_flight"],
        connections=snap["connections"],
        uptime_s=snap["uptime_s"],
        enabled=enabled,
    )


@dataclass(slots=True)
class Kept:
    """What the daemon keeps about an export beside the server's Export: who made it and
    how it was opened, so that a restore and a device's data path open it the same way."""

    origin: str  # "export" | "attach"
    #: The format opened, never "auto": a restore or a device does not probe again.
    format: str
    snapshot: str | None = None  # the qcow2 snapshot served
    bitmaps: list[str] = field(default_factory=list)  # dirty bitmaps offered
    #: The image was probed as raw: recorded as "raw", still guarded as a probed raw
    #: image (formats.guard), here and in a device's data path.
    probed_raw: bool = False
    #: The admin's trust options it was added with.
    trust: Trust = field(default_factory=Trust)


class Exports:
    """The registry of the daemon's exports, with what it keeps about each (``Kept``)."""

    def __init__(self, server: NBDServer, registry: ExportRegistry, stats: bool) -> None:
        self.server = server
        self.registry = registry
        self.stats_enabled = stats
        self.kept: dict[str, Kept] = {}  # by export name
        #: Whether NBD clients may see image paths in descriptions (``--expose-paths``).
        self.expose_paths = False

    def __iter__(self) -> Iterator[Export]:
        return iter(self.registry)

    def __len__(self) -> int:
        return len(self.registry)

    async def open(
        self,
        image: str,
        name: str,
        read_only: bool,
        fmt: str,
        origin: str,
        snapshot: str | None = None,
        bitmaps: list[str] | None = None,
        allocation_depth: bool = False,
        discard: str = "unmap",
        detect_zeroes: str = "off",
        *,
        cache: str = "writeback",
        offset: int = 0,
        share: bool = False,
        throwaway: bool = False,
        probed_raw: bool = False,
        trust: Trust | None = None,
    ) -> Export:
        """Open ``image`` and export it as ``name``. ``share`` opens it beside other
        users (formats.locks); ``throwaway`` (without ``read_only``) sends the writes to
        a throwaway overlay, which goes when the export closes (formats.overlay).
        ``probed_raw``: its format ("raw") was probed when it was first added (a
        restore), so its guest still may not make it probe as another format.
        ``trust``: what the admin allowed its backing chain (formats.OpenRules)."""
        trust = trust if trust is not None else Trust()
        check_modes(discard, detect_zeroes)
        throwaway = overlay_wanted(throwaway, read_only)
        # A snapshot opens read-only: without an overlay, so is the Backend.
        driver = await open_for_cache(
            image,
            cache,
            fmt=fmt,
            read_only=read_only,
            rules=trust.rules(share=share, guard_raw=probed_raw),
            snapshot=snapshot,
            throwaway=throwaway,
        )
        try:
            driver = with_modes(from_offset(driver, offset, image), discard, detect_zeroes)
            backend = Backend(driver, read_only=read_only)
            backend.stats.enabled = self.stats_enabled
            # NBD_INFO_DESCRIPTION and LIST reach every client: no path unless configured.
            shown = image if self.expose_paths else name
            export = Export(
                name,
                backend,
                image,
                f"{shown} ({described(driver, throwaway, snapshot)})",
                bitmaps=tuple(bitmaps or ()),
                allocation_depth=allocation_depth,
                discard=discard,
                detect_zeroes=detect_zeroes,
                cache=cache,
                offset=offset,
                share=share,
                throwaway=throwaway,
            )
            self.registry.add(export)
        except BaseException:
            await driver.close()
            raise
        self.kept[name] = Kept(
            origin,
            export.format,
            snapshot,
            list(bitmaps or ()),
            probed_raw=export.format == "raw" and (fmt == "auto" or probed_raw),
            trust=trust,
        )
        return export

    async def remove(self, export: Export) -> bool:
        """Take the export out of the registry, disconnect its clients, flush, close.
        False: the close did not flush (Backend.close_within)."""
        if self.registry.get(export.name) is export:
            self.registry.remove(export.name)
            # Now, not after the wait: an export added under the name meanwhile keeps
            # its own record.
            self.kept.pop(export.name, None)
        conns = [c for c in self.server.connections if c.export is export]
        if conns:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(c.drain()) for c in conns], timeout=30
            )
            for task in pending:
                task.cancel()
        return await export.backend.close_within(export.name)

    def attach_target(self, req: AttachRequest, taken: set[str]) -> tuple[Export | None, str, str]:
        """What ``attach`` means: (the export it names, or None for a new image; the
        image; the export's name, unique among ours and ``taken``)."""
        named = req.image.startswith("/") or not is_local_path(req.image)  # not an export
        image = canonical_image(req.image) if named else req.image
        existing = self.of_image(image) if not image.startswith("ram:") else None
        if existing is None and not named:
            existing = self.registry.get(image)  # the name of an export
            if existing is None:
                raise TapnbdError(f"no image or export named {req.image!r}")
        if existing is not None:
            if req.name is not None and req.name != existing.name:
                raise TapnbdError(f"{existing.image} is already exported as {existing.name!r}")
            if existing.image.startswith("ram:"):
                raise TapnbdError(
                    f"export {existing.name!r} is a RAM disk in the daemon's memory, which a "
                    "device's own data path cannot share; attach a new ram:SIZE instead"
                )
            return existing, existing.image, existing.name
        if req.name is not None:
            name = check_name(req.name)
            if self.registry.get(name) is not None or name in taken:
                raise TapnbdError(
                    f"an export named {name!r} already exists; choose another with --name"
                )
        else:
            base = check_name(export_name(image) or "disk")
            name = base
            for n in itertools.count(2):
                if self.registry.get(name) is None and name not in taken:
                    break
                name = f"{base}-{n}"
        return None, image, name

    def get(self, name: str) -> Export:
        export = self.registry.get(name) if name else None
        if export is None:
            raise TapnbdError(f"no export named {name!r}")
        return export

    def of_image(self, image: str) -> Export | None:
        for export in self.registry:
            if export.image == image:
                return export
        return None

    def clients(self, export: Export) -> list[Any]:
        """NBD connections to ``export`` (devices are served by their own data paths)."""
        return [c for c in self.server.connections if c.export is export]

    def listen(self) -> list[str]:
        out = []
        for ep in self.server.endpoints:
            out.append(f"unix:{ep.path}" if ep.kind == "unix" else f"tcp:{ep.host}:{ep.port}")
        return out

    def uris(self, export: Export) -> list[str]:
        tls = self.server.tls_mode is TLSMode.REQUIRE
        return [ep.uri(export.name, tls=tls) for ep in self.server.endpoints]

    def record(self, export: Export, devices: list[str] | None = None) -> ExportRecord:
        """The export as the state file keeps it (how to open it again); with
        ``devices``, as ``list`` shows it, with its size, clients and URIs too."""
        k = self.kept[export.name]
        rec = ExportRecord(
            name=export.name,
            image=export.image,
            format=k.format,
            read_only=export.backend.read_only,
            origin=cast("Any", k.origin),
            snapshot=k.snapshot,
            bitmaps=list(k.bitmaps),
            allocation_depth=export.allocation_depth,
            discard=export.discard,
            detect_zeroes=export.detect_zeroes,
            cache=export.cache,
            offset=export.offset,
            share=export.share,
            throwaway=export.throwaway,
            probed_raw=k.probed_raw,
            trust=k.trust,
        )
        if devices is not None:
            rec.size = export.backend.size
            rec.clients = len(self.clients(export))
            rec.devices = devices
            rec.uris = self.uris(export)
        return rec

    def stats(self, export: Export) -> ExportStats:
        stats = export.backend.stats
        snap = cast("dict[str, Any]", stats.snapshot())
        return export_stats(export.name, export.image, export.format, snap, stats.enabled)
