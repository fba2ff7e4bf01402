"""A qcow2 refcount table entry naming a refcount block inside the header cluster
(0x200, unaligned): do a guest's writes land on the header cluster?

    PYTHONPATH=. python probes/qcow2_refblock_in_header.py
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from tests.helpers import qemu_io, start_server

KiB = 1024


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="s32-"))
    img = tmp / "r.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", img, "64M"],
        check=True,
    )
    data = bytearray(img.read_bytes())
    rt = int.from_bytes(data[48:56], "big")
    data[rt : rt + 8] = (0x200).to_bytes(8, "big")  # refcount block 0 "at" 0x200
    # A marker where the guest's first allocations' refcounts would go (clusters 4..7).
    img.write_bytes(bytes(data))
    before = img.read_bytes()[:65536]
    server = start_server([str(img), "--format", "qcow2"], tmp / "serve.log")
    try:
        try:
            qemu_io(server.uri, "write -P 0x5a 1M 64k", "flush")
            print("guest write: ok")
        except Exception as e:
            print("guest write failed:", str(e)[-300:])
    finally:
        server.stop()
    after = img.read_bytes()[:65536]
    diff = [hex(i) for i in range(65536) if before[i] != after[i]]
    print("header cluster bytes changed:", diff[:20], len(diff))
    print(server.stderr()[-600:])


main()
