"""QCOW version 1, with blktap's Xen extension header (see ../shared/spec/blktap.md).

``FORMAT`` registers the format: ``probe`` scores an image's first bytes and
``open_qcow`` opens one (and, through ``formats.open_image``, its backing chain).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from formats import Format
from formats.engine.opening import MAX_CHAIN, file_filter, resolve_backing
from formats.probes import probe_qcow as probe

if TYPE_CHECKING:
    from formats.qcow.driver import QcowDriver
    from formats.qcow.meta import QcowMeta
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


def __getattr__(name: str) -> Any:
    # The driver is imported by the first open, not with the package: ``convert`` and
    # ``create`` live here, and a copy into a raw or qcow2 image has no use for it.
    if name == "QcowDriver":
        from formats.qcow.driver import QcowDriver

        return QcowDriver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


async def open_qcow(path: str, read_only: bool, *, encrypted_ok: bool = False) -> Driver:
    """Open a QCOW v1 image and its backing chain (backing files read-only).

    ``encrypted_ok`` is for ``open_qcow_encrypted`` alone: a driver over ciphertext.
    """
    from formats.engine.image import open_backing_file, open_format
    from formats.qcow.driver import QcowDriver
    from formats.qcow.meta import read_meta

    async def checked_meta(child: Driver) -> QcowMeta:
        return await read_meta(child, encrypted_ok=encrypted_ok)

    async def backing_of(meta: QcowMeta) -> Driver | None:
        # QCOW v1 records no backing format: open_backing applies the rules.
        name = meta.backing_name
        return await open_backing_file(path, name) if name else None

    return await open_format(path, read_only, checked_meta, backing_of, QcowDriver)


async def open_qcow_encrypted(path: str) -> Driver:
    """An AES-encrypted image, for ``info``: its metadata, never its data."""
    from formats.engine.described import DescribedOnly

    return DescribedOnly(await open_qcow(path, True, encrypted_ok=True))


FORMAT = Format("qcow", probe, open_qcow, open_encrypted=open_qcow_encrypted)
