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
from dataclasses import replace

from formats import Format
from formats.engine.image import open_format
from formats.engine.opening import resolve_backing
from formats.probes import never
from formats.probes import probe_vhd as probe
from formats.vhd.driver import VhdDriver
from formats.vhd.layout import DiskType
from formats.vhd.meta import VhdMeta, read_meta
from tapnbd.driver import Driver
from tapnbd.errors import ImageError, InvalidImageError

__all__ = ["FORMAT", "VPC", "VhdDriver", "open_vhd", "probe"]


async def _open_parent(path: str, driver_meta_paths: list[tuple[str, str]]) -> Driver | None:
    """The first parent locator that names an existing file, opened as VHD.

    A locator naming something else than a local file (an NBD URI, ``rbd:``, ``ram:``)
    goes to ``open_backing`` as it is, never looked for as a file: the trust rules
    refuse it there, with a message, rather than leave it to what happens to exist."""
    from formats import is_local_path, open_backing, open_rules

    if open_rules().no_backing:
        return None

    tried: list[str] = []
    for platform, name in driver_meta_paths:
        ppath = resolve_backing(path, name)
        if is_local_path(ppath) and not os.path.lexists(ppath):
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

    async def meta_of(child: Driver) -> VhdMeta:
        return await read_meta(child, path)

    async def parent_of(meta: VhdMeta) -> Driver | None:
        if meta.disk_type != DiskType.DIFFERENCING:
            return None
        assert meta.header is not None
        parent = await _open_parent(path, meta.parent_paths)
        if parent is None:
            return None  # opened alone (OpenRules.no_backing)
        try:
            if not isinstance(parent, VhdDriver):
                raise InvalidImageError(f"parent {meta.header.parent_name!r} is not a VHD")
            puuid = parent.meta.footer.uuid
            if puuid != meta.header.parent_uuid:
                raise InvalidImageError(
                    f"dynamic header parent unique id {meta.header.parent_uuid.hex()} "
                    f"does not match the parent's unique id {puuid.hex()}"
                )
        except BaseException:
            await parent.close()
            raise
        return parent

    return await open_format(
        path,
        read_only,
        meta_of,
        parent_of,
        VhdDriver,
        link="parent locator",
        chain_name="parent chain",
    )


FORMAT = Format("vhd", probe, open_vhd)
#: qemu's name for VHD: accepted by --format, never the probe's answer.
VPC = replace(FORMAT, name="vpc", probe=never)
