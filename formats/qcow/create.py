"""Creating empty images the way blktap's qcow-create did (spec §1.5-1.7, §2.1, §2.5, §2.7).

The layout: the 48-byte header, the Xen extension at 48-63, the backing name (if any) at
64, and the L1 table page-aligned (normally at 4096), so that tapdisk honours the
extension. The file then runs to the end of the L1 table's last page.

- Optimised (the default without a backing file): ``min_cluster_alloc = l2_size``, so the
  driver allocates whole extents and takes the fast path. ``optimise=False`` writes
  ``min_cluster_alloc = 1``: a normal image.
- Sparse (the default): ``SPARSE_FILE`` set, the file grows by sparse extension.
  ``reserve`` clears it; the file grows with fallocate, and the space a fully written
  image needs is reserved up front (fallocate KEEP_SIZE, so the file's length still
  tells where allocation continues).
- ``EXTHDR_L1_BIG_ENDIAN`` always set: the L1 table is big-endian, as qemu expects.
"""

from __future__ import annotations

import os
import re
from contextlib import ExitStack
from typing import TYPE_CHECKING

from formats.engine.opening import check_unsafe_backing
from formats.locks import locked_target
from formats.qcow.geometry import (
    MAX_BACKING_NAME,
    Geometry,
    default_bits,
    l1_cksum,
    round_up,
)
from formats.qcow.layout import (
    CRYPT_NONE,
    EXT_OFFSET,
    EXT_SIZE,
    QCOW_VERSION,
    QcowHeader,
    XenExtension,
    XenFlags,
)
from formats.raw import FALLOC_FL_KEEP_SIZE, fallocate, truncate_to_empty
from tapnbd.errors import ImageError

if TYPE_CHECKING:
    from formats import OpenRules

#: "URL-like xx: names are kept as given" (blktap qcow_create)
_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


async def backing_facts(
    path: str, backing: str, backing_format: str = "auto", rules: OpenRules | None = None
) -> tuple[str, int, int]:
    """(name to store, virtual size, mtime) of the backing file of the image ``path``.

    The name is stored as given, relative or absolute, as qemu-img does: a relative name
    is relative to the image's directory (formats.qcow.resolve_backing), so a directory
    holding a whole chain can move. The file is opened to check it.
    """
    from formats import open_image
    from formats.engine.opening import resolve_backing

    url = _URL_LIKE.match(backing) is not None
    where = backing if url else resolve_backing(path, backing)
    driver = await open_image(where, fmt=backing_format, read_only=True, rules=rules)
    try:
        size = driver.size()
    finally:
        await driver.close()
    mtime = 0 if url else int(os.stat(where).st_mtime) & 0xFFFFFFFF
    return backing, size, mtime


async def create_qcow(
    path: str,
    size: int | None = None,
    *,
    backing: str | None = None,
    backing_format: str = "auto",
    optimise: bool = True,
    cluster_size: int | None = None,
    reserve: bool = False,
    share: bool = False,
    target_fd: int | None = None,
    rules: OpenRules | None = None,
    unsafe: bool = False,
) -> Geometry:
    """Create a QCOW v1 image at ``path`` (overwriting it); returns its geometry.

    With a backing file the size defaults to the backing file's virtual size, as in
    blktap (which ignored the requested size altogether), and the image is never
    optimised: preallocated zero clusters would hide the backing data (spec §2.4).
    ``backing_format`` is only checked here: QCOW v1 has nowhere to record it.

    The image's lock is taken before anything is written (formats.locks), unless
    ``share``, or the caller passes ``target_fd``, an fd whose lock it already holds.
    ``unsafe`` (qemu-img create -u): the backing file is recorded without being opened
    (its mtime as 0); the size and the backing format must then be given.
    """
    name = b""
    mtime = 0
    if backing is not None:
        if unsafe:
            check_unsafe_backing(size, backing_format)
            stored = backing
        else:
            stored, bsize, mtime = await backing_facts(path, backing, backing_format, rules)
            size = bsize if size is None else size
        name = os.fsencode(stored)
        if len(name) > MAX_BACKING_NAME:
            raise ImageError(f"backing file name is {len(name)} bytes; at most 1023 fit")
    if size is None:
        raise ImageError("a size is needed (or a backing file to take it from)")
    cb, l2b = default_bits(cluster_size, backing is not None)
    header_size = EXT_OFFSET + EXT_SIZE + len(name)
    l1_off = round_up(round_up(header_size, 8), 4096)
    header = QcowHeader(
        version=QCOW_VERSION,
        backing_file_offset=EXT_OFFSET + EXT_SIZE if name else 0,
        backing_file_size=len(name),
        mtime=mtime,
        size=size,
        cluster_bits=cb,
        l2_bits=l2b,
        crypt_method=CRYPT_NONE,
        l1_table_offset=l1_off,
    )
    g = Geometry.from_header(header)  # the same limits as open
    optimised = optimise and backing is None
    flags = XenFlags.EXTHDR_L1_BIG_ENDIAN | (XenFlags.NONE if reserve else XenFlags.SPARSE_FILE)
    ext = XenExtension(
        cksum=l1_cksum(bytes(g.l1_size * 8)),
        min_cluster_alloc=g.l2_size if optimised else 1,
        flags=flags,
    )
    file_len = round_up(l1_off + g.l1_size * 8, 4096)

    with ExitStack() as stack:
        fd = target_fd
        if fd is None:
            fd = stack.enter_context(locked_target(path, share=share))
        truncate_to_empty(fd)  # locked: nobody else is using it
        os.pwrite(fd, header.build() + ext.build() + name, 0)
        os.ftruncate(fd, file_len)  # the L1 table: zeros, as a hole
        if reserve:
            # Room for every extent (or every table and cluster) of a fully written image.
            per_slot = g.extent_bytes if optimised else g.l2_alloc + (g.l2_size << cb)
            try:
                fallocate(fd, FALLOC_FL_KEEP_SIZE, file_len, g.l1_size * per_slot)
            except OSError as e:
                raise ImageError(f"{path}: cannot reserve space: {e.strerror}") from None
        os.fsync(fd)
    return g
