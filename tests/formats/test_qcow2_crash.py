"""kill -9 of ``tapnbd serve`` during a write load on qcow2, then qemu checks the image.

Each round creates a qcow2 image, serves it, runs nbdload (writes, periodic FLUSH, some
FUA) and SIGKILLs the server at a random moment. Then ``qemu-img check`` must exit 0 or 3
(leaked clusters are what a crash may leave; never 2, corruption), qemu's reading of the
image must hold every write acknowledged before the last completed FLUSH (the model in
tests/reliability/model.py), and a reopened tapnbd must read the same bytes as qemu.
"""

from __future__ import annotations

import filecmp
import json
import random
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import need, run, start_server, tapnbd_cmd
from tests.reliability.crash import Round, fill_journal_figures, start_load, wait_load, wait_writing
from tests.reliability.model import verify

ROUNDS = 3


def qcow2_crash_round(work: Path, cluster_size: int, seed: int) -> Round:
    rng = random.Random(seed)
    r = Round(f"qcow2-{cluster_size}", seed, kill_after=rng.uniform(0.1, 1.0))
    image = work / "crash.qcow2"
    run(
        tapnbd_cmd(
            "create", "--format", "qcow2", "--size", "256M",
            "--cluster-size", str(cluster_size), str(image),
        )
    )  # fmt: skip
    server = start_server([str(image)], work / "server.log")
    out = work / "journal.json"
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
    failures: list[str] = []
    proc = run(["qemu-img", "check", "--output=json", str(image)], check=False)
    r.check = proc.returncode
    if proc.returncode not in (0, 3):
        failures.append(f"qemu-img check exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    elif json.loads(proc.stdout).get("corruptions", 0):
        failures.append(f"qemu-img check found corruption: {proc.stdout}")
    proc = run(tapnbd_cmd("check", str(image)), check=False)
    if proc.returncode not in (0, 3):
        failures.append(f"tapnbd check exited {proc.returncode}: {proc.stdout}")
    qemu_raw = work / "qemu.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(qemu_raw)])
    v = verify(qemu_raw, journal, crashed=True)
    r.sectors, r.must, r.newer = v.sectors, v.must, v.newer
    failures += [f"qemu's reading: {f}" for f in v.failures]
    ours = work / "ours.raw"
    server = start_server([str(image)], work / "reopen.log")
    try:
        run(["nbdcopy", server.uri, str(ours)])
    finally:
        if server.stop() != 0:
            failures.append(f"the reopened server failed: {server.stderr()[-1000:]}")
    if not filecmp.cmp(qemu_raw, ours, shallow=False):
        failures.append("tapnbd reads the crashed image differently from qemu")
    proc = run(["qemu-img", "check", str(image)], check=False)
    if proc.returncode not in (0, 3):
        failures.append(f"qemu-img check after a clean reopen exited {proc.returncode}")
    r.failures = (*r.failures, *failures)
    return r


@pytest.mark.slow
@pytest.mark.parametrize("cluster_size", [65536, 4096, 512])
def test_kill9_during_writes_qcow2(tmp_path: Path, cluster_size: int) -> None:
    need("qemu-img", "nbdcopy")
    seeds = random.Random().sample(range(1 << 30), ROUNDS)
    print("seeds", seeds)
    rounds = []
    for i, seed in enumerate(seeds):
        work = tmp_path / str(i)
        work.mkdir()
        r = qcow2_crash_round(work, cluster_size, seed)
        print(r.row())
        rounds.append(r)
        assert r.ok, f"{r.row()}\n" + "\n".join(r.failures)
    assert all(r.lost + r.acked == r.writes for r in rounds)
    assert sum(r.must for r in rounds) > 0 and sum(r.durable for r in rounds) > 0
