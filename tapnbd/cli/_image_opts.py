"""Options naming how an image is opened, shared by the commands that serve or show it
(serve, export add, attach, ring serve, info)."""

from __future__ import annotations

from typing import Annotated

import typer

ProbedFormatOpt = Annotated[
    str, typer.Option("--format", "-f", help="auto (probed), raw, qcow, qcow2 or vhd (vpc).")
]
SnapshotOpt = Annotated[
    str | None,
    typer.Option(
        "--snapshot",
        "-l",
        help="Show this internal qcow2 snapshot, read-only, as qemu-nbd -l does: an id "
        "or a name, or snapshot.id=ID,snapshot.name=NAME.",
    ),
]
