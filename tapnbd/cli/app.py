"""The typer application every command module registers with."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, NoReturn, TypeVar

import typer
from typer import core as typer_core

from tapnbd.errors import TapnbdError
from tapnbd.text import printable

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

#: Plain help (click's formatter): no rich boxes padded to the terminal's width.
PLAIN = None


def _plain_metavars() -> None:
    """Help shows ``--port PORT`` and ``IMAGES...``, as click and qemu-img do, where
    typer 0.28 prints Python types (``<str>``) and ``{images}``. typer is pinned to 0.28
    for start-up (README, "Dependencies"); these are its metavar hooks."""

    def option_metavar(self: typer_core.TyperOption, ctx: object = None) -> str:
        if self.metavar is not None:
            return self.metavar
        choices = getattr(self.type, "choices", None)
        if choices:
            return "[" + "|".join(str(getattr(c, "value", c)) for c in choices) + "]"
        return (self.name or "value").upper()

    def argument_metavar(
        self: typer_core.TyperArgument, ctx: object = None, usage: bool = False
    ) -> str:
        name = (self.metavar or (self.name or "arg").upper()) + ("..." if self.nargs != 1 else "")
        return f"[{name}]" if usage and not self.required else name

    typer_core.TyperOption.make_metavar = option_metavar  # type: ignore[method-assign]
    typer_core.TyperArgument.make_metavar = argument_metavar  # type: ignore[method-assign]


_plain_metavars()

app = typer.Typer(
    name="tapnbd",
    help="blktap's toolset on today's plumbing: serve, attach and manage disk images over NBD.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


@cache
def err_console() -> Console:
    """The stderr console, made on first use (rich costs ~15 ms to import)."""
    from rich.console import Console

    return Console(stderr=True)


def plain(text: str, style: str = "") -> Text:
    """``text`` for rich as it is: never read as markup (``disk [old].img`` would lose
    its ``[old]``, and ``[/x]`` raises), its control characters escaped."""
    from rich.text import Text

    return Text(printable(text), style=style)


def say(prefix: str, style: str, message: str) -> None:
    """One line on stderr: a styled ``tapnbd:``-like prefix, then ``message`` as it is."""
    from rich.text import Text

    line = Text.assemble(plain(prefix, style), " ", plain(message))
    err_console().print(line, highlight=False, soft_wrap=True)


T = TypeVar("T")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line error and exit non-zero."""
    say("tapnbd:", "bold red", message)
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
        False,
        "--version",
        "-V",
        callback=_version,
        is_eager=True,
        help="Show the version and exit.",
    ),
) -> None:
    """blktap's toolset on today's plumbing: serve, attach and manage disk images over NBD."""
