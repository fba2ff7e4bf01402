"""Mutate a dynamic VHD's footer/header/BAT (checksums redone), open it writable as vhd,
read and write all over, reopen: report any exception that is not an ImageError/OSError.

    PYTHONPATH=. python probes/vhd_fuzz.py BASE.vhd N [SEED]
"""

from __future__ import annotations

import asyncio
import random
import shutil
import sys
import traceback

from formats import open_image
from formats.vhd.layout import FOOTER_CHECKSUM_AT, HEADER_CHECKSUM_AT, checksum
from tapnbd.errors import ImageError

FOOTER_FIELDS = [
    (8, 4),
    (12, 4),
    (16, 8),
    (28, 4),
    (40, 8),
    (48, 8),
    (56, 2),
    (58, 1),
    (59, 1),
    (60, 4),
]
HEADER_FIELDS = [(8, 8), (16, 8), (24, 4), (28, 4), (32, 4), (40, 16), (64, 512)]
for i in range(8):
    HEADER_FIELDS += [(576 + 24 * i, 4), (576 + 24 * i + 8, 4), (576 + 24 * i + 16, 8)]

INTERESTING = [
    0,
    1,
    0x200,
    0x600,
    0x7FF,
    0xFFFFFFFF,
    0x80000000,
    0x1000,
    0x200000,
    0x57327275,
    0x57326B75,
    0x4D616358,
    0xFFFFFFFFFFFFFFFF,
    0x400000,
]


def mutate(data: bytearray, rng: random.Random) -> str:
    what = []
    for _ in range(rng.randint(1, 3)):
        region = rng.choice(["footer", "header", "bat", "bytes"])
        if region == "footer":
            off, n = rng.choice(FOOTER_FIELDS)
            v = rng.choice([*INTERESTING, rng.getrandbits(8 * n)]) & ((1 << 8 * n) - 1)
            for at in (0, len(data) - 512):
                data[at + off : at + off + n] = v.to_bytes(n, "big")
            what.append(f"footer+{off}={v:#x}")
        elif region == "header":
            off, n = rng.choice(HEADER_FIELDS)
            if n == 512:
                raw = rng.choice(
                    [
                        b"",
                        "../../etc/passwd".encode("utf-16-be"),
                        bytes([rng.getrandbits(8) for _ in range(16)]),
                    ]
                )
                data[512 + off : 512 + off + n] = raw.ljust(512, b"\0")
                what.append(f"pname={raw!r}")
            else:
                v = rng.choice([*INTERESTING, rng.getrandbits(8 * n)]) & ((1 << 8 * n) - 1)
                data[512 + off : 512 + off + n] = v.to_bytes(n, "big")
                what.append(f"header+{off}={v:#x}")
        elif region == "bat":
            i = rng.randrange(4)
            v = rng.choice([0, 1, 3, 7, 0xFFFFFFFF, rng.randrange(0, len(data) // 512)])
            data[1536 + 4 * i : 1536 + 4 * i + 4] = v.to_bytes(4, "big")
            what.append(f"bat[{i}]={v:#x}")
        else:
            at = rng.randrange(len(data))
            data[at] = rng.getrandbits(8)
            what.append(f"byte[{at}]")
    for at in (0, len(data) - 512):
        f = data[at : at + 512]
        data[at + FOOTER_CHECKSUM_AT : at + FOOTER_CHECKSUM_AT + 4] = checksum(
            f, FOOTER_CHECKSUM_AT
        ).to_bytes(4, "big")
    h = data[512:1536]
    data[512 + HEADER_CHECKSUM_AT : 512 + HEADER_CHECKSUM_AT + 4] = checksum(
        h, HEADER_CHECKSUM_AT
    ).to_bytes(4, "big")
    return " ".join(what)


async def exercise(path: str, rng: random.Random) -> None:
    try:
        d = await open_image(path, fmt="vhd")
    except ImageError:
        return
    try:
        size = d.size()
        if not size:
            return
        for _ in range(20):
            off = rng.randrange(size)
            n = min(size - off, rng.choice([1, 512, 4096, 70000, 3 << 20]))
            try:
                if rng.random() < 0.5:
                    await d.pread(off, n)
                else:
                    await d.pwrite(off, b"\x5a" * n)
                    await d.extents(off, n)
            except OSError:
                pass
        try:
            await d.flush()
        except OSError:
            pass
    finally:
        await d.close()
    try:
        d = await open_image(path, fmt="vhd", read_only=True)
        await d.close()
    except ImageError as e:
        print("  reopen refused:", e)


def main() -> None:
    base, n = sys.argv[1], int(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    with open(base, "rb") as f:
        src = f.read()
    for k in range(n):
        rng = random.Random(seed * 100000 + k)
        data = bytearray(src)
        what = mutate(data, rng)
        path = "/tmp/s32/fz.vhd"
        with open(path, "wb") as f:
            f.write(data)
        try:
            asyncio.run(exercise(path, rng))
        except Exception:
            print(f"case {k}: {what}")
            traceback.print_exc(limit=4)
            shutil.copy(path, f"/tmp/s32/crash{k}.vhd")


if __name__ == "__main__":
    main()
