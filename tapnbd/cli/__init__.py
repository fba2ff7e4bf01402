"""``tapnbd`` command line. Each module registers its commands on ``app``.

Start-up imports only the module that defines the command being run, so ``tapnbd info``
never pays for the daemon, attach or the ring (``--help`` and unknown names load all).
"""

from __future__ import annotations

import gc
import importlib
import sys

# Start-up builds some hundred thousand objects (typer, the command modules, the
# formats) and frees almost none: the cyclic collector's passes over them find nothing.
# It is off while they are imported (here, and in main until the command runs), and
# what they made is then frozen out of its sight.
_gc_on = gc.isenabled()
gc.disable()
try:
    from tapnbd.cli.app import app
finally:
    if _gc_on:
        gc.enable()

__all__ = ["COMMANDS", "app", "load_commands", "main"]

#: Top-level command name -> the module that registers it.
COMMANDS: dict[str, str] = {
    "serve": "serve",
    "create": "image",
    "convert": "image",
    "info": "info",
    "check": "image",
    "rebase": "image_edit",
    "commit": "image_edit",
    "resize": "image_edit",
    "amend": "image_edit",
    "snapshot": "image_edit",
    "bitmap": "image_edit",
    "dd": "image",
    "bench": "image",
    "attach": "attach",
    "detach": "attach",
    "list": "attach",
    "stats": "stats",
    "daemon": "daemon",
    "export": "export",
    "ring": "ring",
    "map": "inspect",
    "compare": "inspect",
    "measure": "inspect",
}


def load_commands(name: str | None = None) -> None:
    """Import the module that defines ``name``, or every command module."""
    modules = [COMMANDS[name]] if name in COMMANDS else sorted(set(COMMANDS.values()))
    for module in modules:
        importlib.import_module(f"tapnbd.cli.{module}")


def _command_name(argv: list[str]) -> str | None:
    # The first word that is not an option; the top level takes only flags.
    return next((a for a in argv if not a.startswith("-")), None)


def main() -> None:
    argv = sys.argv[1:]
    gc_on = gc.isenabled()
    gc.disable()
    try:
        if not (argv and set(argv) <= {"--version", "-V"}):  # --version needs no command
            load_commands(_command_name(argv))
    finally:
        gc.freeze()  # start-up's objects live as long as the process: never scanned again
        if gc_on:
            gc.enable()
    app()
