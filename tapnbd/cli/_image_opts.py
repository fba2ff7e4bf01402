"""Options naming how an image is opened, shared by the commands that serve or show it
(serve, export add, attach, ring serve, info)."""

from __future__ import annotations

from typing import Annotated

import typer

ProbedFormatOpt = Annotated[
    str, typer.Option("--format", "-f", help="auto (probed), raw, qcow, qcow2 or vhd (vpc).")
]
BitmapOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--bitmap",
        "-B",
        metavar="NAME",
        help="Offer the qcow2 image's persistent dirty bitmap NAME as the "
        "qemu:dirty-bitmap:NAME block status context (qemu-nbd -B); repeatable.",
    ),
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
