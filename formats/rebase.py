"""``tapnbd rebase``: give an overlay a new backing file (qemu-img rebase).

Safe mode keeps what the guest sees: every range the overlay does not hold itself, and
where the old and the new backing file differ, is copied from the old one into the
overlay first (QEMU: img_rebase compares the two backing files cluster by cluster);
then the name is changed. ``unsafe`` (``-u``) changes only the name. An empty new name
makes the image standalone: the "new backing file" then reads as zeros.

The image's lock is held from before the first write to the end (formats.locks); the
driver that does the copying is opened under it with ``share``, as create_qcow2's
preallocation is. A relative new name is relative to the image's directory, as qemu-img
takes it, and stored as given.

``cache`` (-t) is the image's cache mode while the differences are written into it;
its old backing chain, read through it, opens the same way (QEMU's backing files
inherit the cache mode). ``src_cache`` (-T) is the new backing file's, as qemu-img
rebase opens it (formats.filters.cachemode).
"""

from __future__ import annotations

import os
from dataclasses import replace

from formats import OpenRules, open_image, probe
from formats.engine.backing import read_backing
from formats.engine.opening import resolve_backing
from formats.engine.topmap import unallocated_ranges
from formats.filters.cachemode import check_cache_mode, files_for, open_for_cache
from formats.imagemap import unwrap
from formats.locks import locked_target
from formats.pacing import Pace
from tapnbd.driver import Driver, ExtentFlags
from tapnbd.errors import ImageError

#: Bytes compared per read.
CHUNK = 1 << 20
#: The formats whose backing name this module can change.
REBASE_FORMATS = ("qcow", "qcow2", "vhd")


def image_format(path: str, fmt: str) -> str:
    """``fmt``, or the probed format of ``path`` (which must exist)."""
    if not os.path.lexists(path):
        raise ImageError(f"{path}: no such file or device")
    return probe(path) if fmt == "auto" else fmt


async def rebase_image(
    path: str,
    backing: str,
    *,
    backing_format: str | None = None,
    fmt: str = "auto",
    unsafe: bool = False,
    share: bool = False,
    rules: OpenRules | None = None,
    pace: Pace | None = None,
    cache: str = "writeback",
    src_cache: str = "writeback",
) -> None:
    """Make ``backing`` ("" for none) the backing file of the image at ``path``.

    ``pace`` (-p) begins with the bytes the overlay does not hold, all compared.
    ``cache`` and ``src_cache`` (-t and -T): the image's and the new backing file's
    cache modes.
    """
    check_cache_mode(cache)
    check_cache_mode(src_cache)
    rules = rules or OpenRules()
    pace = pace or Pace()
    asked, fmt = fmt, image_format(path, fmt)
    if fmt == "vpc":
        fmt = "vhd"
    if fmt == "vhd" and not backing:
        from formats.vhd.rebase import refuse_standalone

        refuse_standalone(path)
    if fmt not in REBASE_FORMATS:
        raise ImageError(f"{path}: a {fmt} image has no backing file to change")
    where = resolve_backing(path, backing) if backing else ""
    with locked_target(path, share=share) as fd:
        # The header is checked by an open before a byte of it is rewritten (also for
        # -u, which reads no data): a hostile header must fail with a message.
        # (``share``: beside our own writer's lock, which would refuse another open.)
        alone = await open_image(
            path, fmt=asked, read_only=True, rules=replace(rules, no_backing=True, share=True)
        )
        await alone.close()
        new: Driver | None = None
        try:
            if backing and (not unsafe or backing_format is None):
                if unsafe and not os.path.exists(where):
                    pass  # -u may name a file that is not there yet, as in qemu-img
                else:
                    with files_for(src_cache):
                        new = await open_image(
                            where, fmt=backing_format or "auto", read_only=True, rules=rules
                        )
                    backing_format = backing_format or new.name
                    if fmt == "vhd" and new.name != "vhd":
                        raise ImageError(f"{where}: a VHD's parent must be a VHD, not {new.name}")
            if not unsafe:
                # A probed image is opened as probed: the trust rules then apply to its
                # backing name (formats.open_backing).
                await _copy_differences(path, asked, new, replace(rules, share=True), pace, cache)
        finally:
            if new is not None:
                await new.close()
        if fmt == "qcow2":
            from formats.qcow2.rebase import write_backing as write_qcow2

            write_qcow2(fd, backing, backing_format if backing else None)
        elif fmt == "vhd":
            from formats.vhd.rebase import write_parent

            await write_parent(fd, path, backing, where)
        else:
            from formats.qcow.rebase import write_backing as write_qcow

            mtime = int(os.stat(where).st_mtime) & 0xFFFFFFFF if os.path.exists(where) else 0
            write_qcow(fd, backing, mtime)


async def _copy_differences(
    path: str, fmt: str, new: Driver | None, rules: OpenRules, pace: Pace, cache: str
) -> None:
    """Copy into the image what its old backing file shows and ``new`` would not."""
    top = await open_for_cache(path, cache, fmt=fmt, read_only=False, rules=rules)
    try:
        cs = top.describe().get("cluster-size", 65536)
        assert isinstance(cs, int)
        # The format's own driver: the map swaps its backing file, which a filter
        # in front would only shadow.
        ranges = await unallocated_ranges(unwrap(top))
        pace.begin(sum(n for _, n in ranges))
        for start, n in ranges:
            pos, end = start, start + n
            while pos < end:
                m = min(end - pos, CHUNK)
                # Zeros on both sides, by block status: nothing to read.
                if not (await _reads_zero(top, pos, m) and await _reads_zero(new, pos, m)):
                    old = bytes(await top.pread(pos, m))
                    now = bytes(await read_backing(new, pos, m)) if new is not None else bytes(m)
                    if old != now:
                        await _write_changed(top, pos, old, now, cs)
                pos += m
                pace.advance(m)
        await top.flush()
    finally:
        await top.close()


async def _reads_zero(d: Driver | None, pos: int, n: int) -> bool:
    """Whether block status says [pos, pos + n) of ``d`` reads as zeros (None: no file)."""
    if d is None or pos >= d.size():
        return True
    if not d.can_extents():
        return False
    end = min(pos + n, d.size())
    while pos < end:
        got = await d.extents(pos, end - pos)
        if not got or got[0].offset != pos:
            return False
        for e in got:
            if not e.flags & ExtentFlags.ZERO:
                return False
            pos = e.offset + e.length
            if pos >= end:
                break
    return True


async def _write_changed(top: Driver, pos: int, old: bytes, now: bytes, cs: int) -> None:
    """Write the clusters of ``old`` (at ``pos``) that differ from ``now``."""
    i = 0
    while i < len(old):
        j = min(len(old), (pos + i) // cs * cs + cs - pos)
        if old[i:j] != now[i:j]:
            await top.pwrite(pos + i, old[i:j])
        i = j
