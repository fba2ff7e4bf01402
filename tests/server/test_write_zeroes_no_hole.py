"""WRITE_ZEROES with NO_HOLE on a qcow2 image: "the area MUST be fully provisioned"
(NBD spec). The clusters stay the image's, flagged zero (qemu's ZERO_ALLOC), as
qemu-nbd leaves them; without NO_HOLE they may be freed.

qemu-nbd serves a copy of the same image the same requests; qemu-img map and check
are the referees.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.formats.qcow_util import need, qemu_img
from tests.helpers import QCOW2_SERVERS, nbdsh_script, on_copies, run, tapnbd_cmd

KiB = 1 << 10

REQUESTS = """
import nbd, sys
h = nbd.NBD()
h.connect_systemd_socket_activation(sys.argv[1:])
h.zero(128 * 1024, 0, nbd.CMD_FLAG_NO_HOLE)
h.zero(64 * 1024, 256 * 1024)
h.flush()
h.shutdown()
print("null")
"""
WRITE_INTO_IT = """
import nbd, sys
h = nbd.NBD()
h.connect_systemd_socket_activation(sys.argv[1:])
h.pwrite(b"\\2" * 4096, 64 * 1024)
h.flush()
h.shutdown()
print("null")
"""


def entries(img: Path, start: int, end: int) -> list[dict[str, object]]:
    out = json.loads(qemu_img("map", "-f", "qcow2", "--output=json", img))
    return [e for e in out if start <= e["start"] < end]


def test_no_hole_keeps_the_clusters_as_qemu_nbd_does(tmp_path: Path) -> None:
    need("qemu-img", "qemu-io", "qemu-nbd")
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "1M")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", str(src)])
    before = entries(src, 0, 128 * KiB)
    images = {who: img for who, (img, _) in on_copies(src, QCOW2_SERVERS, REQUESTS).items()}
    for img in images.values():
        qemu_img("check", "-f", "qcow2", img)
    ours, theirs = (entries(images[w], 0, 128 * KiB) for w in ("tapnbd", "qemu"))
    assert ours == theirs, f"tapnbd {ours}\nqemu-nbd {theirs}"
    # Zeros now, at the same place in the file as before.
    assert ours == [{**before[0], "length": 128 * KiB, "zero": True, "data": False}]
    # Written into again: a new cluster or the kept one, the rest of it still zeros.
    img = images["tapnbd"]
    nbdsh_script(WRITE_INTO_IT, *tapnbd_cmd("serve", "-f", "qcow2", str(img)))
    qemu_img("check", "-f", "qcow2", img)
    run(["qemu-io", "-f", "qcow2", "-c", "read -P 0 0 64k", "-c", "read -P 2 64k 4k",
         "-c", "read -P 0 68k 60k", "-c", "read -P 1 128k 128k", "-c", "read -P 0 256k 64k",
         "-c", "read -P 1 320k 704k", str(img)])  # fmt: skip
