"""Compressed clusters, as QCOW v1 and qcow2 store them: raw deflate, read whole.

"a raw deflate stream with no zlib header: inflate uses inflateInit2(.., -12)" (blktap
spec §1.3; qemu writes qcow2's the same way, a 4 KiB window). Like QEMU, a stream cut
short is fine if the cluster is complete. The last cluster inflated is kept: a request
that reads a compressed cluster in pieces inflates it once.
"""

from __future__ import annotations

import errno
import zlib

from tapnbd.driver import Driver


def _eio(message: str) -> OSError:
    return OSError(errno.EIO, message)


class Inflater:
    """Clusters of ``cluster_size`` bytes inflated from ``child``, the last one kept."""

    def __init__(self, child: Driver, cluster_size: int) -> None:
        self._child = child
        self._cs = cluster_size
        self._key = -1
        self._data = b""

    async def cluster(self, key: int, off: int, csize: int) -> bytes:
        """The cluster whose ``csize`` compressed bytes are at ``off`` (``key``: its entry)."""
        if key == self._key:
            return self._data
        # The last compressed cluster may end short of its last sector at the file's end.
        csize = min(csize, self._child.size() - off)
        if csize <= 0:
            raise _eio(f"compressed cluster at 0x{off:x} lies past the end of the file")
        raw = await self._child.pread(off, csize)
        try:
            data = zlib.decompressobj(-12).decompress(bytes(raw), self._cs)
        except zlib.error as e:
            raise _eio(f"compressed cluster at 0x{off:x}: {e}") from None
        if len(data) != self._cs:
            raise _eio(f"compressed cluster at 0x{off:x} inflates to {len(data)} bytes")
        self._key, self._data = key, data
        return data
