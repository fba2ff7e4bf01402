"""The progress display: which row and which phase is running, and how far along the run is.

On a terminal this is a live rich progress bar. Elsewhere (CI, a pipe, the quick test)
each phase change is printed as one plain line instead, so logs still tell the story.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


class UI:
    def __init__(self, title: str, total: int, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.title = title
        self.total = total
        self.live = self.console.is_terminal
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            TextColumn("[cyan]{task.fields[row]}"),
            TextColumn("{task.fields[phase]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.live,
            transient=False,
        )
        self.task: TaskID | None = None
        self.started = time.monotonic()
        self._row = ""

    def __enter__(self) -> UI:
        self.progress.__enter__()
        self.task = self.progress.add_task(self.title, total=self.total, row="", phase="")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.__exit__(exc_type, exc, tb)

    def phase(self, row: str, phase: str) -> None:
        """Row ``row`` is now in ``phase``."""
        self._row = row
        if self.task is not None:
            self.progress.update(self.task, row=row, phase=phase)
        if not self.live:
            elapsed = time.monotonic() - self.started
            self.console.print(f"[{elapsed:6.1f}s] {self.title}: {row}: {phase}", highlight=False)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)

    def log(self, message: str) -> None:
        self.progress.console.print(message, highlight=False)
