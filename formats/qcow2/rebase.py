"""Changing the backing file name and format recorded in a qcow2 header (QEMU:
qcow2_change_backing_file).

The header, its extensions and the backing name share the first cluster: the
extensions are rebuilt (all kept as they are but the backing format, which is replaced
or dropped), the new name follows them, and the rest of the region is zeroed. The
caller holds the image's lock.
"""

from __future__ import annotations

import os
from dataclasses import replace

from formats.qcow2.layout import (
    MAX_BACKING_NAME,
    V2_HEADER_SIZE,
    V3_HEADER_SIZE_COMPRESSION,
    Ext,
    Qcow2Header,
    build_extension,
)
from formats.qcow2.meta import header_extensions
from tapnbd.errors import ImageError, InvalidImageError


def read_header(fd: int) -> tuple[Qcow2Header, bytes]:
    """The header and the whole first cluster."""
    head = os.pread(fd, V3_HEADER_SIZE_COMPRESSION, 0)
    h = Qcow2Header.parse(head)
    if not 9 <= h.cluster_bits <= 21:
        raise InvalidImageError(f"cluster_bits {h.cluster_bits} is out of range (9-21)")
    return h, os.pread(fd, 1 << h.cluster_bits, 0)


def write_backing(fd: int, name: str, fmt: str | None) -> None:
    """Record ``name`` (empty: no backing file) and its format ``fmt`` in the header."""
    h, head = read_header(fd)
    raw = name.encode()
    if len(raw) > MAX_BACKING_NAME:
        raise ImageError(f"backing file name is {len(raw)} bytes; at most {MAX_BACKING_NAME}")
    exts = b"".join(
        build_extension(t, data)
        for t, data in header_extensions(h, head, 1 << h.cluster_bits)
        if t != Ext.BACKING_FORMAT
    )
    if raw and fmt:
        exts = build_extension(Ext.BACKING_FORMAT, fmt.encode()) + exts
    exts += bytes(8)  # the end-of-extensions marker
    hlen = h.header_length if h.version >= 3 else V2_HEADER_SIZE
    name_at = hlen + len(exts)
    cs = 1 << h.cluster_bits
    if name_at + len(raw) > cs:
        raise ImageError(
            f"the header, its extensions and a {len(raw)}-byte backing name do not fit in "
            f"one {cs}-byte cluster"
        )
    new = replace(h, backing_file_offset=name_at if raw else 0, backing_file_size=len(raw)).build()
    # Everything up to the old name's end is rewritten; what follows it was zeros.
    old_end = min(cs, max(h.backing_file_offset + h.backing_file_size, len(new) + len(exts)))
    region = (new + exts + raw).ljust(max(old_end, name_at + len(raw)), b"\0")
    os.pwrite(fd, region, 0)
    os.fsync(fd)
