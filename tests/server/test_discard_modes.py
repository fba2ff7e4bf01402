"""serve --discard and --detect-zeroes (formats/filters/discard.py), as qemu-nbd's.

The same requests go to tapnbd and to qemu-nbd with the same options, each over a copy
of one image (libnbd, the servers started by socket activation); then qemu-img map says
which runs of each copy hold data, and qemu-io reads them back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.formats.qcow_util import need, qemu_img
from tests.helpers import nbdsh_script, run, tapnbd_cmd

KiB, MiB = 1 << 10, 1 << 20

#: Writes zeros over data at [0, 1M) and [2M-4k, 2M), then TRIMs [1M, 1.5M) and zeroes
#: [1.5M, 1.5M+64k) with NO_HOLE clear. The 1 MiB WRITE is big enough for tapnbd's spliced
#: path, the 4 KiB one small enough for its inline one.
REQUESTS = """
import nbd, sys
h = nbd.NBD()
h.connect_systemd_socket_activation(sys.argv[1:])
h.pwrite(bytes(1 << 20), 0)
h.pwrite(bytes(4096), (2 << 20) - 4096)
h.trim(512 * 1024, 1 << 20)
h.zero(64 * 1024, 1536 * 1024)
h.flush()
h.shutdown()
print("null")
"""


def data_runs(img: Path, fmt: str) -> list[tuple[int, int]]:
    """(start, length) of each run qemu-img map says holds data."""
    out = json.loads(qemu_img("map", "-f", fmt, "--output=json", img))
    runs: list[tuple[int, int]] = []
    for e in out:
        if not e["data"]:
            continue
        if runs and runs[-1][0] + runs[-1][1] == e["start"]:
            runs[-1] = (runs[-1][0], runs[-1][1] + e["length"])
        else:
            runs.append((e["start"], e["length"]))
    return runs


def served(tmp_path: Path, fmt: str, opts: list[str], *create: str) -> dict[str, Path]:
    """An image of 4 MiB whose first 2 MiB are data (byte 1), and a copy each that
    tapnbd and qemu-nbd served REQUESTS with ``opts``."""
    src = tmp_path / f"src.{fmt}"
    qemu_img("create", "-q", "-f", fmt, *create, src, "4M")
    run(["qemu-io", "-f", fmt, "-c", "write -P 1 0 2M", str(src)])
    out: dict[str, Path] = {}
    for who in ("tapnbd", "qemu"):
        img = tmp_path / f"{who}.{fmt}"
        shutil.copyfile(src, img)
        server = (
            tapnbd_cmd("serve", "-f", fmt, *opts, str(img))
            if who == "tapnbd"
            else ["qemu-nbd", "-f", fmt, *opts, str(img)]
        )
        nbdsh_script(REQUESTS, *server)
        out[who] = img
    return out


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "qcow2-4k"])
@pytest.mark.parametrize(
    "opts",
    [
        ["--discard=ignore"],
        ["--discard=unmap"],
        ["--discard=ignore", "--detect-zeroes=on"],
        ["--discard=unmap", "--detect-zeroes=unmap"],
    ],
    ids=["ignore", "unmap", "detect-on", "detect-unmap"],
)
def test_the_same_runs_hold_data_as_with_qemu_nbd(
    tmp_path: Path, fmt: str, opts: list[str]
) -> None:
    """qcow2-4k: 4 KiB clusters, so that the small zero WRITE is a whole cluster, which
    a qcow2 zeroing frees (and a missed detection would store as data)."""
    need("qemu-img", "qemu-io", "qemu-nbd")
    create = ("-o", "cluster_size=4k") if fmt == "qcow2-4k" else ()
    fmt = fmt.removesuffix("-4k")
    images = served(tmp_path, fmt, opts, *create)
    ours, theirs = (data_runs(images[w], fmt) for w in ("tapnbd", "qemu"))
    assert ours == theirs, f"tapnbd {ours}, qemu-nbd {theirs}"
    # What must read back, whatever is allocated: the zeros written, and the data the
    # TRIM was told to drop when discards are ignored.
    kept = "1" if "--discard=ignore" in opts else None
    for img in images.values():
        run(["qemu-io", "-f", fmt, "-c", "read -P 0 0 1M", "-c", "read -P 0 1536k 64k",
             "-c", "read -P 1 1600k 444k", "-c", "read -P 0 2044k 4k", str(img)])  # fmt: skip
    if fmt == "raw":  # space kept or given back: the same blocks as qemu-nbd leaves
        blocks = {w: os.stat(p).st_blocks for w, p in images.items()}
        assert blocks["tapnbd"] == blocks["qemu"], blocks
        if kept:
            run(["qemu-io", "-f", fmt, "-c", f"read -P {kept} 1M 512k", str(img)])


def test_detect_unmap_needs_discard_unmap_as_qemu_nbd(tmp_path: Path) -> None:
    """(unmap is tapnbd's default --discard, where qemu-nbd's is ignore.)"""
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(MiB))
    bad = ["--discard=ignore", "--detect-zeroes=unmap"]
    r = run(tapnbd_cmd("serve", *bad, str(img)), check=False, timeout=60)
    assert r.returncode == 1 and "needs --discard=unmap" in r.stderr, r.stderr
    r = run(tapnbd_cmd("serve", "--discard=never", str(img)), check=False, timeout=60)
    assert r.returncode == 1 and "use ignore or unmap" in r.stderr, r.stderr


def test_a_spliced_write_of_zeroes_is_detected(tmp_path: Path) -> None:
    """Over a unix socket a 1 MiB WRITE to a raw file is spliced from the socket into
    the file; with detection on it must not be, or the zeros would be stored as data."""
    need("qemu-img", "qemu-io")
    img = tmp_path / "d.raw"
    with img.open("wb") as f:
        f.write(b"\1" * (4 * MiB))
    opts = ["--discard=unmap", "--detect-zeroes=unmap"]
    nbdsh_script(REQUESTS, *tapnbd_cmd("serve", "-f", "raw", *opts, str(img)))
    fd = os.open(img, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) >= MiB  # [0, 1M) is a hole now
    finally:
        os.close(fd)


async def test_a_detecting_filter_lets_no_write_take_the_inline_path() -> None:
    """RAM writes small WRITEs inline (pwrite_nowait), past the filter's pwrite: while
    detecting, the filter refuses that path, and its pwrite turns a page of zeros
    into a hole. (The raw driver sends its first writes the async way anyway.)"""
    from formats.filters.discard import DiscardFilter
    from formats.ram import PAGE, RamDriver
    from tapnbd.backend import Backend
    from tapnbd.driver import ExtentFlags

    backend = Backend(DiscardFilter(RamDriver(1 << 20), detect="unmap"))
    await backend.pwrite(0, b"\1" * PAGE)
    assert backend.writes_inline and not backend.try_pwrite(0, bytes(PAGE))
    await backend.pwrite(0, bytes(PAGE))
    assert (await backend.extents(0, PAGE))[0].flags == ExtentFlags.HOLE | ExtentFlags.ZERO
    plain = Backend(DiscardFilter(RamDriver(1 << 20), discard="ignore"))
    assert plain.try_pwrite(0, bytes(PAGE))  # not detecting: inline as ever
