"""``tapnbd`` command line. Each module registers its commands on ``app``."""

from __future__ import annotations

from tapnbd.cli import serve  # noqa: F401  (registers commands)
from tapnbd.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    app()
