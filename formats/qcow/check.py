"""``tapnbd check``: a consistency check of a QCOW v1 image, read-only.

Every structure is mapped onto the file cluster by cluster: header and L1 table, L2
tables, data clusters, compressed data (byte ranges, which may share clusters with each
other but with nothing else). Reported: pointers past the end of the file or into the
metadata, clusters used twice, unreferenced (leaked) clusters, and the Xen extension's
checksum. Exit codes follow ``qemu-img check`` where they mean the same: 0 clean,
1 the check could not complete, 2 corruption, 3 leaked clusters only; and 4 when the
only finding is a checksum mismatch (the image works, on the safe path, spec §2.2).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field

from formats.qcow.geometry import compressed_location, round_up
from formats.qcow.layout import QCOW_OFLAG_COMPRESSED
from formats.qcow.meta import be_array, l1_problems, read_meta
from formats.raw import RawDriver
from tapnbd.errors import ImageError, UnsupportedImageError

#: Findings listed in full up to this many; the rest are counted.
MAX_LISTED = 20


@dataclass
class CheckResult:
    """What ``check_qcow`` found."""

    filename: str
    corruptions: list[str] = field(default_factory=list)
    corruption_count: int = 0
    leaked_clusters: int = 0
    allocated_clusters: int = 0
    compressed_clusters: int = 0
    cluster_size: int = 0
    image_end_offset: int = 0
    #: "ok", "mismatch", or None when the image has no honoured extension.
    cksum: str | None = None
    #: The checksum guards the fast path of an allocation-optimised image.
    cksum_matters: bool = False
    notes: list[str] = field(default_factory=list)
    check_errors: list[str] = field(default_factory=list)

    def corrupt(self, message: str) -> None:
        self.corruption_count += 1
        if len(self.corruptions) < MAX_LISTED:
            self.corruptions.append(message)

    @property
    def exit_code(self) -> int:
        if self.check_errors:
            return 1
        if self.corruption_count:
            return 2
        if self.leaked_clusters:
            return 3
        if self.cksum == "mismatch" and self.cksum_matters:
            return 4
        return 0

    def to_json(self) -> dict[str, object]:
        """Field names as in ``qemu-img check --output=json`` where they exist."""
        return {
            "filename": self.filename,
            "format": "qcow",
            "check-errors": len(self.check_errors),
            "corruptions": self.corruption_count,
            "leaks": self.leaked_clusters,
            "allocated-clusters": self.allocated_clusters,
            "compressed-clusters": self.compressed_clusters,
            "cluster-size": self.cluster_size,
            "image-end-offset": self.image_end_offset,
            "cksum": self.cksum,
            "messages": self.check_errors + self.corruptions + self.notes,
            "exit-code": self.exit_code,
        }


async def check_qcow(path: str) -> CheckResult:
    """Check the image at ``path`` without changing it."""
    res = CheckResult(path)
    try:
        child = RawDriver(path, read_only=True)
    except ImageError as e:
        res.check_errors.append(str(e))
        return res
    try:
        await _check(child, res)
    except OSError as e:
        res.check_errors.append(f"read error: {e.strerror or e}")
    finally:
        await child.close()
    return res


async def _check(child: RawDriver, res: CheckResult) -> None:
    try:
        meta = await read_meta(child)
    except UnsupportedImageError as err:  # qcow2, encryption: not corrupt, just not ours
        res.check_errors.append(str(err))
        return
    except ImageError as err:
        res.corrupt(str(err))
        return
    g, fsize = meta.geometry, meta.file_size
    cs = res.cluster_size = g.cluster_size
    if meta.backing_name is not None:
        from formats.qcow import resolve_backing

        # Opening the image opens its backing file; one that is not there fails it.
        if not os.path.exists(resolve_backing(res.filename, meta.backing_name)):
            res.check_errors.append(f"backing file {meta.backing_name[:256]!r} does not exist")
    res.image_end_offset = fsize
    if meta.ext_applies:
        res.cksum = "ok" if meta.cksum_ok else "mismatch"
        res.cksum_matters = meta.optimised and not meta.header.backing_file_offset
        if meta.cksum_ok is False:
            res.notes.append(
                "the L1 checksum in the Xen extension does not match the L1 table "
                + (
                    "(not closed cleanly?): tapdisk would use the safe path"
                    if res.cksum_matters
                    else "(harmless: the image is not allocation-optimised)"
                )
            )
    if meta.l1_native:
        res.notes.append(
            "old tapdisk image: the L1 table is little-endian; a read-write open converts it"
        )
    for p in l1_problems(meta):
        res.corrupt(p)

    end = round_up(fsize, cs)
    nclusters = end // cs
    # 1: normal use (metadata, tables, data clusters); 2: compressed data.
    refs = bytearray(nclusters)
    # The header, extension, backing name and L1 table are one region.
    for c in range(0, (meta.data_start - 1) // cs + 1):
        refs[c] = 1

    def mark(start: int, length: int, what: str) -> None:
        for c in range(start // cs, (start + length - 1) // cs + 1):
            if refs[c]:
                res.corrupt(f"{what}: cluster at 0x{c * cs:x} is also used by something else")
            refs[c] = 1

    bad_l1 = {
        i for i, e in enumerate(meta.l1) if e and (e < meta.data_start or e + g.l2_bytes > fsize)
    }
    compressed: list[tuple[int, int, str]] = []
    for i, l2off in enumerate(meta.l1):
        if not l2off or i in bad_l1:
            continue
        mark(l2off, g.l2_bytes, f"L2 table of L1 entry {i}")
        table = be_array(await child.pread(l2off, g.l2_bytes))
        for j, e in enumerate(table):
            if not e:
                continue
            res.allocated_clusters += 1
            where = f"L2 table at 0x{l2off:x} entry {j}"
            if e & QCOW_OFLAG_COMPRESSED:
                res.compressed_clusters += 1
                off, n = compressed_location(e, g)
                if off < meta.data_start:
                    res.corrupt(f"{where}: compressed data at 0x{off:x} lies in the metadata")
                elif n == 0 or off + n > fsize:
                    res.corrupt(
                        f"{where}: compressed data at 0x{off:x} (+{n}) runs past the end of the file"
                    )
                else:
                    compressed.append((off, off + n, where))
            elif e & 511:
                res.corrupt(f"{where}: cluster offset 0x{e:x} is not sector-aligned")
            elif e < meta.data_start:
                res.corrupt(f"{where}: cluster offset 0x{e:x} lies in the metadata")
            elif e + cs > end:
                res.corrupt(f"{where}: cluster offset 0x{e:x} lies past the end of the file")
            else:
                mark(e, cs, where)

    compressed.sort()
    prev_end, prev_where = 0, ""
    for start, stop, where in compressed:
        if start < prev_end:
            res.corrupt(f"{where}: compressed data overlaps that of {prev_where}")
        prev_end, prev_where = max(prev_end, stop), where
        # Inflated as the driver does: a bad entry (a normal cluster's offset with bit 63
        # set, say) points at bytes that are no deflate stream, and reads fail with EIO.
        try:
            data = zlib.decompressobj(-12).decompress(
                bytes(await child.pread(start, stop - start)), cs
            )
        except zlib.error:
            data = b""
        if len(data) != cs:
            res.corrupt(f"{where}: compressed data at 0x{start:x} does not inflate to a cluster")
        for c in range(start // cs, (stop - 1) // cs + 1):
            if refs[c] == 1:
                res.corrupt(f"{where}: compressed data overlaps a cluster in normal use")
            refs[c] = 2

    # Leaks: unreferenced clusters past the page-rounded fixed metadata (qcow-create
    # pads the L1 table to a page; that padding is not a leak).
    first = round_up(round_up(meta.data_start, 4096), cs) // cs
    res.leaked_clusters = refs.count(0, first) if first < nclusters else 0
    if res.leaked_clusters:
        res.notes.append(
            f"{res.leaked_clusters} clusters are not referenced by any table (leaked, e.g. "
            "by a crash during allocation); they waste space but do no harm"
        )
