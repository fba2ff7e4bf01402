"""``tapnbd info`` and ``--version`` import only what they draw (issue 15, CLI start-up)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys
sys.argv = ["tapnbd", *sys.argv[1:]]
from tapnbd.cli import main
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""

#: Modules a plain image command must never pay for.
HEAVY = ("tapnbd.control.daemon", "tapnbd.control.attach", "tapnbd.xen", "rich.table")


def loaded_modules(*args: str) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True
    )
    return set(json.loads(proc.stderr.strip().splitlines()[-1]))


def test_version_imports_no_command_module() -> None:
    mods = loaded_modules("--version")
    assert not {m for m in mods if m.startswith("tapnbd.cli.") and m != "tapnbd.cli.app"}
    assert "rich.console" not in mods


def test_info_imports_only_the_image_commands(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(65536))
    mods = loaded_modules("info", str(img))
    assert "tapnbd.cli.image" in mods
    assert not [m for m in mods if m.startswith(HEAVY)]


def test_help_still_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tapnbd", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("serve", "info", "attach", "daemon", "export", "ring", "stats"):
        assert name in out
