"""Creating empty qcow2 images, laid out as qemu-img lays them out.

The first cluster holds the header, the header extensions (backing format, feature name
table) and the backing name; then the refcount table, the refcount blocks and the L1
table, each cluster-aligned. Every cluster so far has refcount 1. ``metadata``
preallocation then gives every guest cluster an L2 entry and a data cluster: sparse
(``metadata``), reserved with fallocate (``falloc``), or written with zeros (``full``).

References: QEMU docs/interop/qcow2.txt; block/qcow2.c ``qcow2_co_create``.
"""

from __future__ import annotations

import os
from array import array
from contextlib import ExitStack

from formats.engine.tables import to_be_bytes
from formats.locks import locked_target
from formats.qcow2.layout import (
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    V2_HEADER_SIZE,
    V3_HEADER_SIZE_COMPRESSION,
    Ext,
    Qcow2Header,
    build_extension,
    build_feature_names,
)
from formats.qcow2.meta import l1_entries_needed
from formats.qcow2.refcount import encode_block, entries_per_block
from tapnbd.errors import ImageError

DEFAULT_CLUSTER_SIZE = 65536
#: Refcounts are 16-bit unless asked otherwise (qemu's default).
DEFAULT_REFCOUNT_ORDER = 4
PREALLOCATION = ("off", "metadata", "falloc", "full")


def _clusters(n: int, cs: int) -> int:
    return (n + cs - 1) // cs


async def create_qcow2(
    path: str,
    size: int | None,
    *,
    backing: str | None = None,
    backing_fmt: str | None = None,
    cluster_size: int | None = None,
    preallocation: str = "off",
    compat: str = "1.1",
    share: bool = False,
    target_fd: int | None = None,
) -> None:
    """Create ``path`` (overwritten). ``size`` defaults to the backing file's.

    The image's lock is taken before anything is written (formats.locks), unless
    ``share``, or the caller passes ``target_fd``, an fd whose lock it already holds.
    """
    from formats import open_image, probe
    from formats.engine.opening import resolve_backing

    cs = cluster_size or DEFAULT_CLUSTER_SIZE
    cb = cs.bit_length() - 1
    if cs != 1 << cb or not MIN_CLUSTER_BITS <= cb <= MAX_CLUSTER_BITS:
        raise ImageError(f"cluster size {cs} must be a power of two from 512 B to 2 MiB")
    if preallocation not in PREALLOCATION:
        raise ImageError(f"preallocation {preallocation!r}: use {', '.join(PREALLOCATION)}")
    if compat not in ("0.10", "1.1"):
        raise ImageError(f"compat {compat!r}: use 0.10 (version 2) or 1.1 (version 3)")
    version = 3 if compat == "1.1" else 2
    if backing is not None:
        if len(backing.encode()) > MAX_BACKING_NAME:
            raise ImageError(f"backing file name is longer than {MAX_BACKING_NAME} bytes")
        # The name is stored as given (relative to the image's directory, as in qemu).
        bpath = resolve_backing(path, backing)
        if backing_fmt is None:
            backing_fmt = probe(bpath)
        driver = await open_image(bpath, fmt=backing_fmt, read_only=True)
        try:
            bsize = driver.size()
        finally:
            await driver.close()
        if size is None:
            size = bsize
    if size is None:
        raise ImageError("a size is needed (or a backing file to take it from)")

    # The first cluster: header, extensions, backing name.
    hlen = V3_HEADER_SIZE_COMPRESSION if version == 3 else V2_HEADER_SIZE
    exts = b""
    if backing is not None and backing_fmt:
        exts += build_extension(Ext.BACKING_FORMAT, backing_fmt.encode())
    if version == 3:
        exts += build_extension(Ext.FEATURE_TABLE, build_feature_names())
    exts += bytes(8)  # the end-of-extensions marker
    name = backing.encode() if backing is not None else b""
    if hlen + len(exts) + len(name) > cs:
        raise ImageError(f"the header does not fit in one {cs}-byte cluster")

    # Refcount table, blocks and L1 table: grow the counts until they cover themselves.
    order = DEFAULT_REFCOUNT_ORDER
    per_block = entries_per_block(cb, order)
    l1_entries = l1_entries_needed(size, cb)
    l1_clusters = _clusters(l1_entries * 8, cs)
    rt_clusters = blocks = 1
    while True:
        total = 1 + rt_clusters + blocks + l1_clusters
        need_blocks = _clusters(total, per_block)
        need_rt = _clusters(need_blocks * 8, cs)
        if (need_blocks, need_rt) == (blocks, rt_clusters):
            break
        blocks, rt_clusters = max(blocks, need_blocks), max(rt_clusters, need_rt)
    rt_off = cs
    blocks_off = rt_off + rt_clusters * cs
    l1_off = blocks_off + blocks * cs

    header = Qcow2Header(
        version=version,
        backing_file_offset=hlen + len(exts) if name else 0,
        backing_file_size=len(name),
        cluster_bits=cb,
        size=size,
        crypt_method=0,
        l1_size=l1_entries,
        l1_table_offset=l1_off,
        refcount_table_offset=rt_off,
        refcount_table_clusters=rt_clusters,
        nb_snapshots=0,
        snapshots_offset=0,
        refcount_order=order,
        header_length=hlen,
    )
    first = (header.build() + exts + name).ljust(cs, b"\0")
    reftable = array("Q", [blocks_off + i * cs for i in range(blocks)])
    reftable.extend([0] * (rt_clusters * cs // 8 - blocks))
    counts = array("H", [1] * total + [0] * (blocks * per_block - total))
    with ExitStack() as stack:
        fd = target_fd
        if fd is None:
            fd = stack.enter_context(locked_target(path, share=share))
        os.ftruncate(fd, 0)  # locked: nobody else is using it
        data = memoryview(first + to_be_bytes(reftable) + encode_block(counts, order))
        pos = 0
        while pos < len(data):
            pos += os.pwrite(fd, data[pos:], pos)
        os.ftruncate(fd, l1_off + l1_clusters * cs)
        os.fsync(fd)
        if preallocation != "off":
            from formats import OpenRules, open_image
            from formats.qcow2.driver import Qcow2Driver

            # We hold the lock: the driver's own open must not ask for it again.
            d = await open_image(path, fmt="qcow2", rules=OpenRules(share=True))
            try:
                assert isinstance(d, Qcow2Driver)
                await d.preallocate(preallocation)
            finally:
                await d.close()
