"""DiscardFilter: qemu-nbd's ``--discard`` and ``--detect-zeroes`` in front of an export.

- ``discard="ignore"`` (qemu-nbd's default): TRIM succeeds and changes nothing.
  WRITE_ZEROES is left alone: qemu-nbd still frees space for one without NO_HOLE
  (measured: the tests compare the files' allocated blocks). ``"unmap"``: TRIM passes
  through (tapnbd's default).
- ``detect="on"``: a WRITE whose payload is all zeros is written as a zeroing instead
  of data (qcow2 zero clusters, a raw file's zero range), so a guest that writes zeros
  does not allocate them. ``"unmap"`` lets that zeroing free the space too, and needs
  ``discard="unmap"``, as qemu-nbd requires.

As a filter it is never bypassed: filters do not splice (tapnbd.driver.Driver.splices),
and while it detects zeros it intercepts writes, so none takes the inline path.
"""

from __future__ import annotations

import errno

from formats.filters import FilterDriver
from tapnbd.buffers import all_zero
from tapnbd.driver import Driver
from tapnbd.errors import TapnbdError

DISCARD_MODES = ("ignore", "unmap")
DETECT_MODES = ("off", "on", "unmap")


def check_modes(discard: str, detect: str) -> None:
    """A one-line error for modes qemu-nbd would refuse."""
    if discard not in DISCARD_MODES:
        raise TapnbdError(f"--discard {discard!r}: use ignore or unmap")
    if detect not in DETECT_MODES:
        raise TapnbdError(f"--detect-zeroes {detect!r}: use off, on or unmap")
    if detect == "unmap" and discard != "unmap":
        raise TapnbdError("--detect-zeroes=unmap needs --discard=unmap (as qemu-nbd)")


def with_modes(driver: Driver, discard: str, detect: str) -> Driver:
    """``driver``, behind a DiscardFilter unless the modes are the defaults (an export
    served as it always was pays for no filter)."""
    if discard == "unmap" and detect == "off":
        return driver
    return DiscardFilter(driver, discard=discard, detect=detect)


class DiscardFilter(FilterDriver):
    """What TRIM, WRITE_ZEROES and all-zero WRITEs do to ``child``'s allocation."""

    def __init__(self, child: Driver, *, discard: str = "unmap", detect: str = "off") -> None:
        check_modes(discard, detect)
        super().__init__(child)
        self._unmap = discard == "unmap"
        self._detect = detect != "off"
        self._detect_unmap = detect == "unmap"

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if self._detect and all_zero(data):
            try:
                await self.child.zero(
                    offset, len(data), may_trim=self._detect_unmap, fua=fua, fast=False
                )
                return
            except OSError as e:
                if e.errno != errno.ENOTSUP:
                    raise
        await self.child.pwrite(offset, data, fua)

    def intercepts(self, op: str) -> bool:
        # Detecting, every WRITE takes pwrite above, never the child's inline path.
        return op == "write" and self._detect

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if self._unmap:
            await self.child.trim(offset, length, fua)
        elif fua:  # nothing changed, but "FUA: the operation is durable": it is
            await self.child.flush()

    def can_trim(self) -> bool:
        # Ignored TRIMs still succeed, as qemu-nbd advertises and ignores them.
        return self.child.can_trim() or not self._unmap
