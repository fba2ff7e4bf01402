"""``tapnbd bench``: a queue of reads or writes straight to an image's driver stack, as
``qemu-img bench`` runs them (no NBD between).

``count`` requests of ``size`` bytes, ``depth`` of them in flight, the first at
``offset`` and each next one ``step`` further on, wrapping as qemu-img has since 2025
(commit ff2ab634: ``offset %= image size - size``; before, it wrapped modulo the whole
size and a request could run past the end). Writes carry ``pattern`` in every byte and end with
a FLUSH. Every request goes through the Backend, as a client's would, so the time
includes its checks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

from formats import OpenRules, open_image
from tapnbd.backend import Backend
from tapnbd.errors import ImageError


@dataclass(frozen=True)
class BenchSpec:
    count: int = 75000
    depth: int = 64
    size: int = 4096
    step: int | None = None  # None: the request size
    offset: int = 0
    write: bool = False
    pattern: int = 0

    def describe(self) -> str:
        """qemu-img bench's first line."""
        return (
            f"Sending {self.count} {'write' if self.write else 'read'} requests, {self.size} "
            f"bytes each, {self.depth} in parallel (starting at offset {self.offset}, step "
            f"size {self.size if self.step is None else self.step})"
        )


async def run_bench(path: str, spec: BenchSpec, *, fmt: str, rules: OpenRules) -> float:
    """Run ``spec`` against the image at ``path``; returns the seconds it took."""
    if spec.count < 0 or spec.depth < 1 or spec.size < 1 or not 0 <= spec.pattern <= 255:
        raise ImageError(
            "the count must be 0 or more, the depth and size 1 or more, and the pattern 0 to 255"
        )
    driver = await open_image(path, fmt=fmt, read_only=not spec.write, rules=rules)
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

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                pos = next(offsets)
                if spec.write:
                    await backend.pwrite(pos, data)
                else:
                    await backend.pread(pos, spec.size)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(spec.depth)))
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
