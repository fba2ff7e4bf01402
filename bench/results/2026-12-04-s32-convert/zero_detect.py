#!/usr/bin/env python3
"""Zero detection of one 2 MiB chunk in 64 KiB blocks, three ways: the block copied out
(``tobytes``) and compared with bytes, as before; a bytearray of zeros compared with the
block (memcmp, no copy), as now; two memoryviews (CPython compares them byte by byte)."""

from __future__ import annotations

import os
import timeit
from collections.abc import Callable

CHUNK, BLOCK = 2 << 20, 64 << 10
ZEROES, ZEROES_BA = bytes(BLOCK), bytearray(BLOCK)


def copied(data: memoryview) -> int:
    return sum(data[o : o + BLOCK].tobytes() == ZEROES for o in range(0, CHUNK, BLOCK))


def memcmp(data: memoryview) -> int:
    # The bytearray on the left: its == is a memcmp; a memoryview's goes byte by byte.
    return sum(ZEROES_BA == data[o : o + BLOCK] for o in range(0, CHUNK, BLOCK))  # noqa: SIM300


def views(data: memoryview) -> int:
    zv = memoryview(ZEROES)
    return sum(data[o : o + BLOCK] == zv for o in range(0, CHUNK, BLOCK))


def main() -> None:
    ways: list[tuple[str, Callable[[memoryview], int]]] = [
        ("tobytes ==", copied),
        ("bytearray ==", memcmp),
        ("memoryview ==", views),
    ]
    for name, way in ways:
        for label, buf in (("data", os.urandom(CHUNK)), ("zeros", bytes(CHUNK))):
            n = 20 if way is views else 200
            t = timeit.timeit(lambda: way(memoryview(buf)), number=n) / n  # noqa: B023
            print(f"{name:14} {label:5}: {t * 1e6:8.1f} us per 2 MiB chunk")


if __name__ == "__main__":
    main()
