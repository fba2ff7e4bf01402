"""``tapnbd check`` for VHD: the metadata checks of an open, then the space between.

An image that would be refused at open (bad checksum, BAT past the end, overlapping
blocks, a locator out of bounds) is a corruption, named as the open names it. Then: the
footer's copy must match the footer, and file space that no block or metadata uses,
a crash's leftover between a block reserved and its BAT entry made durable, is counted
as leaked blocks. Exit codes as ``qemu-img check``: 0, 1, 2 corrupt, 3 leaks only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from formats.engine.checks import CheckResult
from formats.raw import RawDriver
from formats.vhd.layout import BAT_UNUSED, FOOTER_SIZE, HEADER_SIZE, SECTOR, bitmap_bytes
from formats.vhd.meta import read_meta
from tapnbd.errors import InvalidImageError, UnsupportedImageError


@dataclass
class VhdCheckResult(CheckResult):
    """CheckResult, reported as vhd (clusters are blocks)."""

    def to_json(self) -> dict[str, object]:
        out = super().to_json()
        out["format"] = "vhd"
        del out["cksum"]
        del out["compressed-clusters"]
        return out


async def check_vhd(path: str, *, share: bool = False) -> VhdCheckResult:
    """Check ``path`` read-only (as a reader: formats.locks)."""
    res = VhdCheckResult(filename=path)
    child = RawDriver(path, read_only=True, lock=True, share=share)
    try:
        try:
            meta = await read_meta(child, path)
        except (InvalidImageError, UnsupportedImageError) as e:
            res.corrupt(str(e))
            return res
        if meta.footer_from_copy:
            # What a crash between a block's allocation and the next flush leaves: the
            # copy has the same contents, and a writable open puts the footer back.
            res.notes.append(
                "the footer at the end of the file is missing (copy at 0 used); "
                "a writable open rewrites it"
            )
        h = meta.header
        res.image_end_offset = meta.footer_offset + FOOTER_SIZE
        if h is None:
            return res
        copy = bytes(await child.pread(0, FOOTER_SIZE))
        if not meta.footer_from_copy and copy != meta.footer.build():
            res.corrupt("the footer's copy at offset 0 differs from the footer")
        res.cluster_size = h.block_size
        span = bitmap_bytes(h.block_size) + h.block_size
        used = [e * SECTOR for e in meta.bat if e != BAT_UNUSED]
        res.allocated_clusters = len(used)
        # Everything after the metadata up to the footer should be blocks.
        meta_end = max(
            h.table_offset + (len(meta.bat) * 4 + SECTOR - 1) // SECTOR * SECTOR,
            FOOTER_SIZE + HEADER_SIZE,
            *(loc.offset + loc.length for loc in h.locators if loc.code),
        )
        if meta.batmap_header is not None:
            bh = meta.batmap_header
            meta_end = max(meta_end, bh.offset + bh.sectors * SECTOR)
        meta_end = (meta_end + SECTOR - 1) // SECTOR * SECTOR
        # Gaps between blocks: small ones are alignment padding, a gap that could hold a
        # block is space reserved for one that a crash left unnamed.
        pos, free = meta_end, 0
        for off in [*sorted(used), meta.footer_offset]:
            if off - pos >= span:
                res.leaked_clusters += (off - pos) // span
                free += off - pos
            pos = max(pos, off + span)
        if free:
            res.notes.append(f"{free} bytes of the file are used by no block")
        if meta.batmap is not None:
            res.notes.append("blktap2 batmap present and valid")
    except OSError as e:
        res.check_errors.append(f"{path}: {os.strerror(e.errno or 5)}")
    finally:
        await child.close()
    return res
