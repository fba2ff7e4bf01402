"""qcow2, versions 2 (compat 0.10) and 3 (compat 1.1).

``FORMAT`` registers the format: ``probe`` scores an image's first bytes,
``open_qcow2`` opens one and, through ``formats.open_image``, its backing chain, and
``open_qcow2_snapshot`` opens one at an internal snapshot, read-only.
"""

from __future__ import annotations

from formats import Format
from formats.engine.described import DescribedOnly
from formats.engine.image import open_backing_file, open_format
from formats.probes import probe_qcow2 as probe
from formats.qcow2.driver import Qcow2Driver
from formats.qcow2.meta import Qcow2Meta, check_features, read_meta
from formats.qcow2.snapshot import at_snapshot
from tapnbd.driver import Driver

__all__ = ["FORMAT", "Qcow2Driver", "open_qcow2", "open_qcow2_snapshot", "probe"]


async def open_qcow2(
    path: str, read_only: bool, snapshot: str | None = None, *, encrypted_ok: bool = False
) -> Driver:
    """Open a qcow2 image and its backing chain (backing files read-only).

    With ``snapshot`` (an id or a name), the image is seen as it was when that internal
    snapshot was taken (``open_qcow2_snapshot``: only ever read-only). ``encrypted_ok``
    is for ``open_qcow2_encrypted`` alone: a driver over ciphertext.
    """
    if snapshot is not None and not read_only:
        raise ValueError("an internal snapshot is only ever opened read-only")

    async def checked_meta(child: Driver) -> Qcow2Meta:
        meta = await read_meta(child)
        check_features(meta, read_only, encrypted_ok=encrypted_ok)
        return await at_snapshot(child, meta, snapshot, path)

    async def backing_of(meta: Qcow2Meta) -> Driver | None:
        name = meta.backing_name
        # A backing format named in the header is used as it is, never re-probed.
        return await open_backing_file(path, name, meta.backing_format) if name else None

    return await open_format(path, read_only, checked_meta, backing_of, Qcow2Driver)


async def open_qcow2_snapshot(path: str, snapshot: str) -> Driver:
    """Open a qcow2 image read-only, as it was at the internal snapshot ``snapshot``."""
    return await open_qcow2(path, True, snapshot)


async def open_qcow2_encrypted(path: str) -> Driver:
    """An encrypted image, for ``info``: its metadata and LUKS header, never its data."""
    driver = await open_qcow2(path, True, encrypted_ok=True)
    assert isinstance(driver, Qcow2Driver)
    try:
        await driver.read_encryption()
    except BaseException:
        await driver.close()
        raise
    return DescribedOnly(driver)


FORMAT = Format(
    "qcow2",
    probe,
    open_qcow2,
    open_snapshot=open_qcow2_snapshot,
    open_encrypted=open_qcow2_encrypted,
)
