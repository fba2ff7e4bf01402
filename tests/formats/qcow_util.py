"""Helpers for the qcow tests: qemu-img/qemu-io as the referee, image builders."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from formats import OpenRules, open_image
from formats.qcow import QcowDriver
from formats.qcow.create import create_qcow
from formats.qcow.layout import HEADER_SIZE, QcowHeader
from tests import helpers

if TYPE_CHECKING:
    from tapnbd.driver import Driver

MiB = 1 << 20


def need(*tools: str) -> None:
    """Skip unless every tool is installed (``make deps`` installs them)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def run(*cmd: str | Path, check: bool = True, timeout: float = 120) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout + proc.stderr


def qemu_io(image: Path | str, *commands: str, fmt: str = "qcow") -> str:
    """tests.helpers.qemu_io, on qcow images by default."""
    return helpers.qemu_io(image, *commands, fmt=fmt)


def qemu_img(*args: str | Path, check: bool = True) -> str:
    need("qemu-img")
    return run("qemu-img", *args, check=check)


def data_bytes(image: Path, fmt: str, start: int = 0) -> int:
    """Bytes of the runs from ``start`` on that qemu-img map calls data (a raw file's
    holes are found with SEEK_DATA)."""
    runs = json.loads(qemu_img("map", "--output=json", "-f", fmt, image))
    return sum(e["length"] for e in runs if e["data"] and e["start"] >= start)


#: The key of the encrypted test images, as qemu's --object.
SECRET = "secret,id=sec0,data=123456"


def create_encrypted(img: Path, opts: str, size: str, fmt: str = "qcow2") -> None:
    """qemu-img create of an encrypted image (``opts``: encrypt.format=... and more),
    its key ``SECRET``."""
    need("qemu-img")
    cmd = ["qemu-img", "create", "-q", "--object", SECRET, "-f", fmt,
           "-o", f"{opts},encrypt.key-secret=sec0", str(img), size]  # fmt: skip
    for _ in range(10):
        # qemu before 9.2.1 can fail its PBKDF benchmark on a busy or fast machine
        # ("Unable to get accurate CPU usage", qemu commit "crypto: fix bogus error
        # benchmarking pbkdf on fast machines"): that is qemu's to retry, not ours.
        made = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if made.returncode == 0 or "accurate CPU usage" not in made.stderr:
            break
    else:
        # Ten in a row (CI124, under the other worker's load): this qemu-img cannot make
        # the image here and now, which says nothing of tapnbd.
        pytest.skip(f"qemu-img could not make the encrypted image: {made.stderr.strip()}")
    assert made.returncode == 0, made.stderr


def compare(image: Path | str, raw: Path | str, fmt: str = "qcow") -> None:
    """qemu-img compare: the qcow image reads exactly like the raw reference."""
    qemu_img("compare", "-f", fmt, "-F", "raw", image, raw)


async def make_qcow(
    path: Path,
    size: int | None = 64 * MiB,
    *,
    optimise: bool = True,
    backing: Path | None = None,
    cluster_size: int | None = None,
    reserve: bool = False,
) -> Path:
    await create_qcow(
        str(path),
        size,
        backing=str(backing) if backing else None,
        optimise=optimise,
        cluster_size=cluster_size,
        reserve=reserve,
        rules=OpenRules(allow_probed_backing=True),  # the test made the chain
    )
    return path


async def open_qcow(
    path: Path | str, *, read_only: bool = False, share: bool = False
) -> QcowDriver:
    # The tests make their chains themselves: they vouch for every header in them.
    rules = OpenRules(allow_probed_backing=True, share=share)
    driver = await open_image(str(path), fmt="qcow", read_only=read_only, rules=rules)
    assert isinstance(driver, QcowDriver)
    return driver


def make_raw(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def write_raw(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def read_header(path: Path) -> QcowHeader:
    with open(path, "rb") as f:
        return QcowHeader.parse(f.read(HEADER_SIZE))


def patch(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes of an image file (to corrupt it)."""
    write_raw(path, offset, data)


def random_writes(
    rng: random.Random, size: int, count: int, max_len: int = 256 << 10
) -> list[tuple[int, bytes]]:
    """Writes of assorted sizes and alignments, some crossing L1 slots (2 MiB)."""
    out = []
    for _ in range(count):
        n = rng.choice([512, 4096, 4096, 65536, rng.randrange(1, max_len)])
        off = rng.randrange(0, size - n)
        if rng.random() < 0.5:
            off &= ~4095
        out.append((off, rng.randbytes(n)))
    return out


def crash_states(
    start: bytes,
    change: Callable[[], Awaitable[object]],
    state: Path,
    seed: int,
    count: int,
) -> Iterator[str]:
    """Run ``change`` with the power-loss recorder between every image it opens and its
    file (the first one opened is the one judged), then write ``count`` crash states of
    it to ``state`` one after the other, yielding a description of each; then, always,
    the state after the last event with only what was made durable (a cut once
    ``change`` is done), so a test that wants to see the end does not hang on the seed."""
    import asyncio

    from formats.filters import at_file_layer
    from formats.filters.powerloss import CrashState, PowerLossRecorder

    recorders: list[PowerLossRecorder] = []

    def wrap(child: Driver) -> Driver:
        recorders.append(PowerLossRecorder(child, start))
        return recorders[-1]

    async def run_it() -> None:
        with at_file_layer(wrap):
            await change()

    asyncio.run(run_it())
    rec = recorders[0]
    rng = random.Random(seed)
    end = CrashState(len(rec.events), frozenset(), how="after the end, durable only")
    for st in [*rec.states(rng, count), end]:
        state.write_bytes(rec.materialise(st))
        yield f"seed={seed} point={st.point} ({st.how})"


def tapnbd_out(*args: str | Path, check: bool = True) -> str:
    """Run ``tapnbd ARGS``: its stdout and stderr together (it must succeed, unless
    ``check`` is false)."""
    r = helpers.run(helpers.tapnbd_cmd(*map(str, args)), check=False)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr
