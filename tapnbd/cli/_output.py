"""``--output=human|json`` (qemu-img's spelling), with ``--json`` kept as its alias.

JSON is printed by the json module, so it says true, false and null, never Python's
True or None, with qemu-img's four-space indentation.
"""

from __future__ import annotations

from typing import Annotated

import typer

from tapnbd.cli.app import fail

OutputOpt = Annotated[str, typer.Option("--output", metavar="FMT", help="human (default) or json.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Same as --output=json.")]


def wants_json(output: str, as_json: bool) -> bool:
    """True for JSON; a one-line error for an --output that is neither."""
    if output not in ("human", "json"):
        fail(f"--output {output!r}: use human or json", 1)
    return as_json or output == "json"


def print_json(value: object) -> None:
    import json  # only --output=json needs it

    print(json.dumps(value, indent=4))


def human_value(value: object) -> str:
    """A JSON scalar as a person reads it: true, false, none-free."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return str(value)


def qemu_size(n: int) -> str:
    """A size as qemu-img prints one: bytes as they are, else three significant digits
    and a binary unit (``1.5 GiB``)."""
    if n < 1024:
        return f"{n} B"
    v = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        v /= 1024
        if v < 1024:
            return f"{v:.3g} {unit}"
    return f"{v / 1024:.3g} EiB"
