"""``tapnbd serve --stats-file``: the counters the kernel tests read, checked with qemu-io."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import need, run, start_server


def test_stats_file_written_at_exit(tmp_path: Path, raw_image: Path) -> None:
    need("qemu-io")
    sock, stats = tmp_path / "s.sock", tmp_path / "stats.json"
    server = start_server(
        [str(raw_image), "--socket", str(sock), "--stats-file", str(stats)], tmp_path / "log"
    )
    try:
        cmds = ["write -P 1 0 64k", "write -P 2 1M 128k", "flush", "discard 2M 1M", "read 0 4k"]
        run(
            ["qemu-io", "-f", "raw", f"nbd+unix:///disk.img?socket={sock}"]
            + [a for c in cmds for a in ("-c", c)]
        )
        assert not stats.exists()  # written at exit, not before
    finally:
        assert server.stop() == 0
    ops = json.loads(stats.read_text())["disk.img"]["ops"]
    assert (ops["write"]["ops"], ops["write"]["bytes"]) == (2, 192 << 10)
    assert ops["flush"]["ops"] >= 1
    assert (ops["trim"]["ops"], ops["trim"]["bytes"]) == (1, 1 << 20)
    assert ops["read"]["ops"] >= 1
    assert all(op["errors"] == 0 for op in ops.values())
