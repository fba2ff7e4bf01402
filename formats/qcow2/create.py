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
from typing import TYPE_CHECKING, NamedTuple

from formats.engine.opening import check_unsafe_backing
from formats.engine.tables import to_be_bytes
from formats.locks import locked_target
from formats.qcow2.layout import (
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MAX_REFCOUNT_ORDER,
    MIN_CLUSTER_BITS,
    V2_HEADER_SIZE,
    V3_HEADER_SIZE_COMPRESSION,
    Compatible,
    Ext,
    Qcow2Header,
    build_extension,
    build_feature_names,
)
from formats.qcow2.meta import l1_entries_needed
from formats.qcow2.refcount import covering, decode_block, encode_block
from formats.raw import truncate_to_empty
from tapnbd.errors import ImageError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from formats import OpenRules

DEFAULT_CLUSTER_SIZE = 65536
#: Refcounts are 16-bit unless asked otherwise (qemu's default).
DEFAULT_REFCOUNT_ORDER = 4
PREALLOCATION = ("off", "metadata", "falloc", "full")


#: qemu's spellings of an on/off option (qapi_bool_parse), and of the two versions.
_BOOLS = {"on": True, "yes": True, "true": True, "y": True}
_BOOLS |= {"off": False, "no": False, "false": False, "n": False}
_COMPAT = {"0.10": "0.10", "v2": "0.10", "1.1": "1.1", "v3": "1.1"}


def parse_bool(key: str, text: str) -> bool:
    if text not in _BOOLS:
        raise ImageError(f"-o {key}={text}: use on or off")
    return _BOOLS[text]


def parse_compat(text: str) -> str:
    """``0.10`` or ``1.1`` (qemu also takes ``v2`` and ``v3``)."""
    if text not in _COMPAT:
        raise ImageError(f"-o compat={text}: use 0.10 (v2) or 1.1 (v3)")
    return _COMPAT[text]


class Qcow2Options(NamedTuple):
    """qemu-img's qcow2 creation options that have no flag of their own (``-o``).
    Beyond the defaults, refcount_bits and lazy_refcounts need version 3 (compat 1.1)."""

    compat: str = "1.1"
    refcount_bits: int = 16
    lazy_refcounts: bool = False

    @classmethod
    def from_keys(cls, opts: Mapping[str, str]) -> Qcow2Options:
        """From ``-o``'s keys, as qemu-img spells their values."""
        bits = opts.get("refcount_bits", "16")
        if not bits.isdigit():
            raise ImageError(f"-o refcount_bits={bits}: a power of two from 1 to 64")
        lazy = parse_bool("lazy_refcounts", opts.get("lazy_refcounts", "off"))
        return cls(parse_compat(opts.get("compat", "1.1")), int(bits), lazy)


DEFAULT_OPTIONS = Qcow2Options()


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
    options: Qcow2Options = DEFAULT_OPTIONS,
    share: bool = False,
    target_fd: int | None = None,
    unsafe: bool = False,
    rules: OpenRules | None = None,
) -> None:
    """Create ``path`` (overwritten). ``size`` defaults to the backing file's.

    ``rules`` are the admin's for the backing file's own chain (formats.OpenRules); the
    backing file itself is the admin's name, opened as such.

    ``unsafe`` (qemu-img create -u): the backing file is recorded without being opened,
    so it may not exist yet; the size and the backing format must then be given.

    The image's lock is taken before anything is written (formats.locks), unless
    ``share``, or the caller passes ``target_fd``, an fd whose lock it already holds.
    """
    from formats import is_local_path, open_image, probe
    from formats.engine.opening import resolve_backing

    cs = cluster_size or DEFAULT_CLUSTER_SIZE
    cb = cs.bit_length() - 1
    if cs != 1 << cb or not MIN_CLUSTER_BITS <= cb <= MAX_CLUSTER_BITS:
        raise ImageError(f"cluster size {cs} must be a power of two from 512 B to 2 MiB")
    if preallocation not in PREALLOCATION:
        raise ImageError(f"preallocation {preallocation!r}: use {', '.join(PREALLOCATION)}")
    compat, refcount_bits, lazy_refcounts = options
    if compat not in ("0.10", "1.1"):
        raise ImageError(f"compat {compat!r}: use 0.10 (version 2) or 1.1 (version 3)")
    version = 3 if compat == "1.1" else 2
    order = refcount_bits.bit_length() - 1
    if refcount_bits != 1 << order or not 0 <= order <= MAX_REFCOUNT_ORDER:
        raise ImageError(f"refcount_bits {refcount_bits} must be a power of two from 1 to 64")
    # qcow2.txt: version 2 images "must use refcount_order 4"; lazy refcounts are a
    # compatible feature bit, a field version 2 does not have.
    if version == 2 and order != DEFAULT_REFCOUNT_ORDER:
        raise ImageError("refcount_bits other than 16 needs compat 1.1 (version 3)")
    if version == 2 and lazy_refcounts:
        raise ImageError("lazy_refcounts needs compat 1.1 (version 3)")
    if backing is not None:
        if len(backing.encode()) > MAX_BACKING_NAME:
            raise ImageError(f"backing file name is longer than {MAX_BACKING_NAME} bytes")
        # The name is stored as given (relative to the image's directory, as in qemu).
        if unsafe:
            check_unsafe_backing(size, backing_fmt)
        else:
            bpath = resolve_backing(path, backing)
            if backing_fmt is None:
                # An NBD export or an rbd: image is served as it is, never probed: its
                # format is raw over QEMU's nbd or rbd protocol, as qemu-img records it.
                backing_fmt = probe(bpath) if is_local_path(bpath) else "raw"
            driver = await open_image(bpath, fmt=backing_fmt, read_only=True, rules=rules)
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

    # Refcount table, blocks and L1 table: the refcounts cover the header, the L1 table
    # and themselves.
    l1_entries = l1_entries_needed(size, cb)
    l1_clusters = _clusters(l1_entries * 8, cs)
    rt_clusters, blocks = covering(1 + l1_clusters, cb, order)
    total = 1 + rt_clusters + blocks + l1_clusters
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
        compatible_features=Compatible.LAZY_REFCOUNTS if lazy_refcounts else 0,
        refcount_order=order,
        header_length=hlen,
    )
    first = (header.build() + exts + name).ljust(cs, b"\0")
    reftable = array("Q", [blocks_off + i * cs for i in range(blocks)])
    reftable.extend([0] * (rt_clusters * cs // 8 - blocks))
    counts = decode_block(bytes(blocks * cs), order)  # zeros, each refcount_bits wide
    for i in range(total):
        counts[i] = 1
    with ExitStack() as stack:
        fd = target_fd
        if fd is None:
            fd = stack.enter_context(locked_target(path, share=share))
        truncate_to_empty(fd)  # locked: nobody else is using it
        data = memoryview(first + to_be_bytes(reftable) + encode_block(counts, order))
        pos = 0
        while pos < len(data):
            pos += os.pwrite(fd, data[pos:], pos)
        os.ftruncate(fd, l1_off + l1_clusters * cs)
        os.fsync(fd)
        if preallocation != "off":
            from dataclasses import replace

            from formats import OpenRules, open_image
            from formats.qcow2.driver import Qcow2Driver

            # We hold the lock: the driver's own open must not ask for it again. Its
            # header names the backing file because the admin did: followed as theirs.
            mine = replace(rules or OpenRules(), share=True, given_backing=backing)
            d = await open_image(path, fmt="qcow2", rules=mine)
            try:
                assert isinstance(d, Qcow2Driver)
                await d.preallocate(preallocation)
            finally:
                await d.close()
