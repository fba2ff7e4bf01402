"""``serve -o OFFSET``: the image from OFFSET on, writable (qemu-nbd -o).

qemu-nbd is the referee: the same seeded requests go to each server, over copies of one
image, and then the data, the block status and the two files must agree.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.formats.qcow_util import need, qemu_img
from tests.helpers import on_copies, qemu_io, run, tapnbd_cmd
from tests.server.test_throwaway_overlay import SCRIPT, summary

KiB, MiB = 1 << 10, 1 << 20


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_offset_as_qemu_nbd(tmp_path: Path, fmt: str) -> None:
    need("qemu-img", "qemu-io", "qemu-nbd")
    src = tmp_path / f"src.{fmt}"
    qemu_img("create", "-q", "-f", fmt, src, "4M")
    qemu_io(src, "write -P 1 0 256k", "write -P 2 1M 1M", fmt=fmt)
    seed = random.SystemRandom().randrange(1 << 30)
    print("seed", seed)
    servers = {
        "tapnbd": lambda img: tapnbd_cmd("serve", "-A", "-o", "192K", "-f", fmt, str(img)),
        "qemu": lambda img: ["qemu-nbd", "-A", "-o", str(192 * KiB), "--discard=unmap",
                             "-f", fmt, str(img)],
    }  # fmt: skip
    got = {
        who: summary(out) for who, (_, out) in on_copies(src, servers, SCRIPT, str(seed)).items()
    }
    assert got["tapnbd"] == got["qemu"]
    files = [str(tmp_path / f"{who}.{fmt}") for who in ("tapnbd", "qemu")]
    run(["qemu-img", "compare", "-f", fmt, "-F", fmt, *files])
    # The first 192 KiB were never in reach.
    qemu_io(files[0], "read -P 1 0 192k", fmt=fmt)


def test_offset_past_the_end_is_refused(tmp_path: Path) -> None:
    img = tmp_path / "a.raw"
    with img.open("wb") as f:
        f.truncate(MiB)
    out = run(tapnbd_cmd("serve", "-o", "2M", "-p", "0", str(img)), check=False)
    assert out.returncode == 1
    assert "--offset 2097152 is past the image's end (1048576 bytes)" in out.stderr
