"""Shared pieces of the commands that talk to the daemon (daemon, export, attach, stats)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from tapnbd.cli.app import err_console
from tapnbd.control.client import Client, Connection
from tapnbd.control.state import default_state_dir

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
    err_console().print(f"[dim]tapnbd:[/] {message}", highlight=False, soft_wrap=True)


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


def data_path_words(cache: str, throwaway: bool, share: bool) -> str:
    """What export add and attach both report of the options both take (--cache, -s,
    --share), each as ", words", nothing for a default."""
    words = f", cache {cache}" if cache != "writeback" else ""
    if throwaway:
        words += ", writes to a throwaway overlay"
    if share:
        words += ", shared"
    return words


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
