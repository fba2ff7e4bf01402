"""Where an image's bytes come from, layer by layer: the data behind ``tapnbd map``.

Each run of the guest disk is answered by one layer of the backing chain (its
``depth``, 0 for the top image), as ``qemu-img map`` reports it: ``present`` when some
layer allocates it, ``zero`` when it reads as zeros, ``data`` when a layer holds bytes
for it, and ``offset`` where those bytes are in ``filename`` when that is one plain
place (not for compressed clusters). An unallocated run of the bottom layer reads as
zeros and is not present; a raw file or an NBD export allocates everything.

The walk asks one layer at a time, as qemu-img's ``get_block_status`` does, and each
answer may shorten the run; ``image_map`` merges neighbours the way qemu-img does.
"""

from __future__ import annotations

import errno
from bisect import bisect_right
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace

from tapnbd.driver import Driver, Extent, ExtentFlags


@dataclass(frozen=True, slots=True)
class MapEntry:
    """One run of the guest disk, in ``qemu-img map --output=json``'s terms."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None
    filename: str | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
        }
        if self.offset is not None:
            out["offset"] = self.offset
        return out

    def mergeable(self, nxt: MapEntry) -> bool:
        """qemu-img's rule: same status, same file, and contiguous in that file."""
        if (self.depth, self.present, self.zero, self.data, self.filename) != (
            nxt.depth,
            nxt.present,
            nxt.zero,
            nxt.data,
            nxt.filename,
        ):
            return False
        if (self.offset is None) != (nxt.offset is None):
            return False
        return self.offset is None or self.offset + self.length == nxt.offset


@dataclass(frozen=True, slots=True)
class _Status:
    """What one layer says about the run at a position."""

    length: int
    allocated: bool
    zero: bool = False
    data: bool = False
    offset: int | None = None
    filename: str | None = None


def unwrap(driver: Driver) -> Driver:
    """The driver under any filters (they change no allocation)."""
    from formats.filters import FilterDriver

    while isinstance(driver, FilterDriver):
        driver = driver.child
    return driver


def backing_of(driver: Driver) -> Driver | None:
    """The next layer of the chain, or None at the bottom."""
    backing = getattr(unwrap(driver), "backing", None)
    return backing if isinstance(backing, Driver) else None


def image_format(driver: Driver, throwaway: bool) -> str:
    """The format of the image ``driver`` serves (filters and all): under a throwaway
    overlay (formats.overlay), the image's own, not the overlay's qcow2."""
    return (backing_of(driver) or driver).name if throwaway else driver.name


def overlay_wanted(throwaway: bool, read_only: bool) -> bool:
    """Whether ``-s`` makes a throwaway overlay: not with ``-r``, which serves the image
    read-only and so needs none (qemu-nbd -s -r)."""
    return throwaway and not read_only


def described(driver: Driver, throwaway: bool, snapshot: str | None = None) -> str:
    """What an export's description says of its image, as serve, export add and attach
    all say it: the format, the internal snapshot served, and where writes go."""
    what = image_format(driver, throwaway)
    if snapshot is not None:
        what += f" snapshot {snapshot}"
    if throwaway:
        what += ", writes to a throwaway overlay"
    return what


def layer_name(driver: Driver, default: str) -> str:
    path = getattr(unwrap(driver), "path", None)
    return path if isinstance(path, str) else default


class ExtentCache:
    """The extents a plain layer last reported, so that a walk over a file with many
    extents asks for them once, not once per run (a raw file answers for the whole
    range at every call)."""

    def __init__(self) -> None:
        self._by_driver: dict[int, tuple[list[int], list[Extent]]] = {}

    async def at(self, d: Driver, pos: int, end: int) -> Extent:
        """The extent holding ``pos`` (it may end after ``end``)."""
        cached = self._by_driver.get(id(d))
        if cached is not None:
            starts, extents = cached
            i = bisect_right(starts, pos) - 1
            if i >= 0 and pos < extents[i].offset + extents[i].length:
                return extents[i]
        extents = await d.extents(pos, end - pos)
        self._by_driver[id(d)] = ([e.offset for e in extents], extents)
        return extents[0]


