"""``tapnbd resize``: a new virtual size for raw, QCOW v1, qcow2 and VHD images
(qemu-img resize).

The size is absolute (``10G``), or relative to the current one (``+1G``, ``-512M``).
Shrinking must be asked for (``shrink``, qemu-img's ``--shrink``) and drops the data
past the new end, as qemu-img does. After growing, the new range reads as zeros even
where a larger backing file would show something there: it is
zeroed through the driver, as QEMU's truncate does (BDRV_REQ_ZERO_WRITE) when a
backing file is longer than the old size.

A dynamic VHD grows as far as its block table can in place (formats.vhd.resize);
qemu-img cannot resize a VHD at all. Every write happens under the image's lock.
"""

from __future__ import annotations

import os
from dataclasses import replace

from formats import OpenRules, open_image, parse_size
from formats.locks import locked_target
from formats.rebase import image_format
from tapnbd.driver import Driver
from tapnbd.errors import ImageError


def target_size(current: int, text: str) -> int:
    """``text`` as an absolute size, or relative to ``current`` with a sign."""
    text = text.strip()
    if text[:1] in ("+", "-"):
        delta = parse_size(text[1:])
        new = current + delta if text[0] == "+" else current - delta
        if new <= 0:
            raise ImageError(f"size {text}: the image is {current} bytes; it would be {new}")
        return new
    return parse_size(text)


async def resize_image(
    path: str,
    size: str,
    *,
    fmt: str = "auto",
    shrink: bool = False,
    share: bool = False,
    rules: OpenRules | None = None,
    preallocation: str = "off",
) -> tuple[int, int]:
    """Resize the image at ``path``; returns (old size, new size).

    ``preallocation`` (qemu-img resize --preallocation) allocates the grown range:
    ``falloc`` reserves its space, ``full`` writes its zeros, ``metadata`` (qcow2 only)
    gives its clusters L2 entries. A qcow2 image preallocates whole new clusters: the
    old last cluster stays as it was.
    """
    rules = replace(rules or OpenRules(), share=True)  # we hold the lock ourselves
    kind = image_format(path, fmt)
    if kind == "vpc":
        kind = "vhd"
    if kind not in ("raw", "qcow", "qcow2", "vhd"):
        raise ImageError(f"{path}: resize is for raw, qcow, qcow2 and vhd images, not {kind}")
    with locked_target(path, share=share) as fd:
        current = await _current_size(path, fmt, rules)
        new = target_size(current, size)
        if new < current and not shrink:
            raise ImageError(
                f"{path}: {new} bytes is smaller than the image ({current} bytes): give "
                "--shrink to drop the data past the new end"
            )
        if kind in ("qcow", "vhd") and new < current:
            raise ImageError(f"{path}: a {kind} image cannot shrink (qemu-img cannot either)")
        _check_preallocation(path, kind, preallocation, growing=new > current)
        if kind != "raw" and new % 512:
            raise ImageError(f"{path}: a {kind} image's size must be a multiple of 512 bytes")
        if new == current:
            return current, new
        if kind == "raw":
            os.ftruncate(fd, new)
            if preallocation != "off":
                _preallocate_raw(fd, path, current, new, preallocation)
            os.fsync(fd)
            return current, new
        if kind == "qcow2":
            from formats.qcow2.resize import check_qcow2_size

            check_qcow2_size(fd, path, new)
        if new < current:
            await _discard_tail(path, fmt, new, current, rules)
        if kind == "qcow":
            from formats.qcow.resize import grow_qcow

            await grow_qcow(fd, path, new)
        elif kind == "vhd":
            from formats.vhd.resize import grow_vhd

            await grow_vhd(fd, path, new)
        else:
            from formats.qcow2.resize import resize_with_bitmaps, set_qcow2_size

            if not await resize_with_bitmaps(path, new):
                set_qcow2_size(fd, path, new)
        if new > current:
            await _zero_grown(path, fmt, current, new, rules)
        if preallocation != "off":
            await _preallocate_qcow2(path, current, preallocation, rules)
    return current, new


def _check_preallocation(path: str, kind: str, mode: str, *, growing: bool) -> None:
    from formats.qcow2.create import PREALLOCATION

    if mode not in PREALLOCATION:
        raise ImageError(f"--preallocation {mode!r}: use {', '.join(PREALLOCATION)}")
    if mode == "off":
        return
    if not growing:
        raise ImageError(f"{path}: --preallocation is for growing an image")
    if kind not in ("raw", "qcow2"):
        raise ImageError(f"{path}: --preallocation is for raw and qcow2 images, not {kind}")
    if kind == "raw" and mode == "metadata":
        raise ImageError(f"{path}: --preallocation metadata is for qcow2 (raw has no metadata)")


def _preallocate_raw(fd: int, path: str, old: int, new: int, mode: str) -> None:
    if mode == "falloc":  # as create --reserve: fallocate(2) itself, never emulated
        from formats.raw import fallocate

        try:
            fallocate(fd, 0, old, new - old)
        except OSError as e:
            raise ImageError(f"{path}: cannot reserve space: {e.strerror}") from None
        return
    zeros = bytes(min(new - old, 1 << 20))  # full: written out
    pos = old
    while pos < new:
        pos += os.pwrite(fd, zeros[: new - pos], pos)


async def _preallocate_qcow2(path: str, old: int, mode: str, rules: OpenRules) -> None:
    from formats.qcow2.driver import Qcow2Driver

    d = await open_image(path, fmt="qcow2", read_only=False, rules=rules)
    try:
        assert isinstance(d, Qcow2Driver)
        await d.preallocate(mode, start=-(-old // d.cluster_size) * d.cluster_size)
    finally:
        await d.close()


async def _current_size(path: str, fmt: str, rules: OpenRules) -> int:
    d = await open_image(path, fmt=fmt, read_only=True, rules=rules)
    try:
        return d.size()
    finally:
        await d.close()


async def _discard_tail(path: str, fmt: str, new: int, old: int, rules: OpenRules) -> None:
    """Free the whole clusters past ``new`` before the size goes down."""
    d = await open_image(path, fmt=fmt, read_only=False, rules=rules)
    try:
        cs = d.describe().get("cluster-size", 512)
        assert isinstance(cs, int)
        start = -(-new // cs) * cs
        if start < old:
            await d.trim(start, old - start)
        await d.flush()
    finally:
        await d.close()


async def _zero_grown(path: str, fmt: str, old: int, new: int, rules: OpenRules) -> None:
    """Make [old, new) read as zeros when a backing file would show through it.

    As QEMU's bdrv_co_truncate: only "if (backing_len > old_size)"; without a backing
    file the new clusters are unallocated and read as zeros already (the tail of the
    old last cluster is left as it is, as qemu-img leaves it).
    """
    d = await open_image(path, fmt=fmt, read_only=True, rules=rules)
    try:
        backing: Driver | None = getattr(d, "backing", None)
        longer = backing is not None and backing.size() > old
    finally:
        await d.close()
    if not longer:
        return  # nothing shows through: no writable open (it would touch the checksum)
    d = await open_image(path, fmt=fmt, read_only=False, rules=rules)
    try:
        await d.zero(old, new - old, may_trim=True, fua=False, fast=False)
        await d.flush()
    finally:
        await d.close()
