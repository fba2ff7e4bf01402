"""qcow2 details where tapnbd follows qemu-nbd, each checked against it on copies of
one image:

- zeroing part of an unallocated cluster of an overlay whose backing file reads as
  zeros in the rest of it makes the whole cluster a zero cluster, not a data cluster
  of written zeros (qcow2_co_pwrite_zeroes);
- block status asks the image file whether a data cluster reads as zeros only when the
  image looks metadata-preallocated (qemu's BDRV_BLOCK_RECURSE).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.formats.qcow_util import need, qemu_img
from tests.helpers import QCOW2_SERVERS, nbdsh_script, on_copies, qemu_io, run, tapnbd_cmd
from tests.server.test_allocation_depth import depth_map

KiB = 1 << 10

ZEROES = """
import nbd, sys
h = nbd.NBD()
h.connect_systemd_socket_activation(sys.argv[1:])
h.zero(4096, 68 * 1024)    # cluster 1: the rest reads as zeros from the base
h.zero(4096, 132 * 1024)   # cluster 2: the base has data in the rest
h.zero(12 * 1024, 188 * 1024)  # the tail of cluster 2, the head of cluster 3
h.zero(4096, 320 * 1024, nbd.CMD_FLAG_NO_HOLE)  # cluster 5, NO_HOLE as well
h.flush()
h.shutdown()
print("null")
"""


def layout(img: Path) -> list[tuple[int, int, bool, bool, bool, int]]:
    """qemu-img map's runs (start, length, present, zero, data, depth), without host
    offsets (the two servers may place clusters differently)."""
    out = json.loads(qemu_img("map", "-f", "qcow2", "--output=json", img))
    return [(e["start"], e["length"], e["present"], e["zero"], e["data"], e["depth"]) for e in out]


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_partial_zeroing_of_an_overlay_as_qemu_nbd(tmp_path: Path, compat: str) -> None:
    need("qemu-img", "qemu-io", "qemu-nbd")
    base = tmp_path / "base.raw"
    with base.open("wb") as f:
        f.truncate(1 << 20)
    qemu_io(base, "write -P 7 128k 64k")  # cluster 2 only
    src = tmp_path / "src.qcow2"
    opts = ["-o", f"compat={compat}", "-F", "raw", "-b", "base.raw"]
    qemu_img("create", "-q", "-f", "qcow2", *opts, src)
    images = {who: img for who, (img, _) in on_copies(src, QCOW2_SERVERS, ZEROES).items()}
    ours, theirs = layout(images["tapnbd"]), layout(images["qemu"])
    assert ours == theirs
    if compat == "1.1":  # the case itself: cluster 1 is a zero cluster, not data
        assert (64 * KiB, 64 * KiB, True, True, False, 0) in ours
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", *map(str, images.values())])
    qemu_img("check", "-q", images["tapnbd"])


ALONE = """
import nbd, sys
h = nbd.NBD()
h.connect_systemd_socket_activation(sys.argv[1:])
K = 1024
h.pwrite(b"\\1" * 65536, 64 * K)
h.zero(64 * K, 0)                 # unallocated: a zero cluster all the same
h.zero(64 * K, 64 * K)            # data, may be freed: a zero cluster
h.pwrite(b"\\1" * 65536, 128 * K)
h.trim(64 * K, 128 * K)           # data discarded: a zero cluster
h.zero(4 * K, 260 * K)            # part of an unallocated cluster: the whole one
h.trim(64 * K, 256 * K)           # a zero cluster stays one
h.trim(64 * K, 320 * K)           # an unallocated one stays unallocated
h.flush()
h.shutdown()
print("null")
"""


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_zeroing_and_discard_without_backing_as_qemu_nbd(tmp_path: Path, compat: str) -> None:
    """What each cluster becomes (zero cluster or unallocated), as qemu-img map shows it:
    qemu's allocation depth and map tell the two apart."""
    need("qemu-img", "qemu-nbd")
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", src, "1M")
    images = {who: img for who, (img, _) in on_copies(src, QCOW2_SERVERS, ALONE).items()}
    assert layout(images["tapnbd"]) == layout(images["qemu"])
    if compat == "1.1":
        assert layout(images["tapnbd"])[:3] == [
            (0, 192 * KiB, True, True, False, 0),
            (192 * KiB, 64 * KiB, False, True, False, 0),
            (256 * KiB, 64 * KiB, True, True, False, 0),
        ]
    qemu_img("check", "-q", images["tapnbd"])


WRITE_4K = """
import nbd, sys
h = nbd.NBD()
h.connect_systemd_socket_activation(sys.argv[1:])
h.pwrite(b"\\1" * 4096, 3 << 20)
h.flush()
h.shutdown()
print("null")
"""


def test_block_status_asks_the_file_only_when_qemu_does(tmp_path: Path) -> None:
    """A cluster tapnbd allocated for a 4 KiB write is a hole in the file past those
    4 KiB: still data, as qemu-nbd says (the image's other clusters are all written, so
    it does not look metadata-preallocated). A metadata-preallocated image's clusters
    are zeros where the file holds holes, by both."""
    need("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
    sparse = tmp_path / "sparse.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", sparse, "4M")
    qemu_io(sparse, "write -P 2 0 2M", fmt="qcow2")
    nbdsh_script(WRITE_4K, *tapnbd_cmd("serve", "-f", "qcow2", str(sparse)))
    prealloc = tmp_path / "prealloc.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", prealloc, "1M")
    qemu_io(prealloc, "write -P 1 0 4k", fmt="qcow2")
    got = {}
    for img in (sparse, prealloc):
        got[img] = depth_map(tapnbd_cmd("serve", "-r", "-f", "qcow2", str(img)), "base:allocation")
        theirs = depth_map(["qemu-nbd", "-r", "-f", "qcow2", str(img)], "base:allocation")
        assert got[img] == theirs, img
    assert got[prealloc] == [(0, 4 * KiB, 0), (4 * KiB, 1020 * KiB, 2)]
    MiB = 1 << 20
    assert got[sparse] == [
        (0, 2 * MiB, 0),
        (2 * MiB, MiB, 3),
        (3 * MiB, 64 * KiB, 0),  # 4 KiB written, the rest a hole in the file
        (3 * MiB + 64 * KiB, MiB - 64 * KiB, 3),
    ]
