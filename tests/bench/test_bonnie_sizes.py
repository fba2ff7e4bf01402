"""The Loop row's bigger bonnie++ file (issue 15, item 6): sizes and the note saying so."""

from __future__ import annotations

from pathlib import Path

from bench.bonnie import BonnieConfig, bonnie_command
from bench.images import MiB


def test_full_run_loop_row_writes_four_times_the_file() -> None:
    cfg = BonnieConfig()
    assert cfg.sizes("loop") == (4 * 2048, 512)
    assert cfg.sizes("tap-raw") == (2048, 512)
    assert cfg.image_size_for("loop") == 3 * 4 * 2048 * MiB
    assert cfg.image_size_for("tap-raw") == cfg.image_size
    cmd = bonnie_command(cfg, Path("/mnt"), "loop")
    assert cmd[cmd.index("-s") + 1] == "8192" and cmd[cmd.index("-r") + 1] == "512"


def test_quick_run_keeps_the_loop_file() -> None:
    cfg = BonnieConfig.quick_config()
    assert cfg.sizes("loop") == cfg.sizes("tap-raw") == (256, 64)
    assert cfg.sizes("qemu-nbd-qcow") == (24, 6)
