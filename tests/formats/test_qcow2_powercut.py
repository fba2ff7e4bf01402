"""Simulated power cuts under the qcow2 driver: what survives is judged by qemu.

The driver writes its image through a recorder that logs every write, punch and sync
it sends to the file. A power cut at op ``k`` leaves on disk what was synced before
``k`` plus any subset of the writes issued since (the page cache may have written back
any of them, in any order). For many cuts of one seeded run, that image must pass
``qemu-img check`` with exit 0 or 3 (leaks only, never corruption), and qemu's reading
of it must hold every guest write completed before the last completed FLUSH; other
blocks hold some write made to them, never garbage. A kill -9 cannot test this: the
page cache survives a dead process.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from formats.filters import FilterDriver
from formats.qcow2 import open_qcow2
from formats.qcow2.driver import Qcow2Driver
from formats.raw import RawDriver
from tests.formats.qcow_util import need, qemu_img

BLOCK = 4096
SIZE = 16 << 20


class Recorder(FilterDriver):
    """Logs what reaches the file: ("w", off, data), ("punch", off, n), ("sync",)."""

    def __init__(self, child: RawDriver, log: list[tuple[object, ...]]) -> None:
        super().__init__(child)
        self.log = log

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self.log.append(("w", offset, bytes(data)))
        await self.child.pwrite(offset, data, fua)
        if fua:
            self.log.append(("sync",))

    def pwrite_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        return False  # every write goes through pwrite, to be logged

    async def flush(self) -> None:
        await self.child.flush()
        self.log.append(("sync",))

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.log.append(("punch", offset, length))
        await self.child.trim(offset, length, fua)

    def grow(self, length: int, *, allocate: bool = False) -> None:
        assert isinstance(self.child, RawDriver)
        self.child.grow(length, allocate=allocate)


def _tag(wid: int) -> bytes:
    return wid.to_bytes(8, "big") * (BLOCK // 8)


async def _run_load(img: Path, seed: int) -> tuple[list[tuple[object, ...]], list[dict[str, Any]]]:
    """Random guest writes, zeroes, trims and flushes; returns the op log and, per guest
    op, which blocks it set to which tag and the op-log positions it spans."""
    rng = random.Random(seed)
    log: list[tuple[object, ...]] = []
    from formats.qcow import file_filter

    token = file_filter.set(lambda d: Recorder(d, log) if isinstance(d, RawDriver) else d)
    try:
        d = await open_qcow2(str(img), False)
    finally:
        file_filter.reset(token)
    assert isinstance(d, Qcow2Driver)
    guest: list[dict[str, Any]] = []
    blocks = SIZE // BLOCK
    wid = 0
    for _ in range(300):
        r = rng.random()
        start = len(log)
        if r < 0.08:
            await d.flush()
            guest.append({"kind": "flush", "start": start, "end": len(log)})
            continue
        b = rng.randrange(blocks - 8)
        n = rng.randrange(1, 9)
        if r < 0.8:
            wid += 1
            # Concurrent writes, as a client's queue depth makes them.
            await asyncio.gather(*(d.pwrite((b + i) * BLOCK, _tag(wid * 16 + i)) for i in range(n)))
            guest.append(
                {
                    "kind": "write",
                    "block": b,
                    "n": n,
                    "tag": wid * 16,
                    "start": start,
                    "end": len(log),
                }
            )
        else:
            kind = "zero" if r < 0.9 else "trim"
            if kind == "zero":
                # NO_HOLE half the time: data clusters are kept, flagged zero.
                keep = rng.random() < 0.5
                await d.zero(b * BLOCK, n * BLOCK, may_trim=not keep, fua=False, fast=False)
            else:
                await d.trim(b * BLOCK, n * BLOCK)
            guest.append(
                {"kind": kind, "block": b, "n": n, "tag": 0, "start": start, "end": len(log)}
            )
    await d.close()
    return log, guest


def _image_at(base: bytes, log: list[tuple[object, ...]], k: int, rng: random.Random) -> bytearray:
    """The file after a power cut at op ``k``: synced ops, plus a random subset after."""
    last_sync = max((i for i in range(k) if log[i][0] == "sync"), default=-1)
    img = bytearray(base)
    for i in range(k):
        op = log[i]
        if i > last_sync and rng.random() < 0.5:
            continue  # not written back before the power went
        if op[0] == "w":
            off, data = op[1], op[2]
            assert isinstance(off, int) and isinstance(data, bytes)
            if len(img) < off + len(data):
                img.extend(bytes(off + len(data) - len(img)))
            img[off : off + len(data)] = data
        elif op[0] == "punch":
            off, n = op[1], op[2]
            assert isinstance(off, int) and isinstance(n, int)
            img[off : off + n] = bytes(len(img[off : off + n]))
    return img


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
async def test_power_cut_leaves_only_leaks(tmp_path: Path, cluster_size: int) -> None:
    need("qemu-img")
    seed = random.randrange(1 << 32)
    print("seed", seed)
    img = tmp_path / "p.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", img, str(SIZE))
    base = img.read_bytes()
    work = tmp_path / "work.qcow2"
    shutil.copy(img, work)
    log, guest = await _run_load(work, seed)
    rng = random.Random(seed)
    syncs = [i for i, op in enumerate(log) if op[0] == "sync"]
    cuts = sorted({rng.randrange(len(log) + 1) for _ in range(30)} | {syncs[-1] + 1, len(log)})
    for k in cuts:
        cut = tmp_path / "cut.qcow2"
        cut.write_bytes(_image_at(base, log, k, rng))
        proc = subprocess.run(
            ["qemu-img", "check", "--output=json", str(cut)], capture_output=True, text=True
        )
        assert proc.returncode in (0, 3), f"cut at {k}/{len(log)}: {proc.stdout}{proc.stderr}"
        assert not json.loads(proc.stdout).get("corruptions"), proc.stdout
        raw = tmp_path / "cut.raw"
        qemu_img("convert", "-f", "qcow2", "-O", "raw", cut, raw)
        data = raw.read_bytes()
        # What each block may hold: its value at the last FLUSH completed before the
        # cut, or anything written to it since (a trim may or may not zero it).
        state: dict[int, set[int]] = {}
        durable: dict[int, set[int]] = {}
        since: dict[int, set[int]] = {}
        for g in guest:
            if g["start"] >= k:
                break
            completed = g["end"] <= k
            if g["kind"] == "flush":
                if completed:
                    durable = {b: set(v) for b, v in state.items()}
                    since = {}
                continue
            for i in range(g["n"]):
                b = g["block"] + i
                tag = g["tag"] + i if g["kind"] == "write" else 0
                since.setdefault(b, set()).add(tag)
                if completed:
                    trimmed = g["kind"] == "trim"
                    state[b] = (state.get(b, {0}) | {0}) if trimmed else {tag}
        allowed = {b: durable.get(b, {0}) | since.get(b, set()) for b in set(durable) | set(since)}
        for b, tags in allowed.items():
            got = data[b * BLOCK : (b + 1) * BLOCK]
            ok = [t for t in tags if got == (_tag(t) if t else bytes(BLOCK))]
            assert ok, f"cut at {k}/{len(log)}: block {b} holds none of {sorted(tags)}"
