"""Options of the NBD server itself, shared by the commands that run one (serve, daemon
start). Only typer here: ``daemon start`` must not import serve's modules to get them."""

from __future__ import annotations

from typing import Annotated

import typer

from tapnbd.server.poll import POLL_US_MAX

PollUsOpt = Annotated[
    int,
    typer.Option(
        "--poll-us",
        min=0,
        max=POLL_US_MAX,
        help="Wait up to this many microseconds for a client's next request before "
        "sleeping, so that one-at-a-time requests find the CPU awake; the wait adapts "
        "to the client, as QEMU's poll-max-ns, and only a server's one client waits "
        "(0: off).",
    ),
]
