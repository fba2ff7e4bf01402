"""The ``qemu:allocation-depth`` block status context (serve -A, as qemu-nbd -A).

qemu-nbd is the referee: libnbd's nbdinfo reads the context from both servers, each
started by socket activation (nbdinfo's ``[ CMD ]``), over the same backing chains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from formats import OpenRules, open_image
from formats.engine.image import DEPTH_STEPS
from tests.formats.qcow2_util import set_reserved_bit
from tests.formats.qcow_util import need, qemu_img
from tests.helpers import nbdsh_script, run, tapnbd_cmd

KiB, MiB = 1 << 10, 1 << 20


def qemu_io(img: Path, fmt: str, *commands: str) -> None:
    args = [a for c in commands for a in ("-c", c)]
    run(["qemu-io", "-f", fmt, *args, str(img)])


def as_dict(got: object) -> dict[str, Any]:
    """What a libnbd script printed (tests.helpers.nbdsh_script), a JSON object."""
    assert isinstance(got, dict)
    return got


def depth_map(server: list[str], what: str = "qemu:allocation-depth") -> list[tuple[int, int, int]]:
    """(offset, length, depth) runs of ``what``, neighbours at one depth merged (servers
    may split runs where they like)."""
    out = run(["nbdinfo", "--json", f"--map={what}", "--", "[", *server, "]"]).stdout
    runs: list[tuple[int, int, int]] = []
    for e in json.loads(out):
        if runs and runs[-1][2] == e["type"] and runs[-1][0] + runs[-1][1] == e["offset"]:
            runs[-1] = (runs[-1][0], runs[-1][1] + e["length"], e["type"])
        else:
            runs.append((e["offset"], e["length"], e["type"]))
    return runs


def both(img: Path, fmt: str) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    ours = depth_map(tapnbd_cmd("serve", "-A", "-r", "-f", fmt, str(img)))
    theirs = depth_map(["qemu-nbd", "-A", "-r", "-f", fmt, str(img)])
    return ours, theirs


def chain(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """A raw base, a qcow2 alone, qcow2 on raw, qcow2 on qcow2 on raw, QCOW v1 on raw and
    a qcow2 on a backing file shorter than itself: data, zero clusters and holes."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"")
    with base.open("r+b") as f:
        f.truncate(4 * MiB)
    qemu_io(base, "raw", "write -P 1 1M 1M")
    solo = tmp_path / "solo.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", solo, "4M")
    qemu_io(solo, "qcow2", "write -P 2 0 64k", "write -z 1M 64k")
    mid = tmp_path / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid)
    qemu_io(mid, "qcow2", "write -P 3 2M 64k", "write -z 3M 64k")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    qemu_io(top, "qcow2", "write -P 4 1536k 64k")
    v1 = tmp_path / "v1.qcow"
    qemu_img("create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", v1)
    qemu_io(v1, "qcow", "write -P 5 512k 8k")
    longer = tmp_path / "longer.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", longer, "6M")
    qemu_io(longer, "qcow2", "write -P 6 5M 4k")
    # The middle layer ends first: past it, its zeros, not the longer base's data.
    short = tmp_path / "short.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", short, "2M")
    over = tmp_path / "over-short.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "short.qcow2", "-F", "qcow2", over, "6M")
    return {
        "raw": (base, "raw"),
        "qcow2": (solo, "qcow2"),
        "qcow2-on-raw": (mid, "qcow2"),
        "three-layers": (top, "qcow2"),
        "qcow-on-raw": (v1, "qcow"),
        "past-the-backing-end": (longer, "qcow2"),
        "past-a-middle-layers-end": (over, "qcow2"),
    }


CASES = [
    "raw",
    "qcow2",
    "qcow2-on-raw",
    "three-layers",
    "qcow-on-raw",
    "past-the-backing-end",
    "past-a-middle-layers-end",
]


