"""qemu-nbd's ``--cache`` modes: whether a write is durable before its reply, and whether
the image files bypass the host's page cache.

| mode | page cache | a write is durable | here |
|---|---|---|---|
| ``writeback`` (default) | used | at FLUSH, or with FUA | no filter |
| ``writethrough`` | used | before its reply | CacheModeFilter, FUA forced |
| ``directsync`` | bypassed | before its reply | DirectFile, and FUA forced |
| ``none`` (``-n``) | bypassed | at FLUSH, or with FUA | DirectFile (formats.direct) |
| ``unsafe`` | used | never: FLUSH and FUA do nothing | CacheModeFilter, files unsynced |

Forcing FUA is nbdkit's fua filter with ``fuamode=force``; dropping it, ``fuamode=discard``.
The page cache is bypassed by opening the image files inside ``formats.direct.direct_files``.
Under ``unsafe`` the image files never sync either (formats.raw.NO_FLUSH), so that the
formats' own flushes of their metadata cost nothing, as qemu's cache.no-flush.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from formats.direct import direct_files
from formats.filters import FilterDriver
from formats.raw import NO_FLUSH
from tapnbd.driver import Driver, FuaMode
from tapnbd.errors import TapnbdError

CACHE_MODES = ("writeback", "writethrough", "unsafe", "none", "directsync")


def check_cache_mode(mode: str) -> None:
    if mode not in CACHE_MODES:
        raise TapnbdError(f"--cache {mode!r}: use {', '.join(CACHE_MODES)}")


@contextmanager
def files_for(mode: str) -> Iterator[None]:
    """How to open the image (files) for ``mode``: past the page cache or not, and
    never synced (``unsafe``)."""
    token = NO_FLUSH.set(mode == "unsafe")
    try:
        with direct_files(mode in ("none", "directsync")):
            yield
    finally:
        NO_FLUSH.reset(token)


async def open_for_cache(spec: str, mode: str, *, throwaway: bool = False, **kw: Any) -> Driver:
    """``open_image(spec, **kw)`` for ``mode``: its files opened past the page cache or
    not, and the driver behind what the mode puts on top. The mode is checked first, so
    nothing is opened for one that does not exist.

    ``throwaway`` (qemu-nbd's -s): the image is opened read-only under a throwaway qcow2
    overlay (formats.overlay) that takes the writes; the overlay's file is opened for
    the mode too, and the mode's filter goes over the overlay.
    """
    from formats.overlay import open_image_or_overlay

    check_cache_mode(mode)
    with files_for(mode):
        driver = await open_image_or_overlay(spec, throwaway=throwaway, **kw)
    return with_cache_mode(driver, mode)


def with_cache_mode(driver: Driver, mode: str) -> Driver:
    """``driver`` (opened inside ``files_for(mode)``) behind what ``mode`` needs on top."""
    check_cache_mode(mode)
    if mode in ("writeback", "none"):
        return driver
    return CacheModeFilter(driver, "unsafe" if mode == "unsafe" else "writethrough")


class CacheModeFilter(FilterDriver):
    """Every write made durable (``writethrough``), or none ever (``unsafe``)."""

    def __init__(self, child: Driver, mode: str) -> None:
        super().__init__(child)
        self._through = mode == "writethrough"
        self._native = child.can_fua() == FuaMode.NATIVE
        #: The FUA passed down: writethrough's, where the child honours it itself.
        self._fua = self._through and self._native

    async def _settle(self) -> None:
        """Writethrough's durability for a write just done without native FUA."""
        if self._through and not self._native:
            await self.child.flush()

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        await self.child.pwrite(offset, data, self._fua)
        await self._settle()

    def pwrite_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        # Writethrough: the inline path cannot wait for the write to be durable.
        return not self._through and self.child.pwrite_nowait(offset, data)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.child.trim(offset, length, self._fua)
        await self._settle()

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        await self.child.zero(offset, length, may_trim=may_trim, fua=self._fua, fast=fast)
        await self._settle()

    async def flush(self) -> None:
        if self._through:
            await self.child.flush()  # (nothing is left to flush; cheap, and honest)

    def can_flush(self) -> bool:
        return True

    def can_fua(self) -> FuaMode:
        return FuaMode.NATIVE  # every write handles it here: forced, or dropped
