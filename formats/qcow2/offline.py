"""An image opened for the tools that rewrite its metadata in place (amend, snapshot):
its file locked for writing, its metadata read and checked as hostile, and refused if a
crash or qemu left it dirty or corrupt (``check --repair`` first).

The file goes through ``formats.engine.opening.file_filter`` like any image's, so the
power-loss tests can record what reaches it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from formats.engine.opening import file_filter
from formats.qcow2.layout import Incompatible
from formats.qcow2.meta import Qcow2Meta, read_meta
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
    child: Driver = RawDriver(path, read_only=False, exclusive=not share)
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
        yield child, meta
    finally:
        await child.close()
