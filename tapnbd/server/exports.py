"""Exports: a name, a Backend, and what the handshake tells clients about them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from tapnbd.backend import Backend
from tapnbd.errors import ImageError
from tapnbd.protocol.consts import ALLOCATION_DEPTH, DIRTY_BITMAP
from tapnbd.protocol.consts import TransmissionFlag as TF
from tapnbd.protocol.handshake import Catalog, ExportInfo


def transmission_flags(backend: Backend) -> TF:
    """Export flags follow from the Backend's capabilities (nbdkit test-eflags)."""
    flags = TF.HAS_FLAGS | TF.SEND_CACHE
    if backend.read_only:
        flags |= TF.READ_ONLY
    if backend.can_flush:
        flags |= TF.SEND_FLUSH
    if backend.can_fua:
        flags |= TF.SEND_FUA
    if backend.is_rotational:
        flags |= TF.ROTATIONAL
    if backend.can_trim:
        flags |= TF.SEND_TRIM
    if backend.can_zero:
        flags |= TF.SEND_WRITE_ZEROES
        if backend.can_fast_zero:
            # "SEND_FAST_ZERO ... MUST be 0 when SEND_WRITE_ZEROES is 0"
            flags |= TF.SEND_FAST_ZERO
    if backend.can_multi_conn:
        flags |= TF.CAN_MULTI_CONN
    return flags


@dataclass(eq=False)
class Export:
    """One export: a name clients ask for, and the Backend serving it."""

    name: str
    backend: Backend
    image: str = ""
    description: str = ""
    connections: int = 0
    #: The driver's dirty bitmaps this export offers as qemu:dirty-bitmap:NAME.
    bitmaps: tuple[str, ...] = ()
    #: Offer the qemu:allocation-depth context (qemu-nbd -A).
    allocation_depth: bool = False
    #: The --discard and --detect-zeroes the driver was wrapped for (to show and keep).
    discard: str = "unmap"
    detect_zeroes: str = "off"
    #: qemu-nbd's --cache and -o the driver was wrapped for (to show and keep).
    cache: str = "writeback"
    offset: int = 0
    #: Opened beside other users (--share), and over a throwaway overlay (-s).
    share: bool = False
    throwaway: bool = False
    info: ExportInfo = field(init=False)

    def __post_init__(self) -> None:
        self.backend.name = self.name
        have = self.backend.driver.bitmaps()
        for b in self.bitmaps:
            if b not in have:
                raise ImageError(
                    f"{self.image or self.name}: no usable persistent bitmap named {b!r} "
                    f"(it has: {', '.join(have) or 'none'})"
                )
        bs = self.backend.block_size
        self.info = ExportInfo(
            name=self.name,
            size=self.backend.size,
            flags=transmission_flags(self.backend),
            description=self.description,
            block_size=(bs.minimum, bs.preferred, bs.maximum),
            contexts=(
                *((ALLOCATION_DEPTH,) if self.allocation_depth else ()),
                *(DIRTY_BITMAP + b for b in dict.fromkeys(self.bitmaps)),
            ),
        )

    @property
    def format(self) -> str:
        """The image's format: under a throwaway overlay, the image's, not the overlay's."""
        from formats.imagemap import image_format

        return image_format(self.backend.driver, self.throwaway)


class ExportRegistry(Catalog):
    """The server's own table of exports. Names are keys here, never file paths."""

    def __init__(self) -> None:
        self._exports: dict[str, Export] = {}
        self.default: str | None = None

    def add(self, export: Export, *, default: bool = False) -> None:
        if export.name in self._exports:
            raise ValueError(f"an export named {export.name!r} already exists")
        self._exports[export.name] = export
        if default or self.default is None:
            self.default = export.name

    def remove(self, name: str) -> Export:
        export = self._exports.pop(name)
        if self.default == name:
            self.default = next(iter(self._exports), None)
        return export

    def get(self, name: str) -> Export | None:
        if name == "" and self.default is not None:
            name = self.default
        return self._exports.get(name)

    def __iter__(self) -> Iterator[Export]:
        return iter(list(self._exports.values()))

    def __len__(self) -> int:
        return len(self._exports)

    # Catalog, for the handshake.

    def lookup(self, name: str) -> ExportInfo | None:
        export = self.get(name)
        return export.info if export is not None else None

    def exports(self) -> Iterable[ExportInfo]:
        return [e.info for e in self._exports.values()]
