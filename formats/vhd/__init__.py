"""VHD (Microsoft's Virtual Hard Disk, blktap2's native format): fixed, dynamic and
differencing disks.

``FORMAT`` registers the format. Probing sees only an image's first bytes: a dynamic or
differencing disk starts with the footer's copy (cookie ``conectix``), but a fixed disk
has its footer only at the end, so a fixed VHD probes as raw (its footer then shows as
the last 512 bytes of the disk). Give ``--format vhd`` to open it as VHD, as QEMU needs
``-f vpc`` for it.
"""

from __future__ import annotations

import os
from contextvars import ContextVar

from formats import Format
from formats.qcow import MAX_CHAIN, file_filter, resolve_backing
from formats.raw import RawDriver
from formats.vhd.driver import VhdDriver
from formats.vhd.layout import FOOTER_COOKIE, DiskType
from formats.vhd.meta import read_meta
from tapnbd.driver import Driver
from tapnbd.errors import ImageError, InvalidImageError

__all__ = ["FORMAT", "VhdDriver", "open_vhd", "probe"]

#: Real paths of the VHDs being opened in this chain, to catch parent locator loops.
_chain: ContextVar[tuple[str, ...]] = ContextVar("vhd_chain", default=())


def probe(header: bytes) -> int:
    """100 on the footer copy's cookie ``conectix`` at offset 0 (QEMU vpc_probe)."""
    return 100 if header[:8] == FOOTER_COOKIE else 0


async def _open_parent(path: str, driver_meta_paths: list[tuple[str, str]]) -> Driver:
    """The first parent locator that names an existing file, opened as VHD."""
    from formats import open_backing

    tried: list[str] = []
    for platform, name in driver_meta_paths:
        ppath = resolve_backing(path, name)
        if not os.path.lexists(ppath):
            tried.append(f"{platform} {name!r}")
            continue
        try:
            return await open_backing(name, ppath, "vhd")
        except ImageError as e:
            raise type(e)(f"parent {name!r} ({platform} locator): {e}") from None
    raise InvalidImageError(
        "parent locator: no parent found (tried " + (", ".join(tried) or "nothing") + ")"
    )


async def open_vhd(path: str, read_only: bool) -> Driver:
    """Open a VHD and, for a differencing disk, its parent chain (parents read-only)."""
    chain = _chain.get()
    real = os.path.realpath(path)
    if real in chain:
        raise InvalidImageError(f"{path}: parent locator loop ({' -> '.join((*chain, real))})")
    if len(chain) >= MAX_CHAIN:
        raise InvalidImageError(f"{path}: parent chain deeper than {MAX_CHAIN} images")
    from formats import open_rules

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
    parent: Driver | None = None
    token = _chain.set((*chain, real))
    try:
        meta = await read_meta(child, path)
        if meta.disk_type == DiskType.DIFFERENCING:
            assert meta.header is not None
            parent = await _open_parent(path, meta.parent_paths)
            if not isinstance(parent, VhdDriver):
                raise InvalidImageError(f"parent {meta.header.parent_name!r} is not a VHD")
            puuid = parent.meta.footer.uuid
            if puuid != meta.header.parent_uuid:
                raise InvalidImageError(
                    f"dynamic header parent unique id {meta.header.parent_uuid.hex()} does "
                    f"not match the parent's unique id {puuid.hex()}"
                )
        driver = VhdDriver(child, parent, meta, read_only=read_only, path=path)
        if not read_only:
            await driver.prepare()
        return driver
    except BaseException as e:
        if parent is not None:
            await parent.close()
        await child.close()
        if isinstance(e, ImageError) and not str(e).startswith(path):
            raise type(e)(f"{path}: {e}") from None
        raise
    finally:
        _chain.reset(token)


FORMAT = Format("vhd", probe, open_vhd)
