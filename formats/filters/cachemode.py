"""CacheModeFilter: qemu-nbd's ``--cache`` modes that need no O_DIRECT.

- ``writeback`` (the default, no filter): a write is durable once a FLUSH, or its own
  FUA, says so.
- ``writethrough``: every write, zeroing and trim is durable before its reply, as if
  each carried FUA (nbdkit's fua filter, ``fuamode=force``).
- ``unsafe``: FLUSH and FUA are accepted and do nothing (``fuamode=discard``): for
  images nobody needs after a crash, such as a throwaway build disk.

``none`` and ``directsync`` bypass the host's page cache with O_DIRECT, which tapnbd does
not use (its buffers are not aligned for it); they are refused with a message, never
served as something else.
"""

from __future__ import annotations

from formats.filters import FilterDriver
from tapnbd.driver import Driver, FuaMode
from tapnbd.errors import TapnbdError

CACHE_MODES = ("writeback", "writethrough", "unsafe")
_DIRECT = ("none", "directsync")


def check_cache_mode(mode: str) -> None:
    if mode in _DIRECT:
        raise TapnbdError(
            f"--cache={mode} needs O_DIRECT, which tapnbd does not use; writethrough makes "
            "every write durable before its reply, through the page cache"
        )
    if mode not in CACHE_MODES:
        raise TapnbdError(f"--cache {mode!r}: use {', '.join(CACHE_MODES)}")


def with_cache_mode(driver: Driver, mode: str) -> Driver:
    """``driver`` behind a CacheModeFilter, unless ``mode`` is writeback."""
    check_cache_mode(mode)
    return driver if mode == "writeback" else CacheModeFilter(driver, mode)


class CacheModeFilter(FilterDriver):
    """Every write made durable (``writethrough``), or none ever (``unsafe``)."""

    def __init__(self, child: Driver, mode: str) -> None:
        super().__init__(child)
        self._through = mode == "writethrough"
        self._native = child.can_fua() == FuaMode.NATIVE

    async def _settle(self) -> None:
        """Writethrough's durability for a write just done without native FUA."""
        if self._through and not self._native:
            await self.child.flush()

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        await self.child.pwrite(offset, data, self._through and self._native)
        await self._settle()

    def pwrite_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        # Writethrough: the inline path cannot wait for the write to be durable.
        return not self._through and self.child.pwrite_nowait(offset, data)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.child.trim(offset, length, self._through and self._native)
        await self._settle()

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        through = self._through and self._native
        await self.child.zero(offset, length, may_trim=may_trim, fua=through, fast=fast)
        await self._settle()

    async def flush(self) -> None:
        if self._through:
            await self.child.flush()  # (nothing is left to flush; cheap, and honest)

    def can_flush(self) -> bool:
        return True

    def can_fua(self) -> FuaMode:
        return FuaMode.NATIVE  # every write handles it here: forced, or dropped
