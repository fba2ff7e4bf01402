"""``tapnbd`` command line. Each module registers its commands on ``app``."""

from __future__ import annotations

from tapnbd.cli import (
    attach,  # noqa: F401
    daemon,  # noqa: F401
    export,  # noqa: F401
    image,  # noqa: F401
    ring,  # noqa: F401
    serve,  # noqa: F401  (registers commands)
    stats,  # noqa: F401
)
from tapnbd.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    app()
