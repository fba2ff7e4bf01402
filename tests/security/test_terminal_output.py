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

import io
import logging
import struct
from pathlib import Path

from rich.console import Console

from tapnbd.cli.stats import render
from tapnbd.control.messages import ExportStats
from tapnbd.logformat import LogFormatter
from tests.control.tap import Tapnbd
from tests.helpers import run, start_server, tapnbd_cmd
from tests.security.test_remote_backing import evil_qcow2

MARKUP = "/nonexistent/[/x][bold]evil"
ESCAPES = "/nonexistent/\x1b[31mred\x1b]0;title\x07"
#: A file name that, logged raw, recolours and retitles the terminal and ends the record's
#: line to start one that reads like the daemon's own.
FORGED = "2026-12-04 12:00:00,000 ERROR tapnbd.control: forged"
HOSTILE_FILE = "d\x1b[31m\x1b]0;title\x07\u202e\n" + FORGED


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


def assert_logged_as_text(log: str, anchor: str) -> None:
    """The record holding ``anchor`` shows HOSTILE_FILE escaped, on its own one line."""
    assert "\x1b" not in log and "\x07" not in log and "\u202e" not in log, log
    assert not any(line.startswith(FORGED) for line in log.splitlines()), log
    (line,) = [line for line in log.splitlines() if anchor in line]
    assert "d\\x1b[31m\\x1b]0;title\\x07\\u202e\\x0a" + FORGED in line, line


def test_a_hostile_file_name_cannot_forge_a_line_in_the_daemons_log(tap: Tapnbd) -> None:
    """The daemon logs each export's image path; a file in a shared directory names it."""
    image = tap.image(HOSTILE_FILE + ".img", size="8M")
    tap.ok("export", "add", str(image), "--name", "d")
    assert_logged_as_text((tap.state / "tapnbd.log").read_text(), "added export 'd'")


def test_a_hostile_file_name_reaches_serves_stderr_as_text(tmp_path: Path) -> None:
    """``tapnbd serve`` logs to the terminal; a VHD whose last footer is damaged makes it
    warn with the file's name."""
    vhd = tmp_path / (HOSTILE_FILE + ".vhd")
    run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", str(vhd), "8M"])
    data = bytearray(vhd.read_bytes())
    data[-512 + 64] ^= 0xFF  # the footer's checksum: the copy at offset 0 is used
    vhd.write_bytes(data)
    server = start_server(["--socket", str(tmp_path / "s.sock"), str(vhd)], tmp_path / "serve.log")
    assert server.stop() == 0
    assert_logged_as_text(server.stderr(), "using the footer's copy at offset 0")


def test_a_traceback_keeps_its_lines_but_no_escapes() -> None:
    """``log.exception`` of an error quoting a hostile name: the record's first line is
    the formatter's, the traceback follows indented, and no escape reaches the log."""
    log = logging.getLogger("tapnbd.test.hostile")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogFormatter("%(levelname)s %(message)s"))
    # A plain formatter before ours caches the raw traceback on the record.
    raw = logging.StreamHandler(io.StringIO())
    for h in (raw, handler):
        log.addHandler(h)
    try:
        try:
            raise OSError(f"cannot open {HOSTILE_FILE!s}")
        except OSError:
            log.exception("opening %s", HOSTILE_FILE)
    finally:
        for h in (raw, handler):
            log.removeHandler(h)
    text = stream.getvalue()
    first, *trace = text.splitlines()
    assert first.startswith("ERROR opening d\\x1b[31m") and first.endswith(FORGED), first
    assert trace[0] == "  Traceback (most recent call last):", trace
    assert trace[-2].startswith("  OSError: cannot open d\\x1b[31m"), trace
    assert trace[-1] == "  " + FORGED, trace  # the name's newline, kept but indented
    assert all(line.startswith("  ") for line in trace), trace
    assert "\x1b" not in text and "\u202e" not in text, text
