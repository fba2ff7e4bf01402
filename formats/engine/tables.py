"""On-disk tables of big-endian 64-bit entries (QCOW v1 and qcow2 L1 and L2 tables,
qcow2 snapshot and refcount tables) as host-order ``array('Q')``, and back."""

from __future__ import annotations

import sys
from array import array

_LITTLE = sys.byteorder == "little"


def be_array(data: bytes | bytearray | memoryview) -> array[int]:
    """Big-endian 64-bit entries as a host-order ``array('Q')``."""
    a = array("Q")
    a.frombytes(data)
    if _LITTLE:
        a.byteswap()
    return a


def to_be_bytes(a: array[int]) -> bytes:
    """The inverse of be_array."""
    if not _LITTLE:
        return a.tobytes()
    b = array("Q", a)
    b.byteswap()
    return b.tobytes()
