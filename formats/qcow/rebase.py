"""Changing the backing file name recorded in a QCOW v1 header.

QEMU's qcow driver cannot do this (no bdrv_change_backing_file); here the name is
rewritten in place, between the header (and blktap's extension) and the L1 table, which
never moves: a name that does not fit there is refused. The Xen extension counts only
without a backing file (spec §2.2: "only if backing_file_offset == 0"), so removing the
name brings it back into force: its L1 checksum is recomputed then. The caller holds
the image's lock.
"""

from __future__ import annotations

import os
from dataclasses import replace

from formats.qcow.geometry import MAX_BACKING_NAME, Geometry, l1_cksum
from formats.qcow.layout import (
    CKSUM_OFFSET,
    EXT_OFFSET,
    EXT_SIZE,
    HEADER_SIZE,
    QcowHeader,
    XenExtension,
)
from tapnbd.errors import ImageError, InvalidImageError


def write_backing(fd: int, name: str, mtime: int) -> None:
    """Record ``name`` (empty: no backing file) and its ``mtime`` in the header."""
    head = os.pread(fd, EXT_OFFSET + EXT_SIZE, 0)
    h = QcowHeader.parse(head)
    ext = XenExtension.parse(head)
    raw = os.fsencode(name)
    if len(raw) > MAX_BACKING_NAME:
        raise ImageError(f"backing file name is {len(raw)} bytes; at most {MAX_BACKING_NAME}")
    if h.backing_file_offset and (
        h.backing_file_size > MAX_BACKING_NAME
        or h.backing_file_offset + h.backing_file_size > h.l1_table_offset
    ):
        raise InvalidImageError(
            f"backing_file_offset 0x{h.backing_file_offset:x} (+{h.backing_file_size} "
            "bytes) does not lie before the L1 table"
        )
    start = EXT_OFFSET + EXT_SIZE if ext is not None else HEADER_SIZE
    room = h.l1_table_offset - start
    if len(raw) > room:
        raise ImageError(
            f"a {len(raw)}-byte backing name does not fit: this image has room for {room} "
            "bytes before its L1 table (convert it to a new image instead)"
        )
    new = replace(
        h,
        backing_file_offset=start if raw else 0,
        backing_file_size=len(raw),
        mtime=mtime if raw else 0,
    )
    old_end = h.backing_file_offset + h.backing_file_size if h.backing_file_offset else start
    os.pwrite(fd, raw.ljust(max(0, old_end - start), b"\0"), start)
    os.pwrite(fd, new.build(), 0)
    if ext is not None and not raw and h.l1_table_offset % 4096 == 0:
        # The extension is honoured again: its checksum must describe the table.
        g = Geometry.from_header(new)
        l1 = os.pread(fd, g.l1_size * 8, h.l1_table_offset).ljust(g.l1_size * 8, b"\0")
        os.pwrite(fd, l1_cksum(l1).to_bytes(4, "big"), CKSUM_OFFSET)
    os.fsync(fd)