@pytest.mark.parametrize("case", CASES)
def test_the_depths_match_qemu_nbds(tmp_path: Path, case: str) -> None:
    need("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
    img, fmt = chain(tmp_path)[case]
    ours, theirs = both(img, fmt)
    assert ours == theirs
    size = json.loads(qemu_img("info", "--output=json", "-f", fmt, img))["virtual-size"]
    assert ours[0][0] == 0 and ours[-1][0] + ours[-1][1] == size


def test_three_layers_by_hand(tmp_path: Path) -> None:
    """The chain's depths, stated: 3 the raw base, 2 the middle, 1 the top."""
    need("qemu-img", "qemu-io", "nbdinfo")
    img, fmt = chain(tmp_path)["three-layers"]
    ours = depth_map(tapnbd_cmd("serve", "-A", "-r", "-f", fmt, str(img)))
    assert ours == [
        (0, 1536 * KiB, 3),
        (1536 * KiB, 64 * KiB, 1),
        (1600 * KiB, 448 * KiB, 3),
        (2 * MiB, 64 * KiB, 2),
        (2 * MiB + 64 * KiB, 960 * KiB, 3),
        (3 * MiB, 64 * KiB, 2),
        (3 * MiB + 64 * KiB, 960 * KiB, 3),
    ]


def test_a_fragmented_image_is_answered_in_bounded_steps(tmp_path: Path) -> None:
    """Every other 512-byte cluster allocated: 8192 runs. One driver call stops after
    DEPTH_STEPS answers; nbdinfo asks again and gets qemu-nbd's whole map."""
    need("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
    base = tmp_path / "base.raw"
    with base.open("wb") as f:
        f.truncate(8 * MiB)
    img = tmp_path / "frag.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "base.raw",
             "-F", "raw", img, "8M")  # fmt: skip
    qemu_io(img, "qcow2", *(f"write -P 7 {i * 1024} 512" for i in range(8192)))
    ours, theirs = both(img, "qcow2")
    assert ours == theirs and len(ours) == 2 * 8192

    async def one_call() -> int:
        d = await open_image(str(img), fmt="qcow2", read_only=True, rules=OpenRules())
        try:
            got = await d.allocation_depth(0, 8 * MiB)
        finally:
            await d.close()
        assert got[0].offset == 0 and [int(e.flags) for e in got[:2]] == [1, 2]
        return len(got)

    import asyncio

    assert asyncio.run(one_call()) == DEPTH_STEPS


def test_the_context_is_offered_only_with_A_and_beside_the_others(tmp_path: Path) -> None:
    """Without -A nothing selects it; with -A, LIST "qemu:" names it with the bitmaps,
    and one BLOCK_STATUS answers base:allocation and the depth together."""
    need("qemu-img", "qemu-io", "nbdsh")
    img, _ = chain(tmp_path)["qcow2-on-raw"]
    qemu_img("bitmap", "--add", "-f", "qcow2", img, "b0")
    script = """
import json, nbd, sys
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_systemd_socket_activation(sys.argv[1:])
listed = []
h.add_meta_context("qemu:")
h.opt_list_meta_context(lambda name: listed.append(name) or 0)
h.clear_meta_contexts()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.opt_go()
seen = {}
def cb(ctx, offset, entries, err):
    seen[ctx] = list(entries)
    return 0
can = h.can_meta_context("qemu:allocation-depth")
if can:
    h.block_status(2 << 20, 1 << 20, cb)
print(json.dumps({"listed": sorted(listed), "can": can, "seen": seen}))
"""
    without = as_dict(
        nbdsh_script(script, *tapnbd_cmd("serve", "-r", "-f", "qcow2", "-B", "b0", str(img)))
    )
    assert without == {"listed": ["qemu:dirty-bitmap:b0"], "can": False, "seen": {}}
    got = as_dict(
        nbdsh_script(script, *tapnbd_cmd("serve", "-A", "-r", "-f", "qcow2", "-B", "b0", str(img)))
    )
    assert got["listed"] == ["qemu:allocation-depth", "qemu:dirty-bitmap:b0"] and got["can"]
    # [1M, 3M): the raw base's data (depth 2) up to 2M, then the overlay's 64k (1).
    assert got["seen"]["qemu:allocation-depth"] == [1 * MiB, 2, 64 * KiB, 1, 960 * KiB, 2]
    assert got["seen"]["base:allocation"][:2] == [1 * MiB + 64 * KiB, 0]  # data to there


def test_a_hostile_table_fails_the_request_not_the_server(tmp_path: Path) -> None:
    """An L2 entry with a reserved bit set: the depth request gets EIO, and the same
    connection goes on reading (the stream stays in step)."""
    need("qemu-img", "qemu-io", "nbdsh")
    bad = tmp_path / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", bad, "1M")
    qemu_io(bad, "qcow2", "write -P 1 0 64k", "write -P 2 512k 64k")
    set_reserved_bit(bad)  # cluster 0's entry
    script = """
import errno, json, nbd, sys
h = nbd.NBD()
h.add_meta_context("qemu:allocation-depth")
h.connect_systemd_socket_activation(sys.argv[1:])
try:
    h.block_status(64 * 1024, 0, lambda *a: 0)
    err = ""
except nbd.Error as e:  # libnbd 1.14 names it; later ones may give the number
    err = e.errno if isinstance(e.errno, str) else errno.errorcode[e.errno]
print(json.dumps({"err": err, "read": h.pread(4, 512 * 1024).hex()}))
"""
    got = as_dict(nbdsh_script(script, *tapnbd_cmd("serve", "-A", "-r", "-f", "qcow2", str(bad))))
    assert got == {"err": "EIO", "read": "02020202"}
