"""Turning a fuzzer's byte string into choices, and a small mutator for runs without atheris.

``Source`` reads integers and byte runs from the input and never fails: past the end it
yields zeros, so every input, however short, is a complete test case (atheris's
FuzzedDataProvider does the same; this one has no dependency).
"""

from __future__ import annotations

import random
from typing import TypeVar

T = TypeVar("T")


class Source:
    """Choices read off a byte string, front to back."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes).ljust(nbytes, b"\0"), "big")

    def below(self, n: int) -> int:
        """A number in [0, n)."""
        return self.uint(1 if n <= 256 else 2 if n <= 65536 else 4) % n

    def pick(self, items: tuple[T, ...] | list[T]) -> T:
        return items[self.below(len(items))]

    def chance(self, of256: int) -> bool:
        """True with probability of256/256 (for random bytes)."""
        return self.uint(1) < of256


def mutate(data: bytes, rng: random.Random, max_len: int = 4096) -> bytes:
    """One mutation of ``data`` in the manner of libFuzzer's basic mutators."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        if op == 0 or not buf:  # insert random bytes
            at = rng.randint(0, len(buf))
            buf[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 1:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 2:  # set a byte to a boundary value
            buf[rng.randrange(len(buf))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        elif op == 3:  # erase a range
            i = rng.randrange(len(buf))
            del buf[i : i + rng.randint(1, 16)]
        elif op == 4:  # duplicate a range elsewhere
            i = rng.randrange(len(buf))
            piece = buf[i : i + rng.randint(1, 32)]
            at = rng.randint(0, len(buf))
            buf[at:at] = piece
        elif op == 5:  # random byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        else:  # overwrite 4 bytes with an interesting integer
            i = rng.randrange(len(buf))
            v = rng.choice((0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 4096, 65536))
            buf[i : i + 4] = v.to_bytes(4, "big")
    return bytes(buf[:max_len])
