"""Big requests, whose buffers the server reuses (tapnbd.buffers): no reply may carry
another request's data, however many are in flight."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.helpers import Server, fio_verify


def test_fio_verify_big_blocks_many_in_flight(serve: Callable[..., Server], tmp_path: Path) -> None:
    disk = tmp_path / "big.img"
    disk.write_bytes(bytes(96 << 20))
    server = serve(str(disk))
    job = fio_verify(
        server.uri,
        "--rw=randwrite",
        "--bsrange=128k-2m",
        "--bs_unaligned=0",
        "--iodepth=16",
        "--numjobs=3",
        "--size=32m",
        "--offset_increment=32m",
    )
    assert job["error"] == 0
    assert job["read"]["io_bytes"] >= 96 << 20  # every block read back and verified
