#!/usr/bin/env python3
"""The kernel's copy of page-cache pages into a read buffer, by the buffer's offset in its
page: ``aliasing.py FILE`` reads FILE (page-cached, 1 GiB or so) in 2 MiB preads into a
buffer starting that many bytes past a page boundary, and prints the sys time of each.

On this VM, offsets 8 to 40 (where malloc puts a fresh big bytearray: 16) cost about
five times offsets 0, 48 or 2064: "4K aliasing", the copy's loads alias its stores.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys

CHUNK = 2 << 20


def sys_time(fd: int, size: int, view: memoryview) -> float:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for pos in range(0, size, CHUNK):
        os.preadv(fd, [view], pos)
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime - r0.ru_stime


def main() -> None:
    fd = os.open(sys.argv[1], os.O_RDONLY)
    size = os.fstat(fd).st_size // CHUNK * CHUNK
    big = bytearray(CHUNK + 8192)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(big))
    sys_time(fd, size, memoryview(big)[:CHUNK])  # into the page cache
    for offset in (0, 8, 16, 24, 40, 48, 64, 2064):
        start = -addr % 4096 + offset
        view = memoryview(big)[start : start + CHUNK]
        best = min(sys_time(fd, size, view) for _ in range(3))
        print(f"buffer at page + {offset:4}: {best:.3f} s sys for {size >> 20} MiB")


if __name__ == "__main__":
    main()
