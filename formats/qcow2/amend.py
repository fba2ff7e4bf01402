"""``tapnbd amend``: change a qcow2 image's version, refcount width or lazy refcounts in
place (qemu-img amend).

What changes, and how it stays crash-safe:

- ``lazy_refcounts`` (version 3) is one bit of ``compatible_features``: one 8-byte write.
- ``refcount_bits`` (version 3): new refcount structures of the new width are counted
  from every reference and written past the end of the file, then the header switches
  to them with one sector write (``formats.qcow2.rebuild``), done first when other keys
  are given too.
- ``compat`` (0.10 is version 2, 1.1 version 3) moves everything after the header by 40
  bytes. The new header, its extensions and the backing name are written as one
  512-byte sector, the unit a disk writes whole, so a power cut leaves the old header or
  the new one; a layout that would not fit in one sector is refused (convert instead).
  Version 3's feature name table is optional, and is left out to make room.

A downgrade is refused where version 2 cannot say what the image holds: zero clusters
(qemu writes them out), a refcount width other than 16 bits, any feature bit, or a
dirty image. An upgrade is refused if a snapshot lacks the 16 bytes of extra data that
version 3 requires. Everything else (size, the backing file) is refused by name, with
the command that does it. The image's lock is taken first.

References: QEMU docs/interop/qcow2.txt; block/qcow2.c ``qcow2_amend_options``.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING

from formats.engine.tables import be_array
from formats.pacing import Pace
from formats.qcow2.create import Qcow2Options, parse_bool, parse_compat
from formats.qcow2.layout import (
    MAX_REFCOUNT_ORDER,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_ZERO,
    V2_HEADER_SIZE,
    V3_HEADER_SIZE_COMPRESSION,
    Compatible,
)
from formats.qcow2.meta import Qcow2Meta
from formats.qcow2.offline import clear_tail, header_sector, rewritable
from formats.qcow2.snapshot import snapshot_meta
from tapnbd.errors import ImageError

if TYPE_CHECKING:
    from tapnbd.driver import Driver

#: The byte offset of compatible_features (version 3).
COMPATIBLE_OFFSET = 80
#: Keys amend changes, and what to use for the ones qemu-img amend takes but we don't.
AMEND_KEYS = ("compat", "lazy_refcounts", "refcount_bits")
_ELSEWHERE = {
    "size": "resize",
    "backing_file": "rebase -u",
    "backing_fmt": "rebase -u",
    "cluster_size": "convert -O qcow2 -o cluster_size=N",
}


async def amend_qcow2(
    path: str, opts: dict[str, str], *, share: bool = False, pace: Pace | None = None
) -> list[str]:
    """Apply ``opts`` (qemu-img amend's -o keys) to the qcow2 image at ``path``.

    ``pace`` (-p) begins with the image file's size and advances by a share of it as
    each step ends (the refcount width, then the header): no step reports within.
    Returns what changed, in words (empty: the image already was so).
    """
    for key in opts:
        if key in _ELSEWHERE:
            raise ImageError(f"amend -o {key} is not supported here: use tapnbd {_ELSEWHERE[key]}")
        if key not in AMEND_KEYS:
            raise ImageError(
                f"amend -o {key}: unknown option (qcow2 takes {', '.join(AMEND_KEYS)})"
            )
    changed: list[str] = []
    pace = pace or Pace()
    total = os.path.getsize(path)
    pace.begin(total)
    if "refcount_bits" in opts:
        bits = Qcow2Options.from_keys({"refcount_bits": opts["refcount_bits"]}).refcount_bits
        order = bits.bit_length() - 1
        if bits != 1 << order or order > MAX_REFCOUNT_ORDER:
            raise ImageError(f"-o refcount_bits={bits}: a power of two from 1 to 64")
        if bits != 16 and parse_compat(opts.get("compat", "1.1")) != "1.1":
            raise ImageError("refcount_bits other than 16 needs compat 1.1 (version 3)")
        async with rewritable(path, share=share) as (child, meta):
            was = 1 << meta.header.refcount_order
            if bits != was:
                if meta.header.version < 3:
                    raise ImageError("refcount_bits other than 16 needs compat 1.1 (version 3)")
                await _change_refcount_order(child, meta, order, path)
                changed.append(f"refcount bits {was} -> {bits}")
        pace.advance(total // 2)
    async with rewritable(path, share=share) as (child, meta):
        h = meta.header
        version = h.version
        if "compat" in opts:
            version = 3 if parse_compat(opts["compat"]) == "1.1" else 2
        lazy = bool(h.compatible_features & Compatible.LAZY_REFCOUNTS)
        if "lazy_refcounts" in opts:
            lazy = parse_bool("lazy_refcounts", opts["lazy_refcounts"])
        if lazy and version == 2:
            raise ImageError("lazy_refcounts needs compat 1.1 (version 3)")
        features = (h.compatible_features & ~Compatible.LAZY_REFCOUNTS) | (
            Compatible.LAZY_REFCOUNTS if lazy else 0
        )
        if version != h.version:
            await _change_version(child, meta, version, features, path)
            changed.append(f"version {h.version} -> {version}")
        elif features != h.compatible_features:
            await child.pwrite(COMPATIBLE_OFFSET, features.to_bytes(8, "big"))
            await child.flush()
        if bool(features & Compatible.LAZY_REFCOUNTS) != bool(
            h.compatible_features & Compatible.LAZY_REFCOUNTS
        ):
            changed.append(f"lazy refcounts {'on' if lazy else 'off'}")
        pace.advance(total - total // 2 if "refcount_bits" in opts else total)
        return changed


async def _change_refcount_order(child: Driver, meta: Qcow2Meta, order: int, path: str) -> None:
    """New refcount structures of the new width, counted from every reference, and a
    header switched to them in one sector (``formats.qcow2.rebuild``): qemu-img amend
    rewrites them in place, this writes them beside the old ones. A width too narrow
    for the image's sharing is refused before any write."""
    from array import array

    from formats.qcow2.rebuild import NewState, kept_snapshots, switch

    state = NewState(array("Q", meta.l1), meta.header.size, await kept_snapshots(child, meta))
    state.refcount_order = order
    await switch(child, meta, state, path)


async def _change_version(
    child: Driver, meta: Qcow2Meta, version: int, features: int, path: str
) -> None:
    h, cs = meta.header, meta.cluster_size
    if version == 2:
        await _refuse_downgrade(child, meta, path)
        header = replace(
            h,
            version=2,
            incompatible_features=0,
            compatible_features=0,
            autoclear_features=0,
            header_length=V2_HEADER_SIZE,
        )
    else:
        for s in meta.snapshots:
            if len(s.extra) < 16:
                raise ImageError(
                    f"{path}: snapshot {s.name!r} has {len(s.extra)} bytes of extra data, and "
                    "version 3 needs 16; convert the image instead"
                )
        header = replace(
            h,
            version=3,
            incompatible_features=0,
            compatible_features=features,
            autoclear_features=0,
            refcount_order=4,
            header_length=V3_HEADER_SIZE_COMPRESSION,
            compression_type=0,
        )
    head = bytes(await child.pread(0, min(cs, meta.file_size)))
    await child.pwrite(0, header_sector(path, meta, head, header))
    await child.flush()
    await clear_tail(child, meta, head)


async def _refuse_downgrade(child: Driver, meta: Qcow2Meta, path: str) -> None:
    """Refuse, by name, what version 2 cannot express."""
    h, cs = meta.header, meta.cluster_size
    if h.refcount_order != 4:
        raise ImageError(
            f"{path}: refcount_bits {1 << h.refcount_order}: version 2 has 16-bit refcounts only"
        )
    if h.crypt_method == 2:
        raise ImageError(f"{path}: crypt_method 2 (LUKS) needs version 3")
    if h.incompatible_features or h.autoclear_features:
        raise ImageError(
            f"{path}: incompatible_features 0x{h.incompatible_features:x}, autoclear_features "
            f"0x{h.autoclear_features:x}: version 2 has no feature bits"
        )
    l1s = [meta.l1]
    for snap in meta.snapshots:  # each table checked as the active one is (hostile input)
        l1s.append((await snapshot_meta(child, meta, snap)).l1)
    seen: set[int] = set()
    for l1 in l1s:
        for e in l1:
            l2off = e & OFFSET_MASK
            if not l2off or l2off in seen:
                continue
            seen.add(l2off)
            for le in be_array(await child.pread(l2off, cs)):
                if le & OFLAG_ZERO and not le & OFLAG_COMPRESSED:
                    raise ImageError(
                        f"{path}: the image has zero clusters, which version 2 cannot "
                        "express; convert -O qcow2 -o compat=0.10 writes them out"
                    )
