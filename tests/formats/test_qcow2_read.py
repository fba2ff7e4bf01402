"""qcow2 images made by qemu, served by ``tapnbd serve`` and read by real NBD clients.

qemu is the referee: nbdcopy's copy through tapnbd must equal ``qemu-img convert -O raw``
byte for byte, and ``nbdinfo --map`` must match ``qemu-img map``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.formats.qcow2_util import IMAGE_KINDS, make_image, nbd_map, qemu_map, qemu_raw
from tests.formats.qcow_util import need, run
from tests.helpers import Server


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_qemu_image_reads_back(tmp_path: Path, serve: Callable[..., Server], kind: str) -> None:
    need("nbdcopy", "nbdinfo")
    img = make_image(tmp_path, kind)
    expected = qemu_raw(img, tmp_path / "qemu.raw")
    server = serve(str(img), "--read-only", "--format", "qcow2")
    out = tmp_path / "nbd.raw"
    run("nbdcopy", server.uri, out)
    assert out.read_bytes() == expected
    assert nbd_map(server.uri) == qemu_map(img)


def test_probe_names_qcow2(tmp_path: Path) -> None:
    from formats import probe

    img = make_image(tmp_path, "cluster-65536")
    assert probe(str(img)) == "qcow2"
