"""The typer application every command module registers with."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, NoReturn, TypeVar

import typer

from tapnbd.errors import TapnbdError

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(
    name="tapnbd",
    help="blktap's toolset on today's plumbing: serve, attach and manage disk images over NBD.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


@cache
def err_console() -> Console:
    """The stderr console, made on first use (rich costs ~15 ms to import)."""
    from rich.console import Console

    return Console(stderr=True)


T = TypeVar("T")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line error and exit non-zero."""
    err_console().print(f"[bold red]tapnbd:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def errors_as_exit(code: int = 1) -> Iterator[None]:
    """Turn TapnbdError and OSError into a one-line error (the CLI boundary)."""
    try:
        yield
    except TapnbdError as e:
        fail(str(e), code)
    except OSError as e:
        fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}", code)


def wrap(fn: Callable[[], T]) -> T:
    with errors_as_exit():
        return fn()
    raise AssertionError("unreachable")


def _version(value: bool) -> None:
    if value:
        from tapnbd import __version__

        typer.echo(f"tapnbd {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """blktap's toolset on today's plumbing: serve, attach and manage disk images over NBD."""
