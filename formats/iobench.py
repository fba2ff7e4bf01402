"""``tapnbd bench``: a queue of reads or writes straight to an image's driver stack, as
``qemu-img bench`` runs them (no NBD between).

``count`` requests of ``size`` bytes, ``depth`` of them in flight, the first at
``offset`` and each next one ``step`` further on, wrapping as qemu-img has since 2025
(commit ff2ab634: ``offset %= image size - size``; before, it wrapped modulo the whole
size and a request could run past the end). Writes carry ``pattern`` in every byte and end with
a FLUSH. Every request goes through the Backend, as a client's would, so the time
includes its checks.

``flush_interval`` (qemu-img bench --flush-interval) adds a FLUSH after every that
many writes: the writes in flight are waited for first (drained), unless ``drain`` is
false (--no-drain), when the FLUSH goes out beside them (qemu-img.c, bench_cb).

``aio`` (qemu-img bench -i, and -n for ``native``) names the I/O engine. tapnbd's image
files have one, formats.raw's (RWF_NOWAIT inline, else a thread pool): ``threads`` is
that; ``native`` (Linux AIO) and ``io_uring`` are refused, as a qemu-img built without
them refuses them, rather than timing another engine under their name.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

from formats import OpenRules
from formats.filters.cachemode import open_for_cache
from tapnbd.backend import Backend
from tapnbd.errors import ImageError

#: qemu-img bench -i's modes.
AIO_MODES = ("threads", "native", "io_uring")


def check_aio(aio: str) -> None:
    """Refuse an I/O engine other than the one the image files have (threads)."""
    if aio not in AIO_MODES:
        raise ImageError(f"-i {aio!r}: invalid aio mode; qemu-img takes {', '.join(AIO_MODES)}")
    if aio != "threads":
        raise ImageError(
            f"-i {aio}: tapnbd has no {aio} engine; its image files do their I/O in a "
            "thread pool (after an RWF_NOWAIT try): -i threads"
        )


@dataclass(frozen=True)
class BenchSpec:
    count: int = 75000
    depth: int = 64
    size: int = 4096
    step: int | None = None  # None: the request size
    offset: int = 0
    write: bool = False
    pattern: int = 0
    flush_interval: int = 0
    drain: bool = True

    def describe(self) -> str:
        """qemu-img bench's first line (and second, with a flush interval)."""
        first = (
            f"Sending {self.count} {'write' if self.write else 'read'} requests, {self.size} "
            f"bytes each, {self.depth} in parallel (starting at offset {self.offset}, step "
            f"size {self.size if self.step is None else self.step})"
        )
        if self.flush_interval:
            return f"{first}\nSending flush every {self.flush_interval} requests"
        return first


async def run_bench(
    path: str,
    spec: BenchSpec,
    *,
    fmt: str,
    rules: OpenRules,
    cache: str = "writeback",
    aio: str = "threads",
) -> float:
    """Run ``spec`` against the image at ``path``, opened for ``cache`` (qemu-img bench
    -t, formats.filters.cachemode) with the I/O engine ``aio`` (-i); returns the seconds
    it took."""
    check_aio(aio)
    if spec.count < 0 or spec.depth < 1 or spec.size < 1 or not 0 <= spec.pattern <= 255:
        raise ImageError(
            "the count must be 0 or more, the depth and size 1 or more, and the pattern 0 to 255"
        )
    if spec.flush_interval < 0 or (spec.flush_interval and not spec.write):
        raise ImageError("--flush-interval is a number of writes, for write runs (-w)")
    if not spec.drain and not spec.flush_interval:
        raise ImageError("--no-drain is for the flushes of --flush-interval")
    driver = await open_for_cache(path, cache, fmt=fmt, read_only=not spec.write, rules=rules)
    backend = Backend(driver, read_only=not spec.write)
    try:
        image = backend.size
        if spec.offset < 0 or spec.offset + spec.size > image:
            raise ImageError(
                f"a {spec.size}-byte request at offset {spec.offset} does not fit the "
                f"{image}-byte image"
            )
        data = bytes([spec.pattern]) * spec.size
        step = spec.size if spec.step is None else spec.step
        offsets = _offsets(spec.offset, step, spec.size, image)
        left = spec.count
        interval = spec.flush_interval
        done = 0
        undrained: list[asyncio.Future[None]] = []

        async def worker(batch: list[int]) -> None:
            nonlocal left, done
            while batch[0] > 0:
                batch[0] -= 1
                left -= 1
                pos = next(offsets)
                if not spec.write:
                    await backend.pread(pos, spec.size)
                    continue
                await backend.pwrite(pos, data)
                done += 1
                if interval and not spec.drain and done % interval == 0:
                    undrained.append(asyncio.ensure_future(backend.flush()))

        t0 = time.perf_counter()
        while left > 0:
            # Drained: one batch of `interval` requests, all done, then its FLUSH.
            batch = [min(left, interval) if interval and spec.drain else left]
            last = batch[0] == left
            await asyncio.gather(*(worker(batch) for _ in range(spec.depth)))
            if interval and spec.drain and not last:
                await backend.flush()
        await asyncio.gather(*undrained)
        if spec.write:
            await backend.flush()
        return time.perf_counter() - t0
    finally:
        await backend.close()


def _offsets(start: int, step: int, size: int, image: int) -> Iterator[int]:
    pos = start
    while True:
        yield pos
        pos = 0 if image <= size else (pos + step) % (image - size)
