"""Writes to VHDs: judged by qemu (``-f vpc``), fio's crc32c, a kill -9 and power cuts.

- the same seeded writes through ``tapnbd serve`` and by qemu-io on a copy give images
  that ``qemu-img compare`` finds equal;
- fio --verify=crc32c through tapnbd reads back every block it wrote;
- kill -9 of the server during a write load: the image opens, ``tapnbd check`` finds no
  corruption and every write acknowledged before a completed FLUSH reads back in qemu;
- simulated power cuts (formats/filters/powerloss.py): every crash state opens, and
  every sector holds what the model allows (flushed writes read back).
"""

from __future__ import annotations

import asyncio
import filecmp
import random
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from formats import open_image
from formats.filters import at_file_layer
from formats.filters.powerloss import PowerLossRecorder
from formats.vhd.check import check_vhd
from formats.vhd.create import create_vhd
from tapnbd.driver import Driver
from tests.formats.qcow_util import need, qemu_img, run
from tests.formats.vhd_util import SIZE, MiB, qemu_vhd
from tests.helpers import Server, fio_verify, qemu_io, start_server, tapnbd_cmd
from tests.reliability import powerloss as pl
from tests.reliability.crash import Round, fill_journal_figures, start_load, wait_load, wait_writing
from tests.reliability.model import verify


def _random_writes(rng: random.Random, size: int, count: int) -> list[str]:
    """qemu-io write commands: aligned and not, inside and across 2 MiB blocks."""
    cmds = []
    for k in range(count):
        length = rng.choice((512, 4096, 65536, 3 * MiB, rng.randrange(1, 9000)))
        off = rng.randrange(0, size - length)
        if rng.random() < 0.5:
            off -= off % 4096
        cmds.append(f"write -P {k % 250 + 1} {off} {length}")
    return cmds


@pytest.mark.parametrize("maker", ["qemu", "tapnbd", "qemu-fixed"])
def test_writes_match_qemu(
    tmp_path: Path, serve: Callable[..., Server], seed: int, maker: str
) -> None:
    print(f"seed {seed}")
    need("qemu-img", "qemu-io")
    ours, theirs = tmp_path / "ours.vhd", tmp_path / "theirs.vhd"
    if maker == "qemu":
        qemu_vhd(ours)
    elif maker == "qemu-fixed":
        qemu_vhd(ours, subformat="fixed")
    else:
        asyncio.run(create_vhd(str(ours), SIZE))
    shutil.copy(ours, theirs)
    cmds = _random_writes(random.Random(seed), SIZE, 40)
    server = serve(str(ours), "--format", "vhd")
    qemu_io(server.uri, *cmds, "flush")
    assert server.stop() == 0
    qemu_io(theirs, *cmds, fmt="vpc")
    qemu_img("compare", "-f", "vpc", "-F", "vpc", ours, theirs)
    res = asyncio.run(check_vhd(str(ours)))
    assert res.exit_code == 0, res.to_json()


def test_differencing_writes_match_qemu_reading(
    tmp_path: Path, serve: Callable[..., Server], seed: int
) -> None:
    """A differencing child written through tapnbd reads as its parent with the writes
    on top: qemu reads the parent, the same writes are made to a raw copy of it."""
    print(f"seed {seed}")
    base, top = tmp_path / "base.vhd", tmp_path / "top.vhd"
    qemu_vhd(base)
    qemu_io(base, "write -P 7 0 5M", "write -P 9 9M 3M", fmt="vpc")
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-f", "vpc", "-O", "raw", base, ref)
    asyncio.run(create_vhd(str(top), None, backing="base.vhd"))
    cmds = _random_writes(random.Random(seed), SIZE, 30)
    server = serve(str(top), "--format", "vhd")
    qemu_io(server.uri, *cmds, "flush")
    got = tmp_path / "got.raw"
    run("nbdcopy", server.uri, got)
    assert server.stop() == 0
    qemu_io(ref, *cmds, fmt="raw")
    assert got.read_bytes()[: ref.stat().st_size] == ref.read_bytes()


def test_fio_verify_through_tapnbd(tmp_path: Path, serve: Callable[..., Server]) -> None:
    img = tmp_path / "fio.vhd"
    asyncio.run(create_vhd(str(img), 64 * MiB))
    server = serve(str(img), "--format", "vhd")
    job = fio_verify(server.uri, "--rw=randwrite", "--bsrange=4k-256k", "--iodepth=8", "--size=48m")
    assert job["error"] == 0
    assert server.stop() == 0
    qemu_img("check", "-f", "vpc", img, check=False)  # vpc has no check; must not crash
    assert asyncio.run(check_vhd(str(img))).exit_code == 0


