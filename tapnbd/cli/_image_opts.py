"""Options naming how an image is opened, shared by the commands that serve or show it
(serve, export add, attach, ring serve, info)."""

from __future__ import annotations

from typing import Annotated, Any

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
DiscardOpt = Annotated[
    str,
    typer.Option(
        "--discard",
        metavar="MODE",
        help="unmap: TRIM frees space (the default here); ignore: TRIM succeeds and "
        "changes nothing, qemu-nbd's default.",
    ),
]
DetectZeroesOpt = Annotated[
    str,
    typer.Option(
        "--detect-zeroes",
        metavar="MODE",
        help="off; on: a WRITE of zeros is stored as a zeroing, not data; unmap: and may "
        "free the space (needs --discard=unmap). As qemu-nbd.",
    ),
]


def cache_option(short: str, long: str, metavar: str, what: str) -> Any:  # typer.Option: Any
    """qemu-img's -t/-T CACHE: ``what`` the mode is for."""
    return typer.Option(
        short,
        long,
        metavar=metavar,
        help=f"{what}: writeback, writethrough, none or directsync (past the page cache), "
        "or unsafe (no flushes).",
    )


CacheOpt = Annotated[
    str,
    typer.Option(
        "--cache",
        metavar="MODE",
        help="writeback: writes are durable at FLUSH or FUA; writethrough: every write is "
        "durable before its reply; none: as writeback, past the host's page cache "
        "(O_DIRECT); directsync: as writethrough, past it; unsafe: FLUSH and FUA do "
        "nothing (qemu-nbd --cache).",
    ),
]
NoCacheOpt = Annotated[bool, typer.Option("--nocache", "-n", help="--cache=none (qemu-nbd -n).")]


def cache_mode(cache: str, nocache: bool) -> str:
    """The mode --cache and -n ask for together (-n is --cache=none)."""
    if not nocache:
        return cache
    if cache not in ("writeback", "none"):
        from tapnbd.cli.app import fail

        fail(f"-n is --cache=none, and --cache={cache} was given too")
    return "none"


OffsetOpt = Annotated[
    str,
    typer.Option(
        "--offset",
        "-o",
        help="Serve the image from this byte on, e.g. 1M: the export is that much smaller "
        "(qemu-nbd -o).",
    ),
]


def throwaway_option(where: str, gone: str) -> Any:  # typer.Option is typed Any
    """qemu-nbd's -s: ``where`` the overlay is made, and when it is ``gone``."""
    return typer.Option(
        "--throwaway",
        "-s",
        help=f"Writes go to a temporary qcow2 overlay in {where} (else /var/tmp), deleted "
        f"at once and gone {gone}; the image itself is only read (qemu-nbd -s).",
    )


AllocationDepthOpt = Annotated[
    bool,
    typer.Option(
        "--allocation-depth",
        "-A",
        help="Offer the qemu:allocation-depth block status context: which layer of the "
        "backing chain holds each run (qemu-nbd -A).",
    ),
]


def snapshot_option(what: str) -> Any:  # typer.Option is typed Any
    """qemu's -l SNAPSHOT: ``what`` the command does with it, then how it is named."""
    return typer.Option(
        "-l",
        "--snapshot",
        "--load-snapshot",
        metavar="SNAPSHOT",
        help=f"{what}: an id or a name, or snapshot.id=ID,snapshot.name=NAME.",
    )


SnapshotOpt = Annotated[
    str | None,
    snapshot_option("Show this internal qcow2 snapshot, read-only, as qemu-nbd -l does"),
]
