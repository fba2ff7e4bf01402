"""qcow2, versions 2 (compat 0.10) and 3 (compat 1.1).

``FORMAT`` registers the format: ``probe`` scores an image's first bytes and
``open_qcow2`` opens one and, through ``formats.open_image``, its backing chain.
"""

from __future__ import annotations

import os
from contextvars import ContextVar

from formats import Format
from formats.qcow import MAX_CHAIN, file_filter, resolve_backing
from formats.qcow2.driver import Qcow2Driver
from formats.qcow2.layout import QCOW2_MAGIC
from formats.qcow2.meta import check_features, read_meta
from formats.raw import RawDriver
from tapnbd.driver import Driver
from tapnbd.errors import ImageError, InvalidImageError

__all__ = ["FORMAT", "Qcow2Driver", "open_qcow2", "probe"]

#: Real paths of the qcow2 images being opened in this chain, to catch loops.
_chain: ContextVar[tuple[str, ...]] = ContextVar("qcow2_chain", default=())


def probe(header: bytes) -> int:
    """100 on the magic ``QFI\\xfb`` and version 2 or 3 (QEMU qcow2_probe)."""
    if len(header) < 8 or int.from_bytes(header[:4], "big") != QCOW2_MAGIC:
        return 0
    return 100 if int.from_bytes(header[4:8], "big") in (2, 3) else 0


async def open_qcow2(path: str, read_only: bool) -> Driver:
    """Open a qcow2 image and its backing chain (backing files read-only)."""
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
        check_features(meta, read_only)
        if meta.backing_name:
            bpath = resolve_backing(path, meta.backing_name)
            # A backing format named in the header is used as it is, never re-probed.
            try:
                backing = await open_backing(meta.backing_name, bpath, meta.backing_format)
            except ImageError as e:
                raise type(e)(f"backing file {meta.backing_name!r}: {e}") from None
        driver = Qcow2Driver(child, backing, meta, read_only=read_only, path=path)
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


FORMAT = Format("qcow2", probe, open_qcow2)
