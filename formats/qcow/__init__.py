"""QCOW version 1, with blktap's Xen extension header (see ../shared/spec/blktap.md).

``FORMAT`` registers the format: ``probe`` scores an image's first bytes and
``open_qcow`` opens one (and, through ``formats.open_image``, its backing chain).
"""

from __future__ import annotations

import os

from formats import Format
from formats.engine.image import open_backing_file, open_format
from formats.engine.opening import MAX_CHAIN, file_filter
from formats.qcow.driver import QcowDriver
from formats.qcow.layout import QCOW_MAGIC, QCOW_VERSION
from formats.qcow.meta import QcowMeta, read_meta
from tapnbd.driver import Driver

__all__ = [
    "FORMAT",
    "MAX_CHAIN",
    "QcowDriver",
    "file_filter",
    "open_qcow",
    "probe",
    "resolve_backing",
]

# MAX_CHAIN and file_filter live in formats.engine.opening (one chain for every format);
# they are named here too because the filters and the tests import them from here.


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

    async def backing_of(meta: QcowMeta) -> Driver | None:
        # QCOW v1 records no backing format: open_backing applies the rules.
        name = meta.backing_name
        return await open_backing_file(path, name) if name else None

    return await open_format(path, read_only, read_meta, backing_of, QcowDriver)


FORMAT = Format("qcow", probe, open_qcow)
