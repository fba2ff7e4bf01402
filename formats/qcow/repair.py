"""``tapnbd check --repair`` for QCOW v1: what a crash leaves behind, put right.

A crash (kill -9, power loss) can leave two harmless findings (formats.qcow.check):

- Leaked clusters: the file grew for an allocation whose table entry never reached the
  disk. Past the last cluster anything refers to, the file is cut back (the driver
  allocates at the end of the file, so that space is used again); a leaked cluster
  below it gets its space given back with a hole (a hole is never a leak).
- A stale L1 checksum in blktap's extension: tapdisk rewrites it on a clean close only.
  The image is opened for writing, which checks every extent of an allocation-optimised
  image and, if they are all whole, takes the fast path and rewrites the checksum on
  close, as tapdisk would. If they are not, the image stops being allocation-optimised
  (``min_cluster_alloc = 1``) and gets the checksum of its table: the safe path, for
  good, instead of a fast path that would trust broken extents.

Corruption is not repaired: the check's findings are returned as they are. The image's
lock is held throughout (formats.locks).
"""

from __future__ import annotations

import os

from formats import OpenRules, open_image
from formats.engine.checks import PAGE_BITS, CheckResult, ClusterUse
from formats.locks import locked_target
from formats.qcow.check import check_qcow
from formats.qcow.driver import QcowDriver
from formats.qcow.geometry import Geometry, l1_cksum
from formats.qcow.layout import EXT_OFFSET, EXT_SIZE, QcowHeader, XenExtension
from formats.raw import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from tapnbd.errors import ImageError


async def repair_qcow(path: str, *, share: bool = False) -> CheckResult:
    """Repair leaks and the checksum of the image at ``path``; returns a fresh check."""
    if not os.path.lexists(path):
        raise ImageError(f"{path}: no such file or device")
    with locked_target(path, share=share) as fd:
        # Read beside our own writer's lock (another open file, so it would refuse us).
        res = await check_qcow(path, share=True)
        if res.check_errors or res.corruption_count:
            res.notes.insert(0, "not repaired: the image is corrupt, not only leaky")
            return res
        done: list[str] = []
        if res.leaked_clusters and res.usage is not None:
            _drop_leaks(fd, res.usage, res.leak_from, res.cluster_size)
            done.append(f"{res.leaked_clusters} leaked clusters freed")
        if res.cksum == "mismatch":
            done.append(await _fix_cksum(fd, path))
        os.fsync(fd)
        after = await check_qcow(path, share=True)
    if done:
        after.notes.insert(0, "repaired: " + "; ".join(done))
    return after


def _last_used(use: ClusterUse) -> int:
    """The index of the highest cluster in use (-1 if none)."""
    for k in sorted(use.pages, reverse=True):
        n = len(use.pages[k].rstrip(b"\0"))
        if n:
            return (k << PAGE_BITS) + n - 1
    return -1


def _drop_leaks(fd: int, use: ClusterUse, first: int, cs: int) -> None:
    """Cut the file after its last used cluster; punch out the leaks below it."""
    size = os.fstat(fd).st_size
    keep = max(first, _last_used(use) + 1) * cs
    if keep < size:
        os.ftruncate(fd, keep)
        size = keep
    pos = first * cs
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        c, last = start // cs, (end - 1) // cs
        while c <= last:
            if use.get(c):
                c += 1
                continue
            run = c
            while c <= last and not use.get(c):
                c += 1
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, run * cs, (c - run) * cs)
        pos = end


async def _fix_cksum(fd: int, path: str) -> str:
    """Make the extension's checksum right again; says how."""
    driver = await open_image(path, fmt="qcow", read_only=False, rules=OpenRules(share=True))
    assert isinstance(driver, QcowDriver)
    fast = driver.fast_path
    await driver.close()  # on the fast path, close rewrites the checksum (tdqcow_close)
    if fast:
        return "L1 checksum rewritten (every extent is whole)"
    head = os.pread(fd, EXT_OFFSET + EXT_SIZE, 0)
    h, ext = QcowHeader.parse(head), XenExtension.parse(head)
    assert ext is not None
    g = Geometry.from_header(h)
    table = os.pread(fd, g.l1_size * 8, h.l1_table_offset).ljust(g.l1_size * 8, b"\0")
    os.pwrite(fd, XenExtension(l1_cksum(table), 1, ext.flags).build(), EXT_OFFSET)
    was = ext.min_cluster_alloc > 1
    return "L1 checksum rewritten" + (
        "; the image is no longer allocation-optimised (an extent is not whole)" if was else ""
    )
