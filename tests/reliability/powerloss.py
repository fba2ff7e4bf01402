"""Simulated power loss under the qcow driver (issue 18): the states a crash may leave.

``record`` runs a seeded guest workload (allocating writes, overwrites, FUA writes,
flushes, zeroing, trims, a few concurrent batches, then a clean close) through the
qcow driver, with a PowerLossRecorder (formats/filters/powerloss.py) between the format
and its file. Each guest operation is marked in the recorder's timeline when it is
issued and when it is acknowledged. ``check_states`` then materialises crash states,
the durable writes plus any subset of the others, some torn, and checks each:

- ``tapnbd check`` finds no corruption (0 clean, 3 leaks, 4 stale checksum: what a
  crash may leave);
- the image opens with tapnbd's qcow driver;
- every guest write acknowledged before a FLUSH that then completed, or acknowledged
  with FUA, reads back, and no sector holds data never written there: each sector reads
  as its last durable content or anything written after it (zeros if nothing durable);
- every ``qemu_every``-th state: ``qemu-img convert`` reads the same bytes (qemu-img
  check does not support qcow v1).

Every sector a guest write puts down is stamped with the operation's number and the
sector's own number, so a misplaced or stale sector is recognised.

``make crash`` runs thousands of states::

    python -m tests.reliability.powerloss --states 3000 [--layout normal] [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from formats import open_image
from formats.filters import at_file_layer
from formats.filters.powerloss import CrashState, PowerLossRecorder
from formats.qcow.check import check_qcow
from formats.qcow.create import create_qcow
from tapnbd.driver import Driver

SECTOR = 512
SIZE = 8 << 20
LAYOUTS = {"optimised": True, "normal": False}
#: ``tapnbd check`` exit codes a power cut may leave: clean, leaked clusters, stale checksum.
CHECK_OK = (0, 3, 4)
#: A sector's value in the model: 0 is zeros, n > 0 is guest operation n - 1's stamp.
ZERO = 0
ZERO_SECTOR = bytes(SECTOR)


@dataclass(frozen=True)
class GuestOp:
    kind: str  # write | zero | trim | flush
    offset: int = 0
    length: int = 0
    fua: bool = False
    #: write: try the synchronous path first, as the Backend does; zero: holes allowed.
    nowait: bool = False


def stamp(op: int, sector: int) -> bytes:
    """What guest operation ``op`` writes to ``sector``."""
    return struct.pack("<QQ", op + 1, sector) * (SECTOR // 16)


def workload(rng: random.Random, count: int) -> list[list[GuestOp]]:
    """Batches of guest operations; the writes of a batch never overlap."""
    written: list[tuple[int, int]] = []
    batches: list[list[GuestOp]] = []
    sectors = SIZE // SECTOR
    while sum(len(b) for b in batches) < count:
        r = rng.random()
        if r < 0.12:
            batches.append([GuestOp("flush")])
            continue
        n = 2 + rng.randrange(3) if r < 0.3 else 1
        batch: list[GuestOp] = []
        used: set[int] = set()
        for _ in range(n):
            if written and rng.random() < 0.4:  # overwrite something written before
                start, length = rng.choice(written)
                start += rng.randrange(length)
            else:
                start = rng.randrange(sectors)
            length = min(rng.choice((1, 1, 3, 8, 8, 16, 40, 128)), sectors - start)
            span = set(range(start, start + length))
            if span & used:
                continue
            used |= span
            k = rng.random()
            kind = "zero" if k < 0.07 else "trim" if k < 0.12 else "write"
            fua = rng.random() < 0.1
            batch.append(GuestOp(kind, start * SECTOR, length * SECTOR, fua, rng.random() < 0.5))
            if kind == "write":
                written.append((start, length))
        batches.append(batch)
    return batches


async def _do(d: Driver, i: int, op: GuestOp) -> None:
    if op.kind == "flush":
        await d.flush()
    elif op.kind == "zero":
        try:
            await d.zero(op.offset, op.length, may_trim=op.nowait, fua=op.fua, fast=False)
        except OSError as e:
            if e.errno != errno.ENOTSUP:
                raise
            # What the Backend does when the file cannot zero (tmpfs: no ZERO_RANGE).
            await d.pwrite(op.offset, bytes(op.length), op.fua)
    elif op.kind == "trim":
        await d.trim(op.offset, op.length, op.fua)
    else:
        first = op.offset // SECTOR
        data = b"".join(stamp(i, first + s) for s in range(op.length // SECTOR))
        if op.nowait and not op.fua and d.pwrite_nowait(op.offset, data):
            return
        await d.pwrite(op.offset, data, op.fua)


@dataclass
class Recording:
    layout: str
    seed: int
    ops: list[GuestOp]
    recorder: PowerLossRecorder


async def record(image: Path, layout: str, seed: int, count: int = 150) -> Recording:
    """Create ``image``, run the seeded workload on it through a recorder, close it."""
    # Every other seed: small clusters, for more L1 slots (more tables allocated).
    cluster = 1024 if seed % 2 else None
    await create_qcow(str(image), SIZE, optimise=LAYOUTS[layout], cluster_size=cluster)
    base = image.read_bytes()
    recorders: list[PowerLossRecorder] = []

    def wrap(child: Driver) -> Driver:
        recorders.append(PowerLossRecorder(child, base))
        return recorders[-1]

    with at_file_layer(wrap):
        d = await open_image(str(image))
    rec = recorders[0]
    ops: list[GuestOp] = []

    async def run_op(i: int, op: GuestOp) -> None:
        rec.mark(("issue", i))
        await _do(d, i, op)
        rec.mark(("ack", i))

    try:
        for batch in workload(random.Random(seed), count):
            first = len(ops)
            ops.extend(batch)
            await asyncio.gather(*(run_op(first + j, op) for j, op in enumerate(batch)))
    finally:
        await d.close()
    return Recording(layout, seed, ops, rec)


def allowed(rec: Recording, point: int) -> dict[int, set[int]]:
    """Per guest sector touched before ``point``: the values it may hold (the model)."""
    issued: list[int] = []
    acked: set[int] = set()
    durable: set[int] = set()
    covers: dict[int, set[int]] = {}  # guest flush -> the writes acknowledged before it
    for ev in rec.recorder.events[:point]:
        if ev.kind != "mark":
            continue
        assert isinstance(ev.label, tuple)
        what: str = ev.label[0]
        i: int = ev.label[1]
        op = rec.ops[i]
        if what == "issue":
            issued.append(i)
            if op.kind == "flush":
                covers[i] = set(acked)
        else:
            acked.add(i)
            if op.kind == "flush":
                durable |= covers[i]
            elif op.fua:
                durable.add(i)
    # Per sector, in issue order: a write that is sure starts the set again, any other
    # adds to it; a sector no sure write touched may still be zeros.
    out: dict[int, set[int]] = {}
    for i in issued:
        op = rec.ops[i]
        if op.kind == "flush":
            continue
        value = i + 1 if op.kind == "write" else ZERO
        # TRIM leaves the contents undefined: never a promise.
        sure = i in durable and op.kind != "trim"
        for s in range(op.offset // SECTOR, (op.offset + op.length) // SECTOR):
            if sure:
                out[s] = {value}
            elif (values := out.get(s)) is not None:
                values.add(value)
            else:
                out[s] = {ZERO, value}
    return out


def decode(sector: int, data: bytes) -> int | None:
    """The model value of a sector's content, or None if it is nobody's stamp."""
    if data == ZERO_SECTOR:
        return ZERO
    op, where = struct.unpack_from("<QQ", data)
    if where != sector or op == 0 or data != stamp(op - 1, sector):
        return None
    return int(op)


@dataclass
class Verdict:
    states: int = 0
    qemu_checked: int = 0
    promised: int = 0  # sectors the model allowed exactly one value for
    failures: list[str] = field(default_factory=list)


async def check_state(
    rec: Recording, state: CrashState, path: Path, qemu: bool, v: Verdict
) -> None:
    """Materialise ``state`` at ``path`` and check it (see the module docstring)."""
    path.write_bytes(rec.recorder.materialise(state))
    where = f"{rec.layout} seed={rec.seed} point={state.point} ({state.how})"
    v.states += 1
    res = await check_qcow(str(path))
    if res.exit_code not in CHECK_OK:
        msgs = res.check_errors + res.corruptions
        v.failures.append(f"{where}: tapnbd check exit {res.exit_code}: {msgs[:3]}")
        return
    try:
        d = await open_image(str(path), read_only=True)
    except Exception as e:
        v.failures.append(f"{where}: does not open: {e}")
        return
    try:
        data = bytes(await d.pread(0, SIZE))
    except OSError as e:
        v.failures.append(f"{where}: read failed: {e}")
        return
    finally:
        await d.close()
    model = allowed(rec, state.point)
    bad: list[str] = []
    rest = bytearray(data)
    for s, values in model.items():
        a = s * SECTOR
        got = decode(s, data[a : a + SECTOR])
        if got not in values:
            what = "garbage" if got is None else "zeros" if got == ZERO else f"op {got - 1}"
            bad.append(f"sector {s}: {what}, allowed {sorted(x - 1 for x in values)} (-1: zeros)")
        v.promised += len(values) == 1
        rest[a : a + SECTOR] = ZERO_SECTOR
    if rest != bytes(len(rest)):
        first = next(i for i, b in enumerate(rest) if b)
        bad.append(f"sector {first // SECTOR}: data where nothing was written")
    if bad:
        v.failures.append(f"{where}: {len(bad)} bad sectors: {bad[:3]}")
    if qemu:
        v.qemu_checked += 1
        out = path.with_suffix(".raw")
        proc = subprocess.run(
            ["qemu-img", "convert", "-f", "qcow", "-O", "raw", str(path), str(out)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            v.failures.append(f"{where}: qemu-img convert: {proc.stderr.strip()}")
        elif out.read_bytes() != data:
            v.failures.append(f"{where}: qemu-img reads other bytes than tapnbd")
        out.unlink(missing_ok=True)


async def check_states(
    rec: Recording, work: Path, states: int, qemu_every: int = 0, seed: int = 0
) -> Verdict:
    """Check ``states`` crash states of ``rec`` (qemu-img on every ``qemu_every``-th)."""
    v = Verdict()
    rng = random.Random(seed)
    for k, state in enumerate(rec.recorder.states(rng, states)):
        qemu = qemu_every > 0 and k % qemu_every == 0
        await check_state(rec, state, work / "state.qcow", qemu, v)
    return v


async def run_layout(
    layout: str, seed: int, states: int, qemu_every: int, work: Path, count: int = 150
) -> Verdict:
    rec = await record(work / "image.qcow", layout, seed, count)
    return await check_states(rec, work, states, qemu_every, seed)


def _tmpdir() -> str | None:
    """A RAM file system if there is one: states are written and read many times."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--states", type=int, default=3000, help="crash states per layout")
    ap.add_argument("--ops", type=int, default=400, help="guest operations per recording")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), action="append")
    ap.add_argument("--seed", type=int, help="the first recording's seed (default: random)")
    ap.add_argument("--recordings", type=int, default=5, help="recordings per layout")
    ap.add_argument("--qemu-every", type=int, default=20)
    a = ap.parse_args(argv)
    # Crash states with a stale L1 checksum are expected: no warning for each one.
    logging.getLogger("formats.qcow").setLevel(logging.ERROR)
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    print(f"power loss: seed {seed} (rerun with --seed {seed})", flush=True)
    failed = 0
    t0 = time.monotonic()
    for layout in a.layout or sorted(LAYOUTS):
        for r in range(a.recordings):
            s = seed + r
            with tempfile.TemporaryDirectory(prefix="powerloss-", dir=_tmpdir()) as tmp:
                v = asyncio.run(
                    run_layout(layout, s, a.states // a.recordings, a.qemu_every, Path(tmp), a.ops)
                )
            print(
                f"{layout} seed={s}: {v.states} states, {v.qemu_checked} through qemu-img, "
                f"{v.promised} promised sectors, {len(v.failures)} failures",
                flush=True,
            )
            for f in v.failures[:10]:
                print("  " + f)
            failed += bool(v.failures)
    print(f"{time.monotonic() - t0:.0f} s; {'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
