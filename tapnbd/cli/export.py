"""``tapnbd export add|remove``: exports added to and removed from the running daemon."""

from __future__ import annotations

from typing import Annotated

import typer

from tapnbd.cli._control import (
    StateDirOpt,
    connect,
    export_words,
    human_size,
    image_spec,
    report,
)
from tapnbd.cli._image_opts import (
    AllocationDepthOpt,
    BitmapOpt,
    CacheOpt,
    DetectZeroesOpt,
    DiscardOpt,
    OffsetOpt,
    ProbedFormatOpt,
    SnapshotOpt,
    throwaway_option,
)
from tapnbd.cli._trust import (
    AllowBlockOpt,
    AllowProbedChainOpt,
    AllowRemoteOpt,
    BackingFormatOpt,
    ShareOpt,
    daemon_trust,
)
from tapnbd.cli.app import PLAIN, app, errors_as_exit, fail
from tapnbd.control.messages import (
    ExportAddReply,
    ExportAddRequest,
    ExportRemoveReply,
    ExportRemoveRequest,
)

export_app = typer.Typer(
    rich_markup_mode=PLAIN, help="Add and remove the daemon's NBD exports.", no_args_is_help=True
)
app.add_typer(export_app, name="export")


@export_app.command("add")
def add_cmd(
    image: Annotated[str, typer.Argument(help="Image to export (a path, or ram:SIZE).")],
    name: Annotated[
        str | None, typer.Option(help="Export name. [default: the file's name]")
    ] = None,
    read_only: Annotated[bool, typer.Option("--read-only", "-r", help="Refuse writes.")] = False,
    fmt: ProbedFormatOpt = "auto",
    snapshot: SnapshotOpt = None,
    bitmap: BitmapOpt = None,
    allocation_depth: AllocationDepthOpt = False,
    discard: DiscardOpt = "unmap",
    detect_zeroes: DetectZeroesOpt = "off",
    offset: OffsetOpt = "0",
    cache: CacheOpt = "writeback",
    throwaway: Annotated[
        bool,
        throwaway_option(
            "the daemon's $TMPDIR",
            "with the export (export remove, daemon stop); a restarted daemon opens the "
            "export over a new, empty one",
        ),
    ] = False,
    share: ShareOpt = False,
    backing_format: BackingFormatOpt = None,
    allow_probed_chain: AllowProbedChainOpt = False,
    allow_block_devices: AllowBlockOpt = False,
    allow_remote_backing: AllowRemoteOpt = False,
    state_dir: StateDirOpt = None,
) -> None:
    """Export an image from the daemon; print its NBD URIs."""
    from formats import parse_size

    with errors_as_exit(), connect(state_dir) as conn:
        req = ExportAddRequest(
            image=image_spec(image),
            name=name,
            read_only=read_only,
            format=fmt,
            snapshot=snapshot,
            bitmaps=bitmap or [],
            allocation_depth=allocation_depth,
            discard=discard,
            detect_zeroes=detect_zeroes,
            cache=cache,
            offset=parse_size(offset, allow_zero=True),
            share=share,
            throwaway=throwaway,
            trust=daemon_trust(
                backing_format, allow_probed_chain, allow_block_devices, allow_remote_backing
            ),
        )
        export = conn.call(req, ExportAddReply).export
    mode = ", ".join(["read-only" if export.read_only else "read-write", *export_words(export)])
    report(
        f"exported {export.image} as {export.name!r} "
        f"({export.format}, {human_size(export.size)}, {mode})"
    )
    for uri in export.uris:
        print(uri)


@export_app.command("remove")
def remove_cmd(
    name: Annotated[str, typer.Argument(help="Export name.")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Detach its devices and disconnect its clients first."),
    ] = False,
    state_dir: StateDirOpt = None,
) -> None:
    """Stop exporting an image (refused while attached or in use, unless --force)."""
    with errors_as_exit(), connect(state_dir, autostart=False) as conn:
        reply = conn.call(ExportRemoveRequest(name=name, force=force), ExportRemoveReply)
    for device in reply.detached:
        report(f"detached {device}")
    if reply.disconnected:
        report(f"disconnected {reply.disconnected} client(s)")
    report(f"removed export {reply.name!r}")
    if not reply.flushed:
        fail(
            f"export {reply.name!r}: closed without a last flush, as a crash would leave it;"
            " see the daemon's log"
        )
