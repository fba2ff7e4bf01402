"""QCOW version 1, with blktap's Xen extension header (see ../shared/spec/blktap.md).

``FORMAT`` registers the format: ``probe`` scores an image's first bytes and
``open_qcow`` opens one (and, through ``formats.open_image``, its backing chain).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextvars import ContextVar

from formats import Format
from formats.qcow.driver import QcowDriver
from formats.qcow.layout import QCOW_MAGIC, QCOW_VERSION
from formats.qcow.meta import read_meta
from formats.raw import RawDriver
from tapnbd.driver import Driver
from tapnbd.errors import ImageError, InvalidImageError

__all__ = ["FORMAT", "QcowDriver", "open_qcow", "probe", "resolve_backing"]

#: Backing chains deeper than this are refused (QEMU stops at a similar depth).
MAX_CHAIN = 16
#: Real paths of the images being opened in this chain, to catch loops.
_chain: ContextVar[tuple[str, ...]] = ContextVar("qcow_chain", default=())
#: Wraps each image file's driver before the format uses it (fault injection:
#: formats.filters.at_file_layer, ``tapnbd serve --inject-at file``).
file_filter: ContextVar[Callable[[Driver], Driver] | None] = ContextVar(
    "qcow_file_filter", default=None
)


def probe(header: bytes) -> int:
    """100 on the QCOW magic and version 1 (QEMU qcow_probe).

    Versions 2 and 3 (qcow2) are claimed too, with a lower score, so that opening one
    fails with a hint instead of serving the qcow2 file as a raw disk.
    """
    if len(header) < 8 or int.from_bytes(header[:4], "big") != QCOW_MAGIC:
        return 0
    return 100 if int.from_bytes(header[4:8], "big") == QCOW_VERSION else 50


def resolve_backing(image_path: str, name: str) -> str:
    """A backing name as stored is relative to the image's directory (as in QEMU).

    Joined to the image path as given, not made absolute: QEMU's path_combine does the
    same, so ``full-backing-filename`` in ``tapnbd info`` matches ``qemu-img info``.
    """
    if os.path.isabs(name) or name.startswith("rbd:") or "://" in name:
        return name
    return os.path.join(os.path.dirname(image_path), name)


async def open_qcow(path: str, read_only: bool) -> Driver:
    """Open a QCOW v1 image and its backing chain (backing files read-only)."""
    chain = _chain.get()
    real = os.path.realpath(path)
    if real in chain:
        raise InvalidImageError(f"{path}: backing file loop ({' -> '.join((*chain, real))})")
    if len(chain) >= MAX_CHAIN:
        raise InvalidImageError(f"{path}: backing chain deeper than {MAX_CHAIN} images")
    from formats import open_backing, open_rules

    rules = open_rules()
    child: Driver = await RawDriver.open(
        path,
        read_only=read_only,
        exclusive=not read_only and not rules.share,
        block_devices=rules.block_devices,
    )
    wrap = file_filter.get()
    if wrap is not None:
        child = wrap(child)
    backing: Driver | None = None
    token = _chain.set((*chain, real))
    try:
        meta = await read_meta(child)
        if meta.backing_name:
            bpath = resolve_backing(path, meta.backing_name)
            try:
                # QCOW v1 records no backing format: open_backing applies the rules.
                backing = await open_backing(meta.backing_name, bpath)
            except ImageError as e:
                raise type(e)(f"backing file {meta.backing_name!r}: {e}") from None
        driver = QcowDriver(child, backing, meta, read_only=read_only, path=path)
        await driver.prepare()
        return driver
    except BaseException as e:
        if backing is not None:
            await backing.close()
        await child.close()
        if isinstance(e, ImageError) and not str(e).startswith(path):
            raise type(e)(f"{path}: {e}") from None
        raise
    finally:
        _chain.reset(token)


FORMAT = Format("qcow", probe, open_qcow)
