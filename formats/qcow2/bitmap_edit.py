"""``tapnbd bitmap``: add, remove, clear, enable, disable and merge a qcow2 image's
persistent dirty bitmaps, in an image no one has open (qemu-img bitmap).

The operations apply in the order given to one bitmap, in memory; the result is written
as a new state and switched to with one sector (``formats.qcow2.rebuild``), so a power
cut leaves the bitmaps as they were or as asked. A bitmap whose bits change gets new
clusters and a new table; the others stay where they are.

qemu's rules: a granularity is a power of two from 512 bytes to 2 GiB, and qemu's
default is the cluster size (at least 4 KiB); a bitmap left ``in-use`` (its writer
crashed) holds no meaning and may only be removed; a merge takes a bitmap of the same
image, or of another image of the same size (``-b``), and sets every granule of the
target that the source's set bits touch.

References: QEMU docs/interop/qcow2.txt "Bitmaps extension"; qemu-img.c ``img_bitmap``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from formats.qcow2.bitmaps import (
    FLAG_AUTO,
    MAX_BITMAPS,
    MAX_GRANULARITY_BITS,
    MAX_NAME,
    MAX_PHYS,
    MIN_GRANULARITY_BITS,
    Bitmap,
    bitmap_bytes,
    read_bits,
)
from formats.qcow2.meta import read_meta
from formats.qcow2.offline import rewritable
from formats.qcow2.rebuild import NewBitmap, NewState, kept_bitmaps, kept_snapshots, switch
from formats.raw import RawDriver
from tapnbd.errors import ImageError

OPS = ("add", "remove", "clear", "enable", "disable", "merge")


@dataclass(frozen=True, slots=True)
class Op:
    """One operation: its name, and for ``merge`` the source bitmap (``source_file``:
    another qcow2 image, else this one)."""

    name: str
    source: str = ""
    source_file: str | None = None


def default_granularity(cluster_size: int) -> int:
    """qemu's ``bdrv_get_default_bitmap_granularity`` for an image with clusters."""
    return max(4096, cluster_size)


async def edit_bitmap(
    path: str,
    name: str,
    ops: list[Op],
    *,
    granularity: int | None = None,
    share: bool = False,
) -> None:
    """Apply ``ops`` in order to the bitmap ``name`` of the qcow2 image at ``path``."""
    if not ops:
        raise ImageError(
            "bitmap: give at least one of --add, --remove, --clear, --enable, --disable, --merge"
        )
    if granularity is not None and not any(op.name == "add" for op in ops):
        raise ImageError("bitmap: -g (granularity) is only for --add")
    raw = name.encode("utf-8", "surrogateescape")
    if not 1 <= len(raw) <= MAX_NAME:
        raise ImageError(f"bitmap: a name is 1 to {MAX_NAME} bytes")
    async with rewritable(path, share=share) as (child, meta):
        if meta.header.version < 3:
            raise ImageError(f"{path}: persistent bitmaps need compat 1.1 (version 3)")
        cs, size = meta.cluster_size, meta.header.size
        bitmaps = {nb.bitmap.name: nb for nb in await kept_bitmaps(child, meta)}

        async def bits_of(nb: NewBitmap) -> bytearray:
            if nb.bits is not None:
                return bytearray(nb.bits)
            return await read_bits(child, nb.bitmap, size, cs, meta.file_size, nb.table)

        def usable(what: str) -> NewBitmap:
            nb = bitmaps.get(what)
            if nb is None:
                raise ImageError(f"{path}: no bitmap named {what!r}")
            if nb.bitmap.in_use:
                raise ImageError(
                    f"{path}: bitmap {what!r} is inconsistent (left in use by a writer that "
                    "did not close it) and cannot be used; remove it"
                )
            return nb

        for op in ops:
            if op.name == "add":
                if name in bitmaps:
                    raise ImageError(f"{path}: a bitmap named {name!r} already exists")
                if len(bitmaps) >= MAX_BITMAPS:
                    raise ImageError(f"{path}: the image has {MAX_BITMAPS} bitmaps, qemu's limit")
                g = granularity if granularity is not None else default_granularity(cs)
                gbits = g.bit_length() - 1
                if (
                    g <= 0
                    or g & (g - 1)
                    or not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS
                ):
                    raise ImageError(
                        f"bitmap: granularity {g} is not a power of two from "
                        f"{1 << MIN_GRANULARITY_BITS} to {1 << MAX_GRANULARITY_BITS}"
                    )
                if bitmap_bytes(size, gbits) > MAX_PHYS:
                    raise ImageError(
                        f"bitmap: granularity {g} needs more than {MAX_PHYS} bytes of bits for "
                        f"{size} bytes; use a larger granularity"
                    )
                bm = Bitmap(name, FLAG_AUTO, gbits, 0, 0)
                bitmaps[name] = NewBitmap(bm, bits=bytes(bitmap_bytes(size, gbits)))
            elif op.name == "remove":
                if name not in bitmaps:
                    raise ImageError(f"{path}: no bitmap named {name!r}")
                del bitmaps[name]
            elif op.name == "clear":
                nb = usable(name)
                nb.bits, nb.table = bytes(bitmap_bytes(size, nb.bitmap.granularity_bits)), None
            elif op.name in ("enable", "disable"):
                nb = usable(name)
                flags = (
                    nb.bitmap.flags | FLAG_AUTO
                    if op.name == "enable"
                    else nb.bitmap.flags & ~FLAG_AUTO
                )
                nb.bitmap = replace(nb.bitmap, flags=flags)
            elif op.name == "merge":
                nb = usable(name)
                if op.source_file is None:
                    src = usable(op.source)
                    src_bits = await bits_of(src)
                    src_gbits = src.bitmap.granularity_bits
                else:
                    src_bits, src_gbits = await _other_image(op.source_file, op.source, size)
                target = await bits_of(nb)
                merge_bits(target, nb.bitmap.granularity_bits, src_bits, src_gbits, size)
                nb.bits, nb.table = bytes(target), None
            else:
                raise ImageError(f"bitmap: unknown operation {op.name!r}")
        state = NewState(meta.l1, size, await kept_snapshots(child, meta), list(bitmaps.values()))
        await switch(child, meta, state, path)


