"""Random 4 KiB preadv cost over a 1 GiB file whose cache was filled by 1 MiB writes
starting at a given misalignment (0, 4K, 64K)."""

from __future__ import annotations

import os
import random
import statistics
import time

PATH = "/var/tmp/rw/f.raw"
SIZE = 1 << 30
MiB = 1 << 20
BS = 4096


def fill(shift: int) -> None:
    fd = os.open(PATH, os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, SIZE + 4 * MiB)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    buf = os.urandom(MiB)
    for off in range(shift, SIZE + shift, MiB):
        os.pwrite(fd, buf, off)
    os.close(fd)


def measure(shift: int) -> float:
    fd = os.open(PATH, os.O_RDONLY)
    rng = random.Random(5)
    offs = [shift + rng.randrange(SIZE // BS) * BS for _ in range(200000)]
    buf = bytearray(BS)
    res = []
    for _ in range(5):
        t0 = time.thread_time()
        for o in offs:
            os.preadv(fd, [buf], o)
        res.append((time.thread_time() - t0) / len(offs) * 1e6)
    os.close(fd)
    return statistics.median(res)


for rnd in range(2):
    for shift in (0, 4096, 65536):
        fill(shift)
        print(rnd, shift, f"{measure(shift):.3f} us", flush=True)
