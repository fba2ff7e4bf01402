"""Shared pieces of the commands that talk to the daemon (daemon, export, attach, stats)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

import typer

from tapnbd.cli.app import say
from tapnbd.control.client import Client, Connection
from tapnbd.control.state import default_state_dir

if TYPE_CHECKING:
    from tapnbd.control.messages import ExportRecord

StateDirOpt = Annotated[
    str | None,
    typer.Option(
        "--state-dir",
        envvar="TAPNBD_STATE_DIR",
        help="The daemon's state directory. [default: /run/tapnbd]",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def report(message: str) -> None:
    """Progress and notes go to stderr, so stdout stays clean for scripts."""
    say("tapnbd:", "dim", message)


def client(state_dir: str | None) -> Client:
    return Client(state_dir or default_state_dir(), report=report)


def connect(state_dir: str | None, autostart: bool = True) -> Connection:
    """A connection to the daemon, started (and its predecessor cleaned up) as needed."""
    return client(state_dir).connect(autostart=autostart)


def image_spec(image: str) -> str:
    """Images go to the daemon as absolute paths: its working directory is not ours."""
    from formats import is_local_path

    if not is_local_path(image):
        return image
    return os.path.abspath(image)


def data_path_words(cache: str, throwaway: bool, share: bool) -> list[str]:
    """What export add and attach both report of the options both take (--cache, -s,
    --share), a phrase each, none for a default."""
    words = [f"cache {cache}"] if cache != "writeback" else []
    if throwaway:
        words.append("writes to a throwaway overlay")
    if share:
        words.append("shared")
    return words


def export_words(e: ExportRecord) -> list[str]:
    """How export add's options set ``e`` apart from the defaults, a phrase each:
    ``export add`` reports them and ``list`` shows them, the trust options included."""
    words = [] if e.snapshot is None else [f"snapshot {e.snapshot!r}"]
    words += [f"bitmap {b}" for b in e.bitmaps]
    if e.allocation_depth:
        words.append("allocation depth")
    if e.discard != "unmap":
        words.append(f"discard {e.discard}")
    if e.detect_zeroes != "off":
        words.append(f"detect-zeroes {e.detect_zeroes}")
    if e.offset:
        words.append(f"from byte {e.offset}")
    words += data_path_words(e.cache, e.throwaway, e.share)
    t = e.trust
    if t.backing_format is not None:
        words.append(f"backing format {t.backing_format}")
    if t.allow_probed_chain:
        words.append("probed backing chain allowed")
    if t.allow_block_devices:
        words.append("block devices allowed")
    if t.allow_remote_backing:
        words.append("remote backing allowed")
    return words


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
