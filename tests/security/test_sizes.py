"""Sizes: junk, inf, nan and 1e400 get a one-line error, never a traceback (issue 11)."""

from __future__ import annotations

from pathlib import Path

import pytest

from formats import parse_size
from tapnbd.errors import ImageError
from tests.helpers import run, tapnbd_cmd

BAD = ["inf", "1e400", "nan", "-1", "0", "", "junk", "1Q", "0.3K", "1e3", "0x10", "1_000", " K"]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("1K", 1024),
        ("1k", 1024),
        ("512M", 512 << 20),
        ("1G", 1 << 30),
        ("1GiB", 1 << 30),
        ("1.5K", 1536),
        ("0.5K", 512),
        ("2T", 2 << 40),
        ("1P", 1 << 50),
        ("1E", 1 << 60),
        (" 8M ", 8 << 20),
    ],
)
def test_sizes_parse(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", BAD)
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ImageError, match="invalid size"):
        parse_size(text)


def test_zero_when_allowed() -> None:
    assert parse_size("0", allow_zero=True) == 0


@pytest.mark.parametrize("text", ["inf", "1e400", "nan", "junk"])
@pytest.mark.parametrize("where", ["create", "cluster", "serve-ram"])
def test_cli_says_one_line(tmp_path: Path, text: str, where: str) -> None:
    cmd = {
        "create": ["create", "-f", "raw", "-s", text, str(tmp_path / "x.img")],
        "cluster": ["create", "-s", "1M", "--cluster-size", text, str(tmp_path / "x.qcow")],
        "serve-ram": ["serve", f"ram:{text}", "--port", "0"],
    }[where]
    proc = run(tapnbd_cmd(*cmd), check=False, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "invalid size" in proc.stderr, proc.stderr