async def _plain_status(
    d: Driver, pos: int, end: int, name: str, has_offset: bool, cache: ExtentCache
) -> _Status:
    """A layer that allocates everything (a raw file, an NBD export, RAM)."""
    if not d.can_extents():
        return _Status(end - pos, True, data=True, offset=pos if has_offset else None)
    first = await cache.at(d, pos, end)
    n = min(end, first.offset + first.length) - pos
    if first.offset > pos or n <= 0:  # a driver that answered another question
        return _Status(end - pos, True, data=True, offset=pos if has_offset else None)
    return _Status(
        n,
        True,
        zero=bool(first.flags & ExtentFlags.ZERO),
        data=not first.flags & ExtentFlags.HOLE,
        offset=pos if has_offset else None,
        filename=name if has_offset else None,
    )


async def _host_zero(child: Driver, host: int, n: int) -> tuple[bool, int]:
    """Whether the file holds a hole at ``host`` (asked when qemu asks), and for how long."""
    if not child.can_extents():
        return False, n
    first = (await child.extents(host, n))[0]
    if first.offset != host or first.length <= 0:
        return False, n
    return bool(first.flags & ExtentFlags.ZERO), min(n, first.length)


async def _asks_the_file(d: Driver) -> bool:
    """Whether qemu asks the image file if a data cluster reads as zeros: only when the
    format says BDRV_BLOCK_RECURSE, which qcow2 says for an image that looks
    metadata-preallocated, and qcow and vpc never."""
    if d.name != "qcow2":
        return False
    from formats.qcow2.driver import Qcow2Driver

    return isinstance(d, Qcow2Driver) and await d.metadata_preallocated()


def _is_vhd(d: Driver) -> bool:
    if d.name != "vhd":
        return False  # no VhdDriver, so its module need not be imported to know
    from formats.vhd.driver import VhdDriver

    return isinstance(d, VhdDriver)


async def _first_run(d: Driver, pos: int, end: int) -> tuple[int, int, int] | None:
    """The (kind, host, n) of a format's table lookup at ``pos``, or None without tables.

    The driver's name says which module to import: only the open format's (start-up).
    """
    if d.name not in ("qcow", "qcow2", "vhd"):
        return None
    from formats.engine.runs import runs

    if d.name == "qcow2":
        from formats.qcow2.driver import Qcow2Driver

        if isinstance(d, Qcow2Driver):
            async for run in runs(d._lookup, d._load, pos, end):
                return run
    if _is_vhd(d):
        from formats.vhd.driver import VhdDriver

        assert isinstance(d, VhdDriver)
        if d._fixed:
            return None
        async for run in runs(d._lookup, d._bitmaps.load, pos, end):
            return run
    if d.name != "qcow":
        return None
    from formats.qcow.driver import QcowDriver

    if isinstance(d, QcowDriver):
        # Its table loader and miss, whether on the shared engine or its own.
        load = getattr(d, "_load", None) or getattr(d, "_load_l2", None)
        while True:
            try:
                return d._lookup(pos, end)
            except Exception as miss:
                off = getattr(miss, "offset", getattr(miss, "l2off", None))
                if off is None or load is None:
                    raise
                await load(off)
    return None


def _is_nbd_driver(d: Driver) -> bool:
    if d.name != "nbd":
        return False
    from formats.nbd import NbdDriver

    return isinstance(d, NbdDriver)


