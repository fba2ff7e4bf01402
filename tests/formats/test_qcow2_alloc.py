"""qcow2 allocating writes (issue 13, "Performance"): the inline allocation path and the
file grown ahead of need, judged by qemu-io on a copy and by qemu-img check."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

from formats.qcow2.driver import GROW_AHEAD
from tests.formats.qcow2_util import check_clean
from tests.formats.qcow_util import need, qemu_img
from tests.helpers import Server, qemu_io, run

SIZE = 32 << 20
CLUSTER = 65536


def _allocating_commands(seed: int) -> list[str]:
    """Writes that mostly land in new clusters: 4k ones, some across a cluster boundary,
    some of several clusters, and zero clusters written over again."""
    rng = random.Random(seed)
    cmds = []
    for _ in range(120):
        what = rng.random()
        if what < 0.6:
            off = rng.randrange(0, SIZE // 4096) * 4096
            cmds.append(f"write -P 0x{rng.randrange(1, 256):02x} {off} 4096")
        elif what < 0.75:
            off = rng.randrange(1, SIZE // CLUSTER) * CLUSTER - 2048  # straddles a boundary
            cmds.append(f"write -P 0x{rng.randrange(1, 256):02x} {off} 4096")
        elif what < 0.9:
            off = rng.randrange(0, SIZE - (1 << 20))
            n = rng.choice([CLUSTER, 3 * CLUSTER + 5, 1 << 20])
            cmds.append(f"write -P 0x{rng.randrange(1, 256):02x} {off} {n}")
        else:
            a = rng.randrange(0, SIZE // CLUSTER - 4) * CLUSTER
            cmds.append(f"write -z {a} {2 * CLUSTER}")
            cmds.append(f"write -P 0x{rng.randrange(1, 256):02x} {a + 8192} 4096")
    return cmds


def test_allocating_writes_match_qemu_and_the_file_ends_at_its_last_cluster(
    tmp_path: Path, serve: Callable[..., Server]
) -> None:
    need("qemu-img", "qemu-io")
    img = tmp_path / "alloc.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(SIZE))
    ref = tmp_path / "ref.qcow2"
    shutil.copy(img, ref)
    seed = random.randrange(1 << 32)
    print("seed", seed)
    cmds = _allocating_commands(seed)
    server = serve(str(img), "--format", "qcow2")
    # Writeback: qemu-io's default (writethrough) sends every write with FUA, which the
    # server serves on its asynchronous path; plain writes take the inline one.
    args = ["qemu-io", "-f", "raw", "-t", "writeback"]
    for c in [*cmds, "flush"]:
        args += ["-c", c]
    out = run([*args, server.uri]).stdout
    assert "failed" not in out and "error" not in out.lower(), out
    assert server.stop() == 0
    qemu_io(ref, *cmds, fmt="qcow2")
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", img, ref)
    report = check_clean(img)
    # The writes allocated more than GROW_AHEAD, so the file grew ahead more than once;
    # a clean close gives the space back: the file ends where qemu says the image does.
    end = report["image-end-offset"]
    assert isinstance(end, int) and end > 2 * GROW_AHEAD
    assert img.stat().st_size == end


def test_overlay_reads_in_small_requests_match_qemu(
    tmp_path: Path, serve: Callable[..., Server]
) -> None:
    """Small reads of an overlay are served from the backing file inline where nothing is
    allocated (pread_nowait); nbdcopy in 4 KiB requests must see what qemu sees."""
    need("qemu-img", "qemu-io", "nbdcopy")
    seed = random.randrange(1 << 32)
    print("seed", seed)
    rng = random.Random(seed)
    base = tmp_path / "base.raw"
    base.write_bytes(rng.randbytes(4 << 20) + bytes(4 << 20) + rng.randbytes(3 << 20))
    img = tmp_path / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "raw", img, str(12 << 20))
    writes = [f"write -P 0x{rng.randrange(1, 256):02x} {rng.randrange(0, 12 << 20)} 5000"
              for _ in range(20)]  # fmt: skip
    qemu_io(img, *writes, fmt="qcow2")
    expected = tmp_path / "qemu.raw"
    qemu_img("convert", "-O", "raw", img, expected)
    server = serve(str(img), "--read-only", "--format", "qcow2")
    out = tmp_path / "nbd.raw"
    run(["nbdcopy", "--request-size=4096", server.uri, str(out)])
    assert out.read_bytes() == expected.read_bytes()
