"""QCOW version 1, with blktap's Xen extension header (see ../shared/spec/blktap.md).

``FORMAT`` registers the format: ``probe`` scores an image's first bytes and
``open_qcow`` opens one (and, through ``formats.open_image``, its backing chain).
"""

from __future__ import annotations

from formats import Format
from formats.engine.image import open_backing_file, open_format
from formats.engine.opening import MAX_CHAIN, file_filter, resolve_backing
from formats.probes import probe_qcow as probe
from formats.qcow.driver import QcowDriver
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

# MAX_CHAIN, file_filter and resolve_backing live in formats.engine.opening (one chain
# for every format), and probe in formats.probes (probing imports no driver); they are
# named here too because the filters and the tests import them from here.


async def open_qcow(path: str, read_only: bool) -> Driver:
    """Open a QCOW v1 image and its backing chain (backing files read-only)."""

    async def backing_of(meta: QcowMeta) -> Driver | None:
        # QCOW v1 records no backing format: open_backing applies the rules.
        name = meta.backing_name
        return await open_backing_file(path, name) if name else None

    return await open_format(path, read_only, read_meta, backing_of, QcowDriver)


FORMAT = Format("qcow", probe, open_qcow)
