"""The images under test: random raw data, sparse raw files, and qcow (normal and optimised).

qcow images come from ``tapnbd create`` when this checkout has it (``--no-optimise`` for
the normal layout, the default for blktap's allocation-optimised one). Without it, only
the normal layout can be made, with ``qemu-img create -f qcow``, so that the qemu-nbd
qcow rows still run. A "full" qcow image is filled with the same random data as the raw
image, through tapnbd when it serves qcow, else with ``qemu-img convert``.

qcow2 images (issue 13) are made by ``qemu-img create -f qcow2`` (64 KiB clusters) and
filled by ``qemu-img convert -n``; the overlay is an empty qcow2 on the raw image.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from bench.proc import BenchError, Unavailable, have, run, tapnbd_command
from bench.servers import serve

MiB = 1 << 20
GiB = 1 << 30

#: The image layouts the rows use.
RAW = "raw"
QCOW_NORMAL = "qcow-normal"
QCOW_OPT = "qcow-opt"
#: A dynamic VHD (issue 17), made by ``tapnbd create --format vhd``.
VHD = "vhd"
#: qcow2 (issue 13), 64 KiB clusters, and an empty qcow2 overlay on the raw image.
QCOW2 = "qcow2"
QCOW2_OVERLAY = "qcow2-overlay"

IMAGE_LABELS = {
    RAW: "raw",
    QCOW_NORMAL: "qcow normal",
    QCOW_OPT: "qcow optimised",
    VHD: "dynamic vhd",
    QCOW2: "qcow2",
    QCOW2_OVERLAY: "qcow2 overlay on raw",
}


def fmt_of(layout: str) -> str:
    if layout in (QCOW2, QCOW2_OVERLAY):
        return "qcow2"
    return layout if layout in (RAW, VHD) else "qcow"


def create_qcow2(path: Path, size: int, backing: Path | None = None) -> str:
    """An empty qcow2 image made by qemu-img (the peer's own tool, so both servers start
    from a file neither of them wrote), optionally an overlay on a raw ``backing``."""
    if not have("qemu-img"):
        raise Unavailable("qemu-img is not installed")
    path.unlink(missing_ok=True)
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        cmd += ["-b", str(backing.resolve()), "-F", "raw"]
    run([*cmd, str(path), str(size)], what="qemu-img create -f qcow2")
    return "qemu-img create -f qcow2" + (" -b RAW -F raw" if backing is not None else "")


def fill_qcow2(path: Path, source: Path) -> str:
    """Every cluster of the qcow2 image ``path`` written with the raw ``source``."""
    run(
        ["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(source), str(path)],
        what=f"fill {path.name}",
        timeout=1800,
    )
    return "qemu-img convert -n"


def create_vhd(path: Path, size: int) -> str:
    """An empty dynamic VHD (2 MiB blocks) made by tapnbd; qemu-nbd serves it as vpc."""
    path.unlink(missing_ok=True)
    run(
        [*tapnbd_command(), "create", "--format", "vhd", "--size", str(size), str(path)],
        what="tapnbd create --format vhd",
    )
    return "tapnbd create --format vhd"


def make_random(path: Path, size: int, chunk: int = 4 * MiB) -> None:
    """A file of ``size`` random bytes (no zero blocks for anyone to skip)."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def make_sparse(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


@dataclass(frozen=True)
class QcowSupport:
    """What this checkout's tapnbd can do with qcow, found by trying it."""

    create: bool  # tapnbd create (both layouts)
    serve: bool  # tapnbd serve --format qcow
    why: str  # when either is False


