"""docs/commands.md is the CLI's own description of itself, and is up to date."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tapnbd.cli import COMMANDS
from tapnbd.cli.docs import reference
from tests.helpers import ROOT, run, tapnbd_cmd

DOC = ROOT / "docs" / "commands.md"


def test_committed_reference_is_up_to_date() -> None:
    fresh = reference()
    assert DOC.read_text() == fresh, "docs/commands.md is stale: run `make docs`"
    for name in COMMANDS:
        assert f"## `tapnbd {name}`" in fresh, name


def test_reference_says_what_help_says(tmp_path: Path) -> None:
    # The generator writes to a file as make docs runs it, and what it lists for a
    # command is what the command's --help shows.
    out = tmp_path / "commands.md"
    run([sys.executable, "-m", "tapnbd.cli.docs", "--output", str(out)])
    assert out.read_text() == DOC.read_text()
    section = DOC.read_text().split("## `tapnbd map`")[1].split("\n## ")[0]
    help_text = run(tapnbd_cmd("map", "--help"), env={**os.environ, "COLUMNS": "200"}).stdout
    for option in ("--output", "--start-offset", "--max-length", "--format"):
        assert option in section and option in help_text, option
