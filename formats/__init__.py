"""Disk formats: a registry, probing by score, and ``open_image``.

Probing is a contest of scores, as in QEMU's block layer: each format scores the first
bytes of an image, and the highest wins. raw scores 1 so that it wins only when nothing
else claims the image (QEMU raw_probe).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tapnbd.driver import Driver
from tapnbd.errors import ImageError

#: Bytes read from the start of an image for probing.
PROBE_SIZE = 512


@dataclass(frozen=True)
class Format:
    """One registered format."""

    name: str
    probe: Callable[[bytes], int]
    open: Callable[[str, bool], Awaitable[Driver]]


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> None:
    FORMATS[fmt.name] = fmt


def parse_size(text: str) -> int:
    """Parse ``1G``, ``512M``, ``4096`` (binary units, as qemu-img does)."""
    units = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B") if text else ""
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = int(float(num) * units[unit])
    except ValueError:
        raise ImageError(f"invalid size {text!r}: expected a number with K, M, G or T") from None
    if value <= 0:
        raise ImageError(f"invalid size {text!r}: must be positive")
    return value


def probe(path: str) -> str:
    """The name of the format that scores highest on ``path``'s first bytes."""
    try:
        with open(path, "rb") as f:
            header = f.read(PROBE_SIZE)
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror}") from None
    name, score = max(((f.name, f.probe(header)) for f in FORMATS.values()), key=lambda x: x[1])
    if score <= 0:
        raise ImageError(f"{path}: unknown image format")
    return name


async def open_image(spec: str, *, fmt: str = "auto", read_only: bool = False) -> Driver:
    """Open ``spec`` (a path, or ``ram:SIZE``) as a driver stack."""
    if spec.startswith("ram:"):
        from formats.ram import RamDriver

        return RamDriver(parse_size(spec[4:]))
    if not os.path.exists(spec):
        raise ImageError(f"{spec}: no such file or device")
    name = probe(spec) if fmt == "auto" else fmt
    if name not in FORMATS:
        raise ImageError(f"unknown format {fmt!r}; known: {', '.join(sorted(FORMATS))}")
    return await FORMATS[name].open(spec, read_only)


def _register_builtin() -> None:
    from formats import qcow, qcow2, raw

    register(Format("raw", raw.probe, raw.open_raw))
    if hasattr(qcow, "FORMAT"):
        register(qcow.FORMAT)
    register(qcow2.FORMAT)


_register_builtin()
