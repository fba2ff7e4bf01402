"""``make soak``'s harness (bench.soak), small: 4 fio connections with crc32c
verification for 2 s against one server, run from an empty directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import need

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_soak_passes_and_leaves_the_directory_as_it_was(tmp_path: Path) -> None:
    need("fio")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "bench.soak", "--connections", "4", "--duration", "2"]
    cmd += ["--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mismatches 0" in proc.stdout and proc.stdout.rstrip().endswith("PASS")
    # fio saves a verify state file per job in its cwd unless told not to.
    assert list(cwd.iterdir()) == []