@functools.cache
def qcow_support(workdir: Path) -> QcowSupport:
    """Probe once: create a small optimised qcow image and serve it."""
    tap = tapnbd_command()
    try:
        help_text = run([*tap, "create", "--help"], what="tapnbd create --help", timeout=60)
    except BenchError:
        return QcowSupport(False, False, "this tapnbd has no `create` command yet")
    if "--no-optimise" not in help_text:
        return QcowSupport(False, False, "this tapnbd's `create` has no --no-optimise")
    probe = workdir / "qcow-probe.qcow"
    try:
        run([*tap, "create", str(probe), "--size", "16M"], what="tapnbd create", timeout=60)
    except BenchError as e:
        return QcowSupport(False, False, f"tapnbd create failed: {e}")
    try:
        with serve("tapnbd", probe, "qcow", logdir=workdir / "logs"):
            pass
    except BenchError as e:
        return QcowSupport(True, False, f"tapnbd serve --format qcow failed: {e}")
    finally:
        probe.unlink(missing_ok=True)
    return QcowSupport(True, True, "")


def create_qcow(path: Path, size: int, layout: str, workdir: Path) -> str:
    """An empty qcow image of ``size`` bytes in ``layout``; returns the command's name."""
    path.unlink(missing_ok=True)
    if qcow_support(workdir).create:
        cmd = [*tapnbd_command(), "create", str(path), "--size", f"{size // MiB}M"]
        cmd += ["--format", "qcow"]
        if layout == QCOW_NORMAL:
            cmd.append("--no-optimise")
        run(cmd, what=f"tapnbd create ({layout})", timeout=120)
        return "tapnbd create" + (" --no-optimise" if layout == QCOW_NORMAL else "")
    if layout == QCOW_OPT:
        raise Unavailable(
            f"optimised qcow images need `tapnbd create`: {qcow_support(workdir).why}"
        )
    if not have("qemu-img"):
        raise Unavailable("qemu-img is not installed")
    run(["qemu-img", "create", "-q", "-f", "qcow", str(path), str(size)], what="qemu-img create")
    return "qemu-img create -f qcow"


def create_image(path: Path, size: int, layout: str, workdir: Path) -> str:
    """An empty (sparse) image in any layout."""
    if layout == RAW:
        make_sparse(path, size)
        return "sparse file"
    if layout == VHD:
        return create_vhd(path, size)
    if layout == QCOW2:
        return create_qcow2(path, size)
    return create_qcow(path, size, layout, workdir)


def fill_vhd(path: Path, source: Path, workdir: Path) -> str:
    """Write all of ``source`` (raw) into the VHD ``path`` through tapnbd serve."""
    if not have("nbdcopy"):
        raise Unavailable("nbdcopy is not installed")
    with serve("tapnbd", path, VHD, logdir=workdir / "logs") as s:
        run(["nbdcopy", "--flush", str(source), s.uri], what=f"fill {path.name}", timeout=1800)
    return "nbdcopy through tapnbd serve"


def fill_qcow(path: Path, source: Path, workdir: Path) -> str:
    """Write all of ``source`` (raw) into the qcow image ``path``; say how."""
    if qcow_support(workdir).serve:
        if not have("nbdcopy"):
            raise Unavailable("nbdcopy is not installed")
        with serve("tapnbd", path, "qcow", logdir=workdir / "logs") as s:
            run(
                ["nbdcopy", "--flush", str(source), s.uri],
                what=f"fill {path.name}",
                timeout=1800,
            )
        return "nbdcopy through tapnbd serve"
    run(
        ["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow", str(source), str(path)],
        what=f"fill {path.name}",
        timeout=1800,
    )
    return "qemu-img convert -n"


def layout_unavailable(layout: str, workdir: Path) -> str | None:
    """Why images of ``layout`` cannot be made here, or None."""
    if layout in (RAW, VHD):
        return None
    if layout in (QCOW2, QCOW2_OVERLAY):
        return None if have("qemu-img") else "qemu-img is not installed"
    support = qcow_support(workdir)
    if support.create:
        return None
    if layout == QCOW_OPT:
        return f"optimised qcow needs `tapnbd create`: {support.why}"
    return None if have("qemu-img") else "qemu-img is not installed"
