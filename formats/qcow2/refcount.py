"""Refcount blocks in memory: every ``refcount_order`` from 0 (1 bit) to 6 (64 bits).

"refcount_bits = 1 << refcount_order". A block is one cluster of refcounts; entries
narrower than a byte are packed starting from the least significant bit (QEMU
``get_refcount_ro0``: ``(array[index / 8] >> (index % 8)) & 1``). In memory a block is
an ``array`` of host-order integers of at least its width, so reading and changing a
refcount is one index whatever the order.

References: QEMU docs/interop/qcow2.txt "Host cluster management"; block/qcow2-refcount.c.
"""

from __future__ import annotations

import sys
from array import array

_LITTLE = sys.byteorder == "little"
#: array typecodes for 8-, 16-, 32- and 64-bit refcounts.
_CODES = {3: "B", 4: "H", 5: "I", 6: "Q"}


def _typecode(order: int) -> str:
    code = _CODES.get(order, "B")
    assert array(code).itemsize == max(1, 1 << order >> 3)
    return code


def decode_block(data: bytes | bytearray | memoryview, order: int) -> array[int]:
    """A refcount block's bytes as host-order refcounts."""
    if order >= 3:
        a = array(_typecode(order))
        a.frombytes(bytes(data))
        if _LITTLE and order > 3:
            a.byteswap()
        return a
    bits = 1 << order
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    return array("B", ((b >> (j * bits)) & mask for b in bytes(data) for j in range(per_byte)))


def encode_block(a: array[int], order: int) -> bytes:
    """The inverse of decode_block."""
    if order >= 3:
        if _LITTLE and order > 3:
            b = array(a.typecode, a)
            b.byteswap()
            return b.tobytes()
        return a.tobytes()
    bits = 1 << order
    per_byte = 8 // bits
    out = bytearray(len(a) // per_byte)
    for i, v in enumerate(a):
        out[i // per_byte] |= v << ((i % per_byte) * bits)
    return bytes(out)


def entries_per_block(cluster_bits: int, order: int) -> int:
    """Refcounts in one block: cluster_size * 8 / refcount_bits."""
    return 1 << (cluster_bits + 3 - order)


def max_refcount(order: int) -> int:
    return (1 << (1 << order)) - 1


def covering(used: int, cluster_bits: int, order: int) -> tuple[int, int]:
    """(refcount table clusters, refcount blocks) that count ``used`` clusters and
    themselves: the counts grow until they cover their own clusters too."""
    cs = 1 << cluster_bits
    per_block = entries_per_block(cluster_bits, order)
    rt_clusters = blocks = 1
    while True:
        need_blocks = -(-(used + rt_clusters + blocks) // per_block)
        need_rt = -(-need_blocks * 8 // cs)
        if (need_blocks, need_rt) == (blocks, rt_clusters):
            return rt_clusters, blocks
        blocks, rt_clusters = max(blocks, need_blocks), max(rt_clusters, need_rt)
