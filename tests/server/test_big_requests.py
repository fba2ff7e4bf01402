"""Big requests, whose buffers the server reuses (tapnbd.buffers): no reply may carry
another request's data, however many are in flight."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.helpers import Server, need, run


def test_fio_verify_big_blocks_many_in_flight(serve: Callable[..., Server], tmp_path: Path) -> None:
    need("fio")
    disk = tmp_path / "big.img"
    disk.write_bytes(bytes(96 << 20))
    server = serve(str(disk))
    out = run(
        [
            "fio",
            "--name=big",
            "--ioengine=nbd",
            f"--uri={server.uri}",
            "--rw=randwrite",
            "--bsrange=128k-2m",
            "--bs_unaligned=0",
            "--iodepth=16",
            "--numjobs=3",
            "--size=32m",
            "--offset_increment=32m",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
            "--group_reporting",
            "--output-format=json",
        ],
        timeout=300,
    ).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["read"]["io_bytes"] >= 96 << 20  # every block read back and verified
