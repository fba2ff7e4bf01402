"""Names from a header or the file system reach the terminal as text, never as markup
or escape sequences.

The attack: a stranger's image names its backing file ``[/x]`` (rich markup that
closes no tag) or puts terminal escapes in it (ESC [ 31 m recolours the terminal; others
retitle it or move the cursor). The CLI prints such names in errors, warnings and
``info``. Before, ``[/x]`` in an error made rich raise, so ``info`` and ``serve`` died
with a traceback instead of the message naming the field, ``disk [old].img`` lost its
``[old]`` in every message and in ``list``, and ``info`` printed the escapes raw.
"""

from __future__ import annotations

import struct
from pathlib import Path

from rich.console import Console

from tapnbd.cli.stats import render
from tapnbd.control.messages import ExportStats
from tests.control.tap import Tapnbd
from tests.helpers import run, tapnbd_cmd
from tests.security.test_remote_backing import evil_qcow2

MARKUP = "/nonexistent/[/x][bold]evil"
ESCAPES = "/nonexistent/\x1b[31mred\x1b]0;title\x07"


def qcow2_naming(path: Path, backing: str) -> Path:
    """A qcow2 image whose header names ``backing`` as its raw backing file, the name
    written into the header byte for byte (qemu-img's -b cannot carry ESC)."""
    stand_in = "/" + "b" * (len(backing.encode()) - 1)
    evil = evil_qcow2(path.parent, stand_in, path.name)
    data = bytearray(evil.read_bytes())
    offset, size = struct.unpack(">QI", data[8:20])
    assert data[offset : offset + size] == stand_in.encode()
    data[offset : offset + size] = backing.encode()
    evil.write_bytes(data)
    return evil


def test_markup_in_a_backing_name_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    image = qcow2_naming(tmp_path / "markup.qcow2", MARKUP)
    for cmd in (["info", str(image)], ["serve", "-k", str(tmp_path / "s.sock"), str(image)]):
        out = run(tapnbd_cmd(*cmd), check=False)
        assert out.returncode == 1, (cmd, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr
        (line,) = out.stderr.splitlines()
        assert line.startswith("tapnbd: ") and f"backing file {MARKUP!r}" in line, line


def test_escapes_in_a_backing_name_are_shown_escaped(tmp_path: Path) -> None:
    image = qcow2_naming(tmp_path / "escapes.qcow2", ESCAPES)
    # With its format given, info shows the image and warns that the chain is not.
    out = run(tapnbd_cmd("info", "-f", "qcow2", str(image)))
    assert "backing file: /nonexistent/\\x1b[31mred\\x1b]0;title\\x07\n" in out.stdout
    assert "warning: " in out.stderr
    for text in (out.stdout, out.stderr):
        assert "\x1b" not in text and "\x07" not in text, text


def test_list_and_stats_show_bracketed_names_as_they_are(tap: Tapnbd) -> None:
    image = tap.image("d[old][red].img", size="8M")
    added = tap.run("export", "add", str(image), "--name", "d[old]")
    assert added.returncode == 0 and f"exported {image} as 'd[old]'" in added.stderr, added
    wide = {**tap.env, "COLUMNS": "500"}  # rich wraps cells to the terminal's width
    table = run(tapnbd_cmd("list"), env=wide).stdout.splitlines()
    (row,) = [line for line in table if line.startswith("d[old] ")]
    assert f" {image} " in row, table
    stats = run(tapnbd_cmd("stats", "d[old]"), env=wide).stdout
    # (The title wraps to the table's width.)
    assert " ".join(stats.split()).startswith(f"d[old] {image} (raw)"), stats


def test_stats_says_statistics_are_off() -> None:
    """The title's "[statistics off]" was read as a (bad) style tag and vanished."""
    off = ExportStats(
        name="e", image="/i", format="raw", ops={}, errors_by_errno={},
        in_flight=0, connections=0, uptime_s=1.0, enabled=False,
    )  # fmt: skip
    console = Console(record=True, width=200)
    console.print(render([off]))
    words = " ".join(console.export_text().split())  # the title wraps to the table's width
    assert words.startswith("e /i (raw) connections 0 in flight 0 [statistics off] OP"), words
