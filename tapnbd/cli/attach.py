"""``tapnbd attach|detach|list``: images as local block devices (``xm block-attach``)."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tapnbd.cli._control import (
    JsonOpt,
    StateDirOpt,
    connect,
    data_path_words,
    export_words,
    human_size,
    image_spec,
    report,
)
from tapnbd.cli._image_opts import (
    CacheOpt,
    NoCacheOpt,
    ProbedFormatOpt,
    SnapshotOpt,
    cache_mode,
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
from tapnbd.cli.app import app, errors_as_exit, fail, plain
from tapnbd.control.messages import (
    AttachReply,
    AttachRequest,
    DetachReply,
    DetachRequest,
    ListReply,
    ListRequest,
    Via,
    to_builtins,
)

console = Console()


@app.command("attach")
def attach_cmd(
    image: Annotated[
        str, typer.Argument(help="Image to attach (a path, ram:SIZE, or an export's name).")
    ],
    read_only: Annotated[
        bool, typer.Option("--read-only", "-r", help="A read-only device.")
    ] = False,
    fmt: ProbedFormatOpt = "auto",
    via: Annotated[
        str,
        typer.Option(
            help="auto (kernel nbd if it can, else nbdfuse), nbd, fuse, or socket (no "
            "local device: print the data path's NBD socket, for a VM)."
        ),
    ] = "auto",
    name: Annotated[
        str | None, typer.Option(help="Export name. [default: the file's name]")
    ] = None,
    snapshot: SnapshotOpt = None,
    cache: CacheOpt = "writeback",
    nocache: NoCacheOpt = False,
    throwaway: Annotated[
        bool,
        throwaway_option(
            "the daemon's $TMPDIR",
            "with the device's data path (detach); it outlives a daemon restart, as the "
            "device does",
        ),
    ] = False,
    share: ShareOpt = False,
    backing_format: BackingFormatOpt = None,
    allow_probed_chain: AllowProbedChainOpt = False,
    allow_block_devices: AllowBlockOpt = False,
    allow_remote_backing: AllowRemoteOpt = False,
    state_dir: StateDirOpt = None,
) -> None:
    """Attach an image as a local block device; print the device's path."""
    cache = cache_mode(cache, nocache)
    if via not in ("auto", "nbd", "fuse", "socket"):
        from tapnbd.cli.app import fail

        fail(f"--via must be auto, nbd, fuse or socket, not {via!r}")
    spec = image if _is_export_name(image) else image_spec(image)
    with errors_as_exit(), connect(state_dir) as conn:
        req = AttachRequest(
            image=spec,
            name=name,
            read_only=read_only,
            format=fmt,
            via=_via(via),
            snapshot=snapshot,
            cache=cache,
            share=share,
            throwaway=throwaway,
            trust=daemon_trust(
                backing_format, allow_probed_chain, allow_block_devices, allow_remote_backing
            ),
        )
        reply = conn.call(req, AttachReply)
    att = reply.attachment
    words = [] if att.snapshot is None else [f"snapshot {att.snapshot!r}"]
    words += ["read-only"] if att.read_only else []
    words += data_path_words(att.cache, att.throwaway, att.share)
    report(f"attached {att.image} as {att.device} via {', '.join([reply.reason, *words])}")
    print(att.device)


@app.command("detach")
def detach_cmd(
    target: Annotated[
        str, typer.Argument(help="The device (/dev/loop0), the image, or the export's name.")
    ],
    state_dir: StateDirOpt = None,
) -> None:
    """Detach a device (refused while it is mounted)."""
    spec = target if _is_export_name(target) else os.path.abspath(target)
    with errors_as_exit(), connect(state_dir, autostart=False) as conn:
        reply = conn.call(DetachRequest(target=spec), DetachReply)
    att = reply.attachment
    report(f"detached {att.device} ({att.image})")
    if reply.removed_export:
        report(f"closed export {att.export!r}")
    if not reply.flushed:
        fail(f"{att.image}: closed without a last flush, as a crash would leave it; see its log")


@app.command("list")
def list_cmd(state_dir: StateDirOpt = None, as_json: JsonOpt = False) -> None:
    """Exports and attached devices: image, format, device, connections, read-only,
    and the options each export was added with (trust options too) where not the defaults."""
    with errors_as_exit(), connect(state_dir) as conn:
        reply = conn.call(ListRequest(), ListReply)
    if as_json:
        print(json.dumps(to_builtins(reply), indent=2))
        return
    table = Table(title=None, box=None, header_style="bold", pad_edge=False)
    for col in ("EXPORT", "IMAGE", "FORMAT", "SIZE", "DEVICE", "VIA", "CLIENTS", "RO", "OPTIONS"):
        table.add_column(col, justify="right" if col in ("SIZE", "CLIENTS") else "left")
    via = {a.device: a.via for a in reply.attachments}
    for e in reply.exports:
        table.add_row(
            plain(e.name),
            plain(e.image),
            e.format,
            human_size(e.size),
            plain(", ".join(e.devices) or "-"),
            ", ".join(via.get(d, "") for d in e.devices) or "-",
            str(e.clients),
            "yes" if e.read_only else "no",
            plain(", ".join(export_words(e)) or "-"),
        )
    if not reply.exports:
        report("no exports; add one with `tapnbd export add IMAGE` or `tapnbd attach IMAGE`")
        return
    console.print(table)


def _is_export_name(target: str) -> bool:
    """A bare word that names no file is taken as an export's name."""
    return (
        not target.startswith(("/", ".", "ram:", "rbd:"))
        and "/" not in target
        and not os.path.exists(target)
    )


def _via(value: str) -> Via:
    if value == "nbd":
        return "nbd"
    if value == "fuse":
        return "fuse"
    if value == "socket":
        return "socket"
    return "auto"
