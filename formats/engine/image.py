"""What every table-mapped image driver (QCOW v1, qcow2, VHD) sets up the same way.

``ImageDriver`` holds the child (the image file), the backing driver and the metadata,
answers the capabilities they share, sizes table caches, and closes: metadata flushed
first (unless read-only), then the file and the backing chain, even when the flush
fails. ``open_format`` is the open sequence around a format's ``read_meta``: the image
file, its backing file (opened and closed on error), the driver and its ``prepare``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from formats.engine.opening import image_file
from tapnbd.driver import Driver, Extent, ExtentFlags, FuaMode
from tapnbd.errors import ImageError

#: Memory for one cache of tables (dirty ones are pinned and may exceed it).
CACHE_BYTES = 32 << 20
#: Layer answers one qemu:allocation-depth request may take (ImageDriver.allocation_depth).
DEPTH_STEPS = 4096

M = TypeVar("M")
M_contra = TypeVar("M_contra", contravariant=True)


@runtime_checkable
class Growable(Protocol):
    """A child that can extend its file in place (RawDriver.grow)."""

    def grow(self, length: int, *, allocate: bool = False) -> None: ...


def cache_tables(table_bytes: int, budget: int = CACHE_BYTES) -> int:
    """How many tables of ``table_bytes`` fit a cache's memory budget."""
    return max(16, budget // table_bytes)


class ImageDriver(Driver, Generic[M]):
    """An image of virtual ``size`` bytes read through ``child``; ``backing`` fills holes."""

    def __init__(
        self,
        child: Driver,
        backing: Driver | None,
        meta: M,
        size: int,
        *,
        read_only: bool = False,
        path: str = "",
    ) -> None:
        self.child = child
        self.backing = backing
        self.meta = meta
        self.read_only = read_only
        self.path = path
        self._size = size
        self._grow = child.grow if isinstance(child, Growable) else None
        self._closed = False

    def size(self) -> int:
        return self._size

    def can_write(self) -> bool:
        return not self.read_only

    def can_fua(self) -> FuaMode:
        return FuaMode.NATIVE

    def can_extents(self) -> bool:
        return True

    async def allocation_depth(self, offset: int, length: int) -> list[Extent]:
        """The chain walk of ``tapnbd map`` (formats.imagemap): a run some layer holds is
        at that layer's depth + 1, one that none holds at 0; neighbours at one depth
        merge. Past the end of a backing file shorter than the layer above it, reads
        are that backing file's zeros, and qemu-nbd names its depth. The walk stops
        after DEPTH_STEPS answers (a fragmented image costs one step per run): the
        client asks again for the rest."""
        from formats.imagemap import backing_of, block_status

        layers: list[Driver] = [self]
        while (below := backing_of(layers[-1])) is not None:
            layers.append(below)
        out: list[Extent] = []
        name = self.path or self.name
        async with aclosing(block_status(self, offset, offset + length, name)) as walk:
            steps = 0
            async for e in walk:
                if e.present:
                    depth = e.depth + 1
                else:  # the bottom's hole (0), or past its backing file's end
                    depth = e.depth + 2 if e.depth + 1 < len(layers) else 0
                if out and out[-1].flags == depth:
                    last = out[-1]
                    out[-1] = Extent(last.offset, last.length + e.length, last.flags)
                else:
                    out.append(Extent(e.start, e.length, ExtentFlags(depth)))
                steps += 1
                if steps == DEPTH_STEPS:
                    break
        return out

    async def prepare(self) -> None:
        """Open-time work once the driver exists (repairs a writable open owes)."""

    async def finish(self) -> None:
        """The last writes of a writable image before its file closes (a flush)."""
        await self.flush()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self.read_only:
                await self.finish()
        finally:
            await self.child.close()
            if self.backing is not None:
                await self.backing.close()


class DriverType(Protocol[M_contra]):
    """An ImageDriver subclass, as its constructor."""

    def __call__(
        self,
        child: Driver,
        backing: Driver | None,
        meta: M_contra,
        /,
        *,
        read_only: bool = False,
        path: str = "",
    ) -> ImageDriver[Any]: ...


async def open_format(
    path: str,
    read_only: bool,
    read_meta: Callable[[Driver], Awaitable[M]],
    backing_of: Callable[[M], Awaitable[Driver | None]],
    driver_type: DriverType[M],
    *,
    link: str = "backing file",
    chain_name: str = "backing chain",
) -> Driver:
    """Open the image at ``path``: its metadata, its backing file, then the driver.

    ``backing_of(meta)`` opens the backing file (or gives None). The driver is made
    with ``driver_type`` and prepared. On any failure the backing file and the image
    file are closed again.
    """
    async with image_file(path, read_only, link=link, chain_name=chain_name) as child:
        backing: Driver | None = None
        try:
            meta = await read_meta(child)
            backing = await backing_of(meta)
            driver = driver_type(child, backing, meta, read_only=read_only, path=path)
            await driver.prepare()
            return driver
        except BaseException:
            if backing is not None:
                await backing.close()
            raise


async def open_backing_file(image_path: str, name: str, fmt: str | None = None) -> Driver | None:
    """The backing file ``name`` of the image at ``image_path`` (None when the open rules
    say to read the image alone); errors name the link."""
    from formats import open_backing
    from formats.engine.opening import resolve_backing

    try:
        return await open_backing(name, resolve_backing(image_path, name), fmt)
    except ImageError as e:
        raise type(e)(f"backing file {name!r}: {e}") from None