async def layer_status(layer: Driver, pos: int, end: int, name: str, cache: ExtentCache) -> _Status:
    """What ``layer`` alone (not its backing file) holds at ``pos``."""
    from formats.engine.runs import COMPRESSED, DATA, SHARED, ZERO
    from formats.raw import RawDriver

    d = unwrap(layer)
    name = layer_name(d, name)
    run = await _first_run(d, pos, end)
    if run is None:
        if isinstance(d, RawDriver):
            return await _plain_status(d, pos, end, name, True, cache)
        child = getattr(d, "child", None)
        if getattr(d, "_fixed", False) and isinstance(child, Driver):  # a fixed VHD
            return await _plain_status(child, pos, end, name, True, cache)
        return await _plain_status(d, pos, end, name, _is_nbd_driver(d), cache)
    kind, host, n = run
    child = getattr(d, "child", None)
    vhd = _is_vhd(d)
    if vhd and kind not in (DATA, SHARED) and backing_of(d) is None:
        # A VHD with no parent: qemu's vpc calls a free block allocated zeros.
        return _Status(n, True, zero=True)
    if kind in (DATA, SHARED):
        zero = False
        if isinstance(child, Driver) and await _asks_the_file(d):
            zero, n = await _host_zero(child, host, n)
        return _Status(n, True, zero=zero, data=True, offset=host, filename=name)
    if kind == COMPRESSED:
        return _Status(n, True, data=True)
    if kind == ZERO:
        # qcow2's zero flag; a cluster it still holds has an offset (QCOW2_CLUSTER_ZERO_ALLOC).
        return _Status(n, True, zero=True, offset=host or None, filename=name if host else None)
    return _Status(n, False)


async def block_status(
    top: Driver, pos: int, end: int, top_name: str
) -> AsyncGenerator[MapEntry, None]:
    """One unmerged entry per layer answer over [pos, end)."""
    cache = ExtentCache()
    while pos < end:
        layer, name, depth, lim = top, top_name, 0, end
        while True:
            st = await layer_status(layer, pos, lim, name, cache)
            if st.length <= 0:  # the walk would never end
                raise OSError(errno.EIO, f"{name}: no block status at offset {pos}")
            lim = pos + st.length
            if st.allocated:
                entry = MapEntry(
                    pos, st.length, depth, True, st.zero, st.data, st.offset, st.filename
                )
                break
            backing = backing_of(layer)
            if backing is None or pos >= backing.size():
                # The bottom, or past the backing file's end: zeros, from no layer.
                entry = MapEntry(pos, st.length, depth, False, True, False)
                break
            lim = min(lim, backing.size())
            layer, name, depth = backing, layer_name(backing, name), depth + 1
        yield entry
        pos += entry.length


async def image_map(
    driver: Driver, name: str, start: int = 0, length: int | None = None
) -> list[MapEntry]:
    """``qemu-img map``'s entries for [start, start + length), merged as qemu-img merges."""
    end = driver.size() if length is None else min(driver.size(), start + length)
    out: list[MapEntry] = []
    async for e in block_status(driver, start, end, name):
        if out and out[-1].mergeable(e):
            out[-1] = replace(out[-1], length=out[-1].length + e.length)
        else:
            out.append(e)
    return out


def _json_scalar(v: object) -> str:
    """An int or a bool as JSON (json.dumps per value costs more than the walk)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def format_json(entries: list[MapEntry]) -> str:
    """The JSON text, one entry a line, as ``qemu-img map --output=json`` prints it."""
    lines = [
        "{ " + ", ".join(f'"{k}": {_json_scalar(v)}' for k, v in e.to_json().items()) + "}"
        for e in entries
    ]
    return "[" + ",\n".join(lines) + "]"


def _hex(v: int) -> str:
    return f"{v:#x}" if v else "0"  # C's %#x prints 0 without the prefix


def format_human(entries: list[MapEntry]) -> str:
    """The human table: data runs with their place in a file (qemu-img map's default).

    Raises ValueError for data with no single place (a compressed cluster), which the
    table cannot show, as qemu-img refuses it.
    """
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in entries:
        if e.data and e.offset is None:
            raise ValueError("File contains external, encrypted or compressed clusters.")
        if e.data and not e.zero:
            lines.append(
                f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset or 0):<16}{e.filename}"
            )
    return "\n".join(lines)
