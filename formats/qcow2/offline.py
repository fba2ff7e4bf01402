"""An image opened for the tools that rewrite its metadata in place (amend, snapshot,
bitmap): its file locked for writing, its metadata read and checked as hostile, and
refused if a crash or qemu left it dirty or corrupt (``check --repair`` first). And the
header sector those tools switch with.

The file goes through ``formats.engine.opening.file_filter`` like any image's, so the
power-loss tests can record what reaches it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

from formats.engine.opening import file_filter
from formats.qcow2.layout import (
    V2_HEADER_SIZE,
    Ext,
    Incompatible,
    Qcow2Header,
    build_extension,
)
from formats.qcow2.meta import Qcow2Meta, check_walkable, header_extensions, read_meta
from formats.raw import RawDriver
from tapnbd.errors import ImageError

if TYPE_CHECKING:
    from tapnbd.driver import Driver

#: A disk writes a sector whole or not at all: each tool's header write is one, so a
#: power cut leaves the old header or the new.
SECTOR = 512


@asynccontextmanager
async def rewritable(path: str, *, share: bool = False) -> AsyncIterator[tuple[Driver, Qcow2Meta]]:
    """(file, metadata) of the qcow2 image at ``path``, its lock held unless ``share``."""
    child: Driver = RawDriver(path, read_only=False, lock=True, share=share)
    wrap = file_filter.get()
    if wrap is not None:
        child = wrap(child)
    try:
        meta = await read_meta(child)
        bits = meta.header.incompatible_features
        if bits & Incompatible.DIRTY:
            raise ImageError(f"{path}: the dirty bit is set; run tapnbd check --repair first")
        if bits & Incompatible.CORRUPT:
            raise ImageError(f"{path}: qemu marked the image corrupt; repair it first")
        check_walkable(meta, path)
        yield child, meta
    finally:
        await child.close()


def header_sector(
    path: str,
    meta: Qcow2Meta,
    head: bytes,
    header: Qcow2Header,
    changes: dict[int, bytes | None] | None = None,
) -> bytes:
    """``header``, the image's header extensions (with ``changes``: type -> new data,
    None to drop it) and the backing name, as one sector.

    The feature name table is optional and big (qemu's is 392 bytes), and is left out
    to make room; a layout that still does not fit is refused (convert instead).
    """
    changes = changes or {}
    exts = [
        build_extension(t, data)
        for t, data in header_extensions(meta.header, head, meta.cluster_size)
        if t != Ext.FEATURE_TABLE and t not in changes
    ]
    exts += [build_extension(t, data) for t, data in changes.items() if data is not None]
    tail = b"".join(exts) + bytes(8)  # the end-of-extensions marker
    name = meta.backing_name.encode("utf-8", "surrogateescape") if meta.backing_name else b""
    fixed = len(header.build()) + len(tail)
    header = replace(header, backing_file_offset=fixed if name else 0, backing_file_size=len(name))
    new = header.build() + tail + name
    if len(new) > SECTOR:
        raise ImageError(
            f"{path}: the new header would take {len(new)} bytes, more than the {SECTOR}-byte "
            "sector it must fit in to be written safely; convert the image instead"
        )
    return new.ljust(SECTOR, b"\0")


async def clear_tail(child: Driver, meta: Qcow2Meta, head: bytes) -> None:
    """After a switch to a one-sector header: the old header cluster's contents past the
    sector are no longer referenced; clear them."""
    h, cs = meta.header, meta.cluster_size
    end = h.header_length if h.version >= 3 else V2_HEADER_SIZE
    for _t, data in header_extensions(h, head, cs):
        end += 8 + len(data) + (-len(data) % 8)
    end += 8
    if h.backing_file_offset:
        end = max(end, h.backing_file_offset + h.backing_file_size)
    end = min(end, cs)
    if end > SECTOR:
        await child.pwrite(SECTOR, bytes(end - SECTOR))
        await child.flush()
