"""``tapnbd check``: a consistency check of a QCOW v1 image, read-only.

Every structure is mapped onto the file cluster by cluster: header and L1 table, L2
tables, data clusters, compressed data (byte ranges, which may share clusters with each
other but with nothing else). Reported: pointers past the end of the file or into the
metadata, clusters used twice, unreferenced (leaked) clusters, and the Xen extension's
checksum. Memory follows the metadata found, never the file's length or the header's
claims (issue 11): findings are listed up to 20 and counted past that, the L1 table is
read in pieces over the file's data, and the map of used clusters is made of pages
created on first use. Leaks are counted only where the file holds data (SEEK_DATA), so
a hole is never a leak: it takes no space. Exit codes follow ``qemu-img check`` where they mean the same: 0 clean,
1 the check could not complete, 2 corruption, 3 leaked clusters only; and 4 when the
only finding is a checksum mismatch (the image works, on the safe path, spec §2.2).
"""

from __future__ import annotations

import os
import zlib

from formats.engine.checks import COMPRESSED, MAX_LISTED, NORMAL, CheckResult, ClusterUse
from formats.qcow.geometry import compressed_location, round_up
from formats.qcow.l1 import be_array, data_ranges, tables_with_data
from formats.qcow.layout import QCOW_OFLAG_COMPRESSED
from formats.qcow.meta import CKSUM_MAX_BYTES, read_meta
from formats.raw import RawDriver
from tapnbd.errors import ImageError, UnsupportedImageError

__all__ = ["MAX_LISTED", "CheckResult", "ClusterUse", "check_qcow"]


async def check_qcow(path: str, *, share: bool = False) -> CheckResult:
    """Check the image at ``path`` without changing it (as a reader: formats.locks)."""
    res = CheckResult(path)
    try:
        child = RawDriver(path, read_only=True, lock=True, share=share)
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
        meta = await read_meta(child, res.problems)
    except UnsupportedImageError as err:  # qcow2, encryption: not corrupt, just not ours
        res.check_errors.append(str(err))
        return
    except ImageError as err:
        res.corrupt(str(err))
        return
    g, fsize = meta.geometry, meta.file_size
    cs = res.cluster_size = g.cluster_size
    if meta.backing_name is not None:
        from formats import is_local_path
        from formats.engine.opening import resolve_backing

        where = resolve_backing(res.filename, meta.backing_name)
        if not is_local_path(where):
            # An NBD export or an rbd: image: not a file to look for, and a header's
            # name is not followed to a server here (README, "Security model").
            res.notes.append(f"backing file {meta.backing_name[:256]!r} is not a local file")
        elif not os.path.exists(where):
            # Opening the image opens its backing file; one that is not there fails it.
            res.check_errors.append(f"backing file {meta.backing_name[:256]!r} does not exist")
    res.image_end_offset = fsize
    if meta.ext_applies:
        res.cksum = {True: "ok", False: "mismatch", None: "unchecked"}[meta.cksum_ok]
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
    if meta.ext_applies and meta.cksum_ok is None:
        res.notes.append(
            f"the L1 table is over {CKSUM_MAX_BYTES >> 20} MiB: its checksum is not checked "
            "(an open verifies every extent before it uses the fast path)"
        )
    if meta.l1_native:
        res.notes.append(
            "old tapdisk image: the L1 table is little-endian; a read-write open converts it"
        )

    end = round_up(fsize, cs)
    use = ClusterUse()
    # The header, extension, backing name and L1 table are one region.
    use.fill(0, (meta.data_start - 1) // cs + 1, NORMAL)

    def used_twice(l2off: int, j: int, c: int) -> None:
        res.corrupt(
            f"L2 table at 0x{l2off:x} entry {j}: cluster at 0x{c * cs:x} "
            "is also used by something else"
        )

    # L2 tables, in file order. read_meta checked that they lie in the data area and
    # apart from each other (entries found bad are left out); a table may still share a
    # cluster with the fixed metadata or with the table before it.
    last = (meta.data_start - 1) // cs
    run = last + 1  # clusters [run, last] are tables not yet marked: one fill per run
    span = g.l2_bytes - 1
    for l2off in meta.l2_tables:
        c0, c1 = l2off // cs, (l2off + span) // cs
        if c0 <= last:
            res.corrupt(
                f"L2 table at 0x{l2off:x}: cluster at 0x{c0 * cs:x} is also used by something else"
            )
        elif c0 > last + 1:
            use.fill(run, last + 1, NORMAL)
            run = c0
        if c1 > last:
            last = c1
    use.fill(run, last + 1, NORMAL)
    # Their entries. A table in a hole of the file reads as zeros: it names nothing.
    compressed: list[tuple[int, int, str]] = []
    async for l2off in tables_with_data(child, meta.l2_tables, g.l2_bytes):
        table = be_array(await child.pread(l2off, g.l2_bytes))
        for j, e in enumerate(table):
            if not e:
                continue
            res.allocated_clusters += 1
            # A cluster-aligned data cluster inside the file is the common case: one
            # lookup in the map, and the message is only made for a finding.
            if not e & (QCOW_OFLAG_COMPRESSED | (cs - 1)) and meta.data_start <= e <= end - cs:
                if use.claim(e // cs, NORMAL):
                    used_twice(l2off, j, e // cs)
                continue
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
            else:  # sector-aligned only: it spans two clusters
                for c in range(e // cs, (e + cs - 1) // cs + 1):
                    if use.claim(c, NORMAL):
                        used_twice(l2off, j, c)

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
            if use.get(c) == NORMAL:
                res.corrupt(f"{where}: compressed data overlaps a cluster in normal use")
            use.set(c, COMPRESSED)

    # Leaks: unreferenced clusters that hold data, past the page-rounded fixed metadata
    # (qcow-create pads the L1 table to a page; that padding is not a leak).
    first = round_up(round_up(meta.data_start, 4096), cs) // cs
    res.usage, res.leak_from = use, first
    async for start, n in data_ranges(child, 0, fsize):
        lo, hi = max(first, start // cs), (start + n + cs - 1) // cs
        if lo < hi:
            res.leaked_clusters += (hi - lo) - use.used(lo, hi)
    if res.leaked_clusters:
        res.notes.append(
            f"{res.leaked_clusters} clusters are not referenced by any table (leaked, e.g. "
            "by a crash during allocation); they waste space but do no harm"
        )
