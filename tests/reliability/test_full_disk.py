"""A qcow image on a file system that fills up: ENOSPC, never EIO or a hang; and back.

The image lives on a small loop-mounted ext4 (or a size-limited tmpfs) beside a filler
file. A write load bigger than the file system gets ENOSPC for what does not fit; the
connection carries on; the image stays valid; once the filler is deleted the same
server takes new allocating writes and a FLUSH again. Afterwards ``tapnbd check`` finds
no corruption, qemu reads the image, and every acknowledged write is in it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import SYSTEM_PYTHON, Server, need, need_root_devices, run, tapnbd_cmd
from tests.reliability.crash import CHECK_OK, LAYOUTS, LOAD
from tests.reliability.model import Journal, verify

FS_MIB = 48
FILLER_MIB = 12
#: The load aims at far more than the file system holds.
REGION = 96 << 20


@pytest.fixture
def small_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    need_root_devices()
    need("mkfs.ext4", "mount", "umount")
    point = tmp_path / "mnt"
    point.mkdir()
    if request.param == "ext4":
        backing = tmp_path / "fs.img"
        with open(backing, "wb") as f:
            f.truncate(FS_MIB << 20)
        run(["mkfs.ext4", "-q", "-F", "-m", "0", str(backing)])
        run(["mount", "-o", "loop", str(backing), str(point)])
    else:
        run(["mount", "-t", "tmpfs", "-o", f"size={FS_MIB}m", "tmpfs", str(point)])
    try:
        yield point
    finally:
        # The server (torn down after this fixture) may still hold the image: a lazy
        # unmount then lets go once it exits, instead of leaking the mount.
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)


def _load(uri: str, *args: str) -> Journal:
    proc = subprocess.run(
        [SYSTEM_PYTHON, str(LOAD), uri, "--hang", "15", *args],
        capture_output=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return Journal.from_json(json.loads(proc.stdout))


def _load_more(uri: str, full: Journal, count: int, span: int, seed: int, *args: str) -> Journal:
    """Once there is room again: ``count`` writes on from where ``full`` stopped, with
    an allocating frontier from REGION to REGION + ``span``."""
    more = _load(
        uri,
        *("--count", str(count), "--region", str(REGION + span), "--start", str(REGION)),
        *("--seed", str(seed), "--gen-base", str(len(full.writes)), "--final-flush", *args),
    )
    assert more.errors == {} and not more.flush_errors, (more.errors, more.flush_errors)
    assert not more.dead and not more.hang
    return more


def _verify_both(disk: Path, full: Journal, more: Journal) -> int:
    """Every acknowledged write of both loads is on ``disk`` (raw); the sectors checked."""
    both = Journal(
        full.size, full.writes + more.writes, full.acks + more.acks, [], {}, [], "", False
    )
    v = verify(disk, both, crashed=False)
    assert not v.failures, v.failures
    return v.must


@pytest.mark.root
@pytest.mark.parametrize(
    ("small_fs", "layout"),
    [("ext4", "optimised"), ("ext4", "normal"), ("tmpfs", "normal")],
    indirect=["small_fs"],
)
def test_full_disk_gives_enospc_and_recovers(
    serve: Callable[..., Server], small_fs: Path, tmp_path: Path, layout: str
) -> None:
    need("qemu-img")
    filler = small_fs / "filler"
    with open(filler, "wb") as f:
        f.write(os.urandom(1 << 20) * FILLER_MIB)
    image = small_fs / "full.qcow"
    run(tapnbd_cmd("create", str(image), "--size", "256M", *LAYOUTS[layout]))
    server = serve(str(image))

    # Fill it: about twice what fits.
    full = _load(
        server.uri,
        "--count",
        "3000",
        "--region",
        str(REGION),
        "--max-len",
        "65536",
        "--flush-every",
        "64",
        "--final-flush",
        "--seed",
        "1",
    )
    assert not full.hang, "a request hung on the full file system"
    assert not full.dead, f"the connection died: {full.dead}"
    assert set(full.errors) == {"ENOSPC"}, full.errors  # never EIO
    assert full.count("err") > 100 and full.count("ok") > 100

    # Free space: the same server allocates again, and FLUSH works.
    filler.unlink()
    more = _load_more(server.uri, full, 150, 16 << 20, 2)
    assert any(w.offset >= REGION for w in more.writes)
    assert server.stop() == 0, server.stderr()[-2000:]

    proc = run(tapnbd_cmd("check", str(image)), check=False)
    assert proc.returncode in CHECK_OK, proc.stdout + proc.stderr
    out = tmp_path / "full.raw"
    run(["qemu-img", "convert", "-f", "qcow", "-O", "raw", str(image), str(out)])
    assert _verify_both(out, full, more) > 1000


@pytest.mark.root
@pytest.mark.parametrize("small_fs", ["ext4", "tmpfs"], indirect=True)
def test_full_disk_raw_big_writes(
    serve: Callable[..., Server], small_fs: Path, tmp_path: Path
) -> None:
    """A sparse raw image, writes of up to 1 MiB over a unix socket: the big ones go
    from the socket to the file by splice(2) as they arrive (connection.SPLICE_MIN; a
    TCP client on this host is not spliced). A splice cut short by ENOSPC answers ENOSPC
    and leaves the connection in step, and once there is room again the same
    connection's writes land where they should."""
    filler = small_fs / "filler"
    with open(filler, "wb") as f:
        f.write(os.urandom(1 << 20) * FILLER_MIB)
    image = small_fs / "full.raw"
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    server = serve(str(image), "--format", "raw", "--socket", str(tmp_path / "s.sock"))
    load = ("--max-len", str(1 << 20), "--final-flush", "--fua", "0.02")
    full = _load(server.uri, "--count", "400", "--region", str(REGION), "--seed", "3", *load)
    assert not full.hang and not full.dead, (full.hang, full.dead)
    assert set(full.errors) == {"ENOSPC"}, full.errors
    assert full.count("err") > 20 and full.count("ok") > 20

    filler.unlink()  # 12 MiB of room: the next writes (40 of at most 256 KiB) fit
    more = _load_more(server.uri, full, 40, 4 << 20, 4, "--max-len", str(256 << 10))
    assert server.stop() == 0, server.stderr()[-2000:]
    assert _verify_both(image, full, more) > 1000
