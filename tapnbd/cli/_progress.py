"""The progress bar of convert, commit, rebase and compare (qemu-img's ``-p``), and the
``-r`` rate option: one ``formats.pacing.Pace`` whose callbacks draw a rich bar on
stderr.

The bar is drawn once the copy knows its size (``Pace.begin``), so a command that fails
to open its image prints its error bare. rich.progress is imported only when a bar is
shown (it costs about 20 ms of start-up).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from formats.pacing import Pace

RateOpt = Annotated[
    str | None,
    typer.Option(
        "--rate-limit",
        "-r",
        metavar="RATE",
        help="At most RATE bytes a second (10M), read and written (qemu-img's -r).",
    ),
]
ProgressOpt = Annotated[
    bool, typer.Option("--progress", "-p", help="Show a progress bar on stderr (qemu-img's -p).")
]


def parse_rate(text: str | None) -> int:
    """-r's bytes a second (0: no limit); qemu's size units."""
    if text is None:
        return 0
    from formats import parse_size

    return parse_size(text)


@contextmanager
def progress_bar(
    label: str, shown: bool, rate: int = 0
) -> Iterator[tuple[Pace, Callable[[str], None]]]:
    """A Pace for one command, drawing a bar if ``shown``, and a function that prints
    a line above the bar (or alone, without one)."""
    from formats.pacing import Pace

    if not shown:
        yield Pace(rate), lambda line: typer.echo(line, err=True)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    task = bar.add_task(label, total=None)

    def started(total: int) -> None:
        bar.update(task, total=total)
        if not bar.live.is_started:
            bar.start()

    def note(line: str) -> None:
        bar.console.print(line, highlight=False, soft_wrap=True, markup=False)

    try:
        yield Pace(rate, started, lambda n: bar.advance(task, n)), note
    finally:
        if bar.live.is_started:
            bar.stop()