async def _other_image(path: str, name: str, size: int) -> tuple[bytearray, int]:
    """The bits of bitmap ``name`` of another qcow2 image, which must have ``size``."""
    child = RawDriver(path, read_only=True)
    try:
        meta = await read_meta(child)
        if meta.header.size != size:
            raise ImageError(
                f"{path}: {meta.header.size} bytes, and the target is {size}: bitmaps of "
                "different sizes cannot be merged"
            )
        for bm in meta.bitmaps:
            if bm.name == name:
                if bm.in_use:
                    raise ImageError(f"{path}: bitmap {name!r} is inconsistent and cannot be used")
                bits = await read_bits(child, bm, size, meta.cluster_size, meta.file_size)
                return bits, bm.granularity_bits
        raise ImageError(f"{path}: no bitmap named {name!r}")
    finally:
        await child.close()


def merge_bits(
    target: bytearray, tbits: int, source: bytes | bytearray, sbits: int, size: int
) -> None:
    """Set every granule of ``target`` (granularity ``1 << tbits``) that a set bit of
    ``source`` (``1 << sbits``) touches, over a disk of ``size`` bytes."""
    if tbits == sbits:
        n = len(target)
        merged = int.from_bytes(target, "little") | int.from_bytes(source[:n], "little")
        target[:] = merged.to_bytes(n, "little")
        return
    for i, byte in enumerate(source):
        if not byte:
            continue
        for j in range(8):
            if not byte >> j & 1:
                continue
            start = (i * 8 + j) << sbits
            if start >= size:
                return
            end = min(start + (1 << sbits), size)
            for g in range(start >> tbits, ((end - 1) >> tbits) + 1):
                target[g >> 3] |= 1 << (g & 7)


async def copy_bitmaps(src: str, dst: str, *, skip_broken: bool = False) -> list[str]:
    """Give the qcow2 image ``dst`` (a convert's new target, of the same size) every
    persistent bitmap of the qcow2 image ``src``, bits, granularity and enabled state
    (qemu-img convert --bitmaps). A bitmap left in use is refused, or left out with
    ``skip_broken``. Returns the names copied."""
    child = RawDriver(src, read_only=True)
    try:
        meta = await read_meta(child)
        copied: list[NewBitmap] = []
        for bm in meta.bitmaps:
            if bm.in_use:
                if skip_broken:
                    continue
                raise ImageError(
                    f"{src}: bitmap {bm.name!r} is inconsistent (left in use); give "
                    "--skip-broken-bitmaps to copy the others"
                )
            bits = await read_bits(child, bm, meta.header.size, meta.cluster_size, meta.file_size)
            entry = Bitmap(bm.name, bm.flags & FLAG_AUTO, bm.granularity_bits, 0, 0)
            copied.append(NewBitmap(entry, bits=bytes(bits)))
        size = meta.header.size
    finally:
        await child.close()
    if not copied:
        return []
    async with rewritable(dst) as (out, target):
        if target.header.version < 3:
            raise ImageError(f"{dst}: persistent bitmaps need compat 1.1 (version 3)")
        if target.header.size != size or target.bitmaps:
            raise ImageError(f"{dst}: not a new image of {size} bytes: bitmaps not copied")
        state = NewState(target.l1, size, await kept_snapshots(out, target), copied)
        await switch(out, target, state, dst)
    return [nb.bitmap.name for nb in copied]
