"""Plain ``--help`` for every command: no typer metavars, no rich boxes, no internal
words; ``-V`` is ``--version``; ``python -m bench`` takes ``-h``."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from tapnbd.cli import app, load_commands

#: What must never show: typer's type metavars (<bool>, <str>, <list[str]>), its
#: {image} usage, rich's box drawing, and words only this project's history knows.
FORBIDDEN = re.compile(r"<[a-z][a-z\[\], |]*>|\{[a-z_]+\}|[─│╭╮╰╯┏┃━]|\bissues?\b|\bseed's\b", re.I)


def command_paths() -> Iterator[list[str]]:
    load_commands()

    def walk(cmd: Any, path: list[str]) -> Iterator[list[str]]:
        yield path
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            yield from walk(sub, [*path, name])

    yield from walk(get_command(app), [])


PATHS = list(command_paths())


def test_every_command_is_covered() -> None:
    names = {" ".join(p) for p in PATHS}
    assert {"serve", "daemon start", "export add", "stats", "convert", "check"} <= names


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "tapnbd")
def test_help_is_plain(path: list[str]) -> None:
    out = CliRunner().invoke(app, [*path, "--help"], terminal_width=200).output
    assert out.startswith("Usage: "), out
    bad = FORBIDDEN.findall(out)
    assert not bad, f"{bad} in:\n{out}"
    # Not padded to the terminal's width: no line ends in spaces.
    assert not [line for line in out.splitlines() if line != line.rstrip()], out


def test_short_version_is_long_version() -> None:
    def run(flag: str) -> str:
        cmd = [sys.executable, "-m", "tapnbd", flag]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
        return proc.stdout

    long = run("--version")
    assert long.startswith("tapnbd ") and run("-V") == long


def test_bench_takes_h() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "-h"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: ")
    assert not FORBIDDEN.findall(proc.stdout), proc.stdout
    assert "--out" in proc.stdout or "results" in proc.stdout


def test_bench_says_when_matplotlib_is_missing(tmp_path: Path) -> None:
    if importlib.util.find_spec("matplotlib") is not None:
        pytest.skip("matplotlib is installed here")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "fio", "--only", "no-such-row", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0  # the row selects nothing; the note comes first
    err = " ".join(proc.stderr.split())
    assert "matplotlib is not installed" in err and "make bench" in err, proc.stderr
    assert ".[bench]" in err


@pytest.mark.parametrize("command", ["fio", "bonnie", "ring", "all"])
def test_bench_command_help_is_plain(command: str) -> None:
    from bench.__main__ import app as bench_app

    out = CliRunner().invoke(bench_app, [command, "-h"], terminal_width=200).output
    assert out.startswith("Usage: ") and "--out" in out, out
    assert not FORBIDDEN.findall(out), out
