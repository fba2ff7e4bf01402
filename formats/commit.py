"""``tapnbd commit``: write an overlay's own data into its backing file (qemu-img commit).

What the overlay holds itself (formats.engine.topmap), and with ``base`` what every
image above the base holds, is copied into the base image; ranges that read as zeros
are zeroed there (a base smaller than the overlay is grown first, as qemu-img commit
grows it). Then, as qemu-img commit does by default, the overlay is emptied so
that it shows the base through again; ``keep`` (``-d``) leaves it as it was, and a base
below the immediate backing file always does (qemu-img: "-b implies -d").

A qcow2 overlay is emptied in place, as QEMU does it: every guest cluster is unmapped,
so its header, options (refcount width, lazy refcounts) and internal snapshots stay. A
qcow or VHD overlay is made anew under its lock, with the same size, cluster size and
backing name and format (what the guest sees is the same). Both images are locked while
they are written.
"""

from __future__ import annotations

import errno
import os
from contextlib import ExitStack
from dataclasses import replace

from formats import OpenRules, open_image
from formats.engine.topmap import complement, unallocated_ranges
from formats.filters.cachemode import check_cache_mode, open_for_cache
from formats.locks import locked_target
from formats.pacing import Pace
from formats.rebase import CHUNK, image_format
from tapnbd.driver import Driver, overrides
from tapnbd.errors import ImageError

_ZEROS = bytes(CHUNK)

COMMIT_FORMATS = ("qcow", "qcow2", "vhd", "vpc")


def _chain(top: Driver) -> list[Driver]:
    """``top`` and the images below it, in order."""
    out = [top]
    while (below := getattr(out[-1], "backing", None)) is not None:
        out.append(below)
    return out


def _path(d: Driver) -> str:
    return str(getattr(d, "path", ""))


async def commit_image(
    path: str,
    *,
    base: str | None = None,
    fmt: str = "auto",
    keep: bool = False,
    share: bool = False,
    rules: OpenRules | None = None,
    pace: Pace | None = None,
    cache: str = "writeback",
) -> int:
    """Commit the image at ``path`` into ``base`` (default: its backing file).

    ``pace`` (-p and -r) begins with the bytes to copy and admits each read of them.
    ``cache`` (-t) is the base's cache mode while it is written (formats.filters.cachemode).
    Returns the number of bytes copied.
    """
    check_cache_mode(cache)
    rules = rules or OpenRules()
    pace = pace or Pace()
    kind = image_format(path, fmt)
    if kind not in COMMIT_FORMATS:
        raise ImageError(f"{path}: a {kind} image has no backing file to commit into")
    with ExitStack() as stack:
        top_fd = stack.enter_context(locked_target(path, share=share))
        top = await open_image(path, fmt=fmt, read_only=True, rules=replace(rules, share=True))
        try:
            chain = _chain(top)
            if len(chain) < 2:
                raise ImageError(f"{path}: the image has no backing file")
            if base is None:
                at = 1
            else:
                real = os.path.realpath(base)
                found = [
                    i for i, d in enumerate(chain[1:], 1) if os.path.realpath(_path(d)) == real
                ]
                if not found:
                    raise ImageError(f"{base}: not in the backing chain of {path}")
                at = found[0]
            base_driver = chain[at]
            base_path, base_fmt = _path(base_driver), base_driver.name
            if not base_path or not os.path.lexists(base_path):
                raise ImageError(f"{path}: its backing file is not a local image")
            facts = top.describe()
            size = top.size()
            runs = complement(await unallocated_ranges(top, chain[at - 1]), size)
            if base_driver.size() < size:
                # As qemu-img commit: the base grows to the overlay's size first.
                from formats.resize import resize_image

                await resize_image(base_path, str(size), fmt=base_fmt, share=share, rules=rules)
            # The base's lock first: a base in use by a server is refused untouched.
            target = await open_for_cache(
                base_path, cache, fmt=base_fmt, read_only=False, rules=replace(rules, share=share)
            )
            try:
                copied = await _copy(top, target, runs, size, pace)
            finally:
                await target.close()
        finally:
            await top.close()
        if not keep and at == 1:
            if kind == "qcow2":
                await _unmap_all(path, rules)
            else:
                await _make_empty(path, kind, facts, base_fmt, top_fd, rules)
    return copied


async def _copy(
    top: Driver, target: Driver, runs: list[tuple[int, int]], size: int, pace: Pace
) -> int:
    if target.size() < size and any(s + n > target.size() for s, n in runs):
        raise ImageError(
            f"the base image ({target.size()} bytes) is smaller than the overlay ({size} bytes)"
        )
    copied = 0
    pace.begin(sum(n for _, n in runs))
    for start, n in runs:
        pos, end = start, start + n
        while pos < end:
            m = min(end - pos, CHUNK)
            await pace.admit(m)
            data = memoryview(await top.pread(pos, m))
            if data == _ZEROS[:m] and overrides(target, "zero"):
                try:
                    await target.zero(pos, m, may_trim=True, fua=False, fast=False)
                except OSError as e:
                    if e.errno != errno.ENOTSUP:
                        raise
                    await target.pwrite(pos, data)
            else:
                await target.pwrite(pos, data)
            copied += m
            pos += m
            pace.advance(m)
    await target.flush()
    return copied


async def _unmap_all(path: str, rules: OpenRules) -> None:
    """Empty a qcow2 overlay in place, keeping its options and snapshots (as qemu)."""
    from formats.qcow2.driver import Qcow2Driver

    # The caller holds the overlay's lock: this open must not ask for it again.
    d = await open_image(path, fmt="qcow2", read_only=False, rules=replace(rules, share=True))
    try:
        assert isinstance(d, Qcow2Driver)
        await d.make_empty()
        await d.flush()
    finally:
        await d.close()


async def _make_empty(
    path: str, kind: str, facts: dict[str, object], base_fmt: str, fd: int, rules: OpenRules
) -> None:
    """Make a qcow or VHD overlay anew, empty, in the file whose lock ``fd`` holds (qemu
    empties a QCOW v1 image by clearing its L1 table; the guest sees the same)."""
    size = facts["virtual-size"]
    cs = facts.get("cluster-size")
    name = facts.get("backing-filename")
    assert isinstance(size, int) and isinstance(name, str)
    assert cs is None or isinstance(cs, int)
    if kind == "qcow":
        from formats.qcow.create import create_qcow

        await create_qcow(
            path,
            size,
            backing=name,
            backing_format=base_fmt,
            optimise=False,
            cluster_size=cs,
            target_fd=fd,
            rules=rules,
        )
    else:
        from formats.vhd.create import create_vhd

        # A VHD names its parent by a bare file name; the locators hold the path.
        full = str(facts.get("full-backing-filename", name))
        here = os.path.dirname(os.path.abspath(path))
        rel = os.path.relpath(os.path.abspath(full), here)
        await create_vhd(path, size, backing=rel, block_size=cs, target_fd=fd)
