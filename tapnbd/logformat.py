"""Log records as text: one line a record, whatever names its message quotes.

A message may quote a name from an image header, a shared directory or a peer (see
tapnbd.text). Logged raw, a newline in it would start a line that reads like a record of
the daemon's own, and an escape would reach whoever runs ``tail -f`` on the log, or the
terminal ``tapnbd serve`` logs to.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import TypeAlias

from tapnbd.text import one_line, printable

_ExcInfo: TypeAlias = tuple[type[BaseException], BaseException, TracebackType | None]


class LogFormatter(logging.Formatter):
    """A record starts with its one line, however its arguments read. A traceback
    follows on lines indented by two spaces, so that a newline in an exception's message
    cannot start a line that reads like a record of its own; no line holds an escape."""

    def format(self, record: logging.LogRecord) -> str:
        # A traceback another formatter cached on the record would go out as it was.
        cached, record.exc_text = record.exc_text, None
        try:
            return super().format(record)
        finally:
            record.exc_text = cached

    def formatMessage(self, record: logging.LogRecord) -> str:
        # format() sets record.message afresh for every handler, so this changes nothing
        # that another handler sees.
        record.message = one_line(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: _ExcInfo | tuple[None, None, None]) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "  " + printable(text).replace("\n", "\n  ")


def log_to_stderr(level: int, fmt: str) -> None:
    """``logging.basicConfig`` for a command, with records made safe to print."""
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])
