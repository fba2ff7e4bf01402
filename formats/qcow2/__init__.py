"""qcow2, versions 2 (compat 0.10) and 3 (compat 1.1).

``FORMAT`` registers the format: ``probe`` scores an image's first bytes and
``open_qcow2`` opens one and, through ``formats.open_image``, its backing chain.
"""

from __future__ import annotations

from formats import Format
from formats.engine.image import open_backing_file, open_format
from formats.qcow2.driver import Qcow2Driver
from formats.qcow2.layout import QCOW2_MAGIC
from formats.qcow2.meta import Qcow2Meta, check_features, read_meta
from tapnbd.driver import Driver

__all__ = ["FORMAT", "Qcow2Driver", "open_qcow2", "probe"]


def probe(header: bytes) -> int:
    """100 on the magic ``QFI\\xfb`` and version 2 or 3 (QEMU qcow2_probe)."""
    if len(header) < 8 or int.from_bytes(header[:4], "big") != QCOW2_MAGIC:
        return 0
    return 100 if int.from_bytes(header[4:8], "big") in (2, 3) else 0


async def open_qcow2(path: str, read_only: bool) -> Driver:
    """Open a qcow2 image and its backing chain (backing files read-only)."""

    async def checked_meta(child: Driver) -> Qcow2Meta:
        meta = await read_meta(child)
        check_features(meta, read_only)
        return meta

    async def backing_of(meta: Qcow2Meta) -> Driver | None:
        name = meta.backing_name
        # A backing format named in the header is used as it is, never re-probed.
        return await open_backing_file(path, name, meta.backing_format) if name else None

    return await open_format(path, read_only, checked_meta, backing_of, Qcow2Driver)


FORMAT = Format("qcow2", probe, open_qcow2)