def test_kill9_during_writes(tmp_path: Path, seed: int) -> None:
    need("qemu-img", "nbdcopy")
    print(f"seed {seed}")
    rng = random.Random(seed)
    r = Round("vhd", seed, kill_after=rng.uniform(0.1, 0.6))
    image = tmp_path / "crash.vhd"
    run(*tapnbd_cmd("create", "--format", "vhd", "--size", "64M", str(image)))
    server = start_server([str(image), "--format", "vhd"], tmp_path / "server.log")
    out = tmp_path / "journal.json"
    load = start_load(server.uri, seed, out, 48 << 20)
    try:
        wait_writing(load, server.uri)
        time.sleep(r.kill_after)  # the moment of the crash, not a synchronisation
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        journal = wait_load(load, out)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
        server.stop()
    fill_journal_figures(r, journal)
    assert not r.failures, r.failures
    res = asyncio.run(check_vhd(str(image)))
    assert res.exit_code in (0, 3), res.to_json()
    qemu_raw = tmp_path / "qemu.raw"
    qemu_img("convert", "-f", "vpc", "-O", "raw", image, qemu_raw)
    v = verify(qemu_raw, journal, crashed=True)
    assert not v.failures, v.failures
    r.sectors, r.must, r.newer = v.sectors, v.must, v.newer
    assert r.durable > 0 and v.must > 0  # the check had flushed writes to hold to
    ours = tmp_path / "ours.raw"
    server = start_server([str(image), "--format", "vhd"], tmp_path / "reopen.log")
    try:
        run("nbdcopy", server.uri, ours)
    finally:
        assert server.stop() == 0
    assert filecmp.cmp(qemu_raw, ours, shallow=False)
    print(r.row())


#: What the parent of the differencing runs holds: a stamp no guest op makes.
PARENT_OP = 999_999
PARENT = PARENT_OP + 1  # its model value (pl.decode)


async def _record(image: Path, seed: int, parent: Path | None) -> pl.Recording:
    """The power-loss harness's seeded workload on a VHD (trims left out: not offered).

    Over a parent every sector holds a stamp of its own, so a sector that reads as
    zeros (a bitmap bit made durable before its data) is caught; zeroing is left out
    there, so that "nothing durable" in the model means the parent's stamp.
    """
    if parent is not None:
        await create_vhd(str(parent), pl.SIZE)
        p = await open_image(str(parent), fmt="vhd")
        sectors = pl.SIZE // 512
        await p.pwrite(0, b"".join(pl.stamp(PARENT_OP, s) for s in range(sectors)))
        await p.close()
        await create_vhd(str(image), None, backing=str(parent), block_size=512 * 1024)
    else:
        await create_vhd(str(image), pl.SIZE, block_size=(1 << 20) if seed % 2 else None)
    base = image.read_bytes()
    recorders: list[PowerLossRecorder] = []

    def wrap(child: Driver) -> Driver:
        if not recorders:  # the image's own file, not its parent's
            recorders.append(PowerLossRecorder(child, base))
            return recorders[-1]
        return child

    with at_file_layer(wrap):
        d = await open_image(str(image), fmt="vhd")
    rec = recorders[0]
    ops: list[pl.GuestOp] = []

    async def run_op(i: int, op: pl.GuestOp) -> None:
        rec.mark(("issue", i))
        await pl._do(d, i, op)
        rec.mark(("ack", i))

    try:
        for batch in pl.workload(random.Random(seed), 120):
            batch = [
                op for op in batch if op.kind != "trim" and (parent is None or op.kind != "zero")
            ]
            first = len(ops)
            ops.extend(batch)
            await asyncio.gather(*(run_op(first + j, op) for j, op in enumerate(batch)))
    finally:
        await d.close()
    return pl.Recording("vhd", seed, ops, rec)


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_power_cuts(tmp_path: Path, seed: int, kind: str) -> None:
    """Crash states of a seeded run: each opens and holds what the model allows."""
    print(f"seed {seed}")
    image = tmp_path / "image.vhd"
    parent = tmp_path / "parent.vhd" if kind == "differencing" else None

    async def main() -> list[str]:
        rec = await _record(image, seed, parent)
        failures: list[str] = []
        state_path = tmp_path / "state.vhd"
        rng = random.Random(seed)
        states = 0
        for k, state in enumerate(rec.recorder.states(rng, 60)):
            states += 1
            state_path.write_bytes(rec.recorder.materialise(state))
            where = f"seed={seed} point={state.point} ({state.how})"
            res = await check_vhd(str(state_path))
            if res.exit_code not in (0, 3):
                failures.append(f"{where}: check exit {res.exit_code}: {res.corruptions[:2]}")
                continue
            try:
                d = await open_image(str(state_path), fmt="vhd", read_only=True)
            except Exception as e:
                failures.append(f"{where}: does not open: {e}")
                continue
            try:
                data = bytes(await d.pread(0, pl.SIZE))
            finally:
                await d.close()
            model = pl.allowed(rec, state.point)
            under = PARENT if parent is not None else pl.ZERO
            for s in range(pl.SIZE // 512):
                values = {under if v == pl.ZERO else v for v in model.get(s, {pl.ZERO})}
                got = pl.decode(s, data[s * 512 : (s + 1) * 512])
                if got not in values:
                    failures.append(f"{where}: sector {s}: {got} not in {sorted(values)}")
                    break
            if kind == "dynamic" and k % 15 == 0:
                out = tmp_path / "q.raw"
                qemu_img("convert", "-f", "vpc", "-O", "raw", state_path, out)
                if out.read_bytes() != data:
                    failures.append(f"{where}: qemu reads other bytes")
        assert states > 10
        return failures

    failures = asyncio.run(main())
    assert not failures, "\n".join(failures[:5])
