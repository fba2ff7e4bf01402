"""formats.direct.DirectFile: O_DIRECT under any request, aligned or not.

Seeded random requests, some concurrent and sharing blocks, go to a DirectFile and to
a bytearray model; the file must read back as the model, through the driver and
through a plain read of the file, and keep its size (also when that size is not a
multiple of the block).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
from pathlib import Path

import pytest

from formats import open_image
from formats.direct import ALIGN, DirectFile, direct_files
from formats.raw import RawDriver
from tapnbd.backend import Backend


def seeded() -> random.Random:
    seed = random.SystemRandom().randrange(1 << 30)
    print("seed", seed)
    return random.Random(seed)


@pytest.mark.parametrize("size", [1 << 20, 1_000_001])
async def test_random_requests_read_back_and_keep_the_size(tmp_path: Path, size: int) -> None:
    path = tmp_path / "a.raw"
    rng = seeded()
    model = bytearray(rng.randbytes(size))
    path.write_bytes(model)
    with direct_files():
        d = await open_image(str(path), fmt="raw")
    assert isinstance(d, DirectFile)
    assert fcntl.fcntl(d.fd, fcntl.F_GETFL) & os.O_DIRECT
    backend = Backend(d)
    for _ in range(40):
        # A few writes in flight together, often in one block, never on the same bytes
        # (their order would be the model's guess).
        batch = []
        taken: list[tuple[int, int]] = []
        for _ in range(rng.randint(1, 4)):
            off = rng.randrange(size)
            n = rng.randint(1, min(3 * ALIGN, size - off))
            if rng.random() < 0.3:
                off = size - n  # the end of the file, unaligned for the odd size
            if any(off < e and s < off + n for s, e in taken):
                continue
            taken.append((off, off + n))
            data = rng.randbytes(n)
            model[off : off + n] = data
            batch.append(backend.pwrite(off, data, fua=rng.random() < 0.2))
        await asyncio.gather(*batch)
        off = rng.randrange(size)
        n = rng.randint(1, min(2 * ALIGN, size - off))
        assert bytes(await backend.pread(off, n)) == model[off : off + n]
    await backend.flush()
    assert os.path.getsize(path) == size
    assert path.read_bytes() == model
    await d.close()


async def test_concurrent_writes_sharing_a_block_keep_both(tmp_path: Path) -> None:
    """Two writes into one 4 KiB block, in flight together: the read-modify-write of one
    must not bring back the other's old bytes."""
    path = tmp_path / "a.raw"
    path.write_bytes(bytes(4 * ALIGN))
    with direct_files():
        d = await open_image(str(path), fmt="raw")
    await asyncio.gather(*(d.pwrite(i * 512, bytes([i + 1]) * 512) for i in range(8)))
    assert path.read_bytes()[:ALIGN] == b"".join(bytes([i + 1]) * 512 for i in range(8))
    await d.close()


async def test_a_qcow2_image_over_direct_files(tmp_path: Path) -> None:
    """A format's file is direct too, and growing it races no write past its end."""
    from formats.qcow2.create import create_qcow2

    path = tmp_path / "a.qcow2"
    await create_qcow2(str(path), 8 << 20)
    with direct_files():
        d = await open_image(str(path), fmt="qcow2")
    child = d.child  # type: ignore[attr-defined]
    assert isinstance(child, DirectFile)
    rng = seeded()
    model = bytearray(8 << 20)
    writes = []
    for _ in range(32):
        off, n = rng.randrange(8 << 20), rng.randint(1, 70000)
        n = min(n, (8 << 20) - off)
        data = rng.randbytes(n)
        model[off : off + n] = data
        writes.append((off, data))
    for off, data in writes:
        await d.pwrite(off, data)
    await d.close()
    plain = await open_image(str(path), fmt="qcow2", read_only=True)
    assert type(plain.child) is RawDriver  # type: ignore[attr-defined]
    assert bytes(await plain.pread(0, 8 << 20)) == model
    await plain.close()
