"""``tapnbd rebase``, ``commit``, ``resize``, ``amend``, ``snapshot`` and ``bitmap``: the commands
that change an image in place, in qemu-img's spellings. Each takes the image's lock
before it writes.

The commands only parse their options and call the library (formats.rebase,
formats.commit, formats.resize, formats.qcow2.amend, formats.qcow2.snapshot_edit,
formats.qcow2.bitmap_edit).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

import typer

from tapnbd import runtime
from tapnbd.cli._image_opts import cache_option
from tapnbd.cli._progress import ProgressOpt, RateOpt, parse_rate, progress_bar
from tapnbd.cli._trust import (
    AllowBlockOpt,
    AllowProbedChainOpt,
    AllowRemoteOpt,
    ForceShareOpt,
    open_rules,
)
from tapnbd.cli.app import app, errors_as_exit

if TYPE_CHECKING:
    from collections.abc import Callable

    from formats.qcow2.layout import Snapshot

FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        "-f",
        help="The image's format: qcow, qcow2, vhd or raw (default: probed; a probed "
        "image's backing file is then not followed).",
    ),
]


@app.command("rebase")
def rebase_cmd(
    image: Annotated[str, typer.Argument(help="The qcow or qcow2 overlay to change.")],
    backing: Annotated[
        str,
        typer.Option(
            "--backing",
            "-b",
            help='The new backing file, relative to the image\'s directory ("" for none).',
        ),
    ],
    backing_fmt: Annotated[
        str | None,
        typer.Option("--backing-format", "-F", help="The new backing file's format."),
    ] = None,
    unsafe: Annotated[
        bool,
        typer.Option("--unsafe", "-u", help="Change the name only: the contents are not compared."),
    ] = False,
    fmt: FormatOpt = "auto",
    allow_probed_chain: AllowProbedChainOpt = False,
    allow_block_devices: AllowBlockOpt = False,
    allow_remote_backing: AllowRemoteOpt = False,
    force_share: ForceShareOpt = False,
    show_progress: ProgressOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    cache: Annotated[
        str,
        cache_option(
            "-t",
            "--cache",
            "CACHE",
            "The image's cache mode, and its old backing chain's (qemu-img -t)",
        ),
    ] = "writeback",
    src_cache: Annotated[
        str,
        cache_option(
            "-T", "--source-cache", "SRC_CACHE", "The new backing file's cache mode (qemu-img -T)"
        ),
    ] = "writeback",
) -> None:
    """Give an overlay a new backing file, keeping what it reads (qemu-img rebase).

    Without -u, every range the overlay does not hold and where the old and new backing
    files differ is copied into it first.
    """
    from formats.rebase import rebase_image

    rules = open_rules(
        None, allow_probed_chain, allow_block_devices, allow_remote_backing=allow_remote_backing
    )
    with errors_as_exit():
        shown = show_progress and not quiet and not unsafe
        with progress_bar(os.path.basename(image), shown) as (pace, _):
            runtime.run(
                rebase_image(
                    image,
                    backing,
                    backing_format=backing_fmt,
                    fmt=fmt,
                    unsafe=unsafe,
                    share=force_share,
                    rules=rules,
                    pace=pace,
                    cache=cache,
                    src_cache=src_cache,
                )
            )


@app.command("commit")
def commit_cmd(
    image: Annotated[str, typer.Argument(help="The overlay whose data is committed.")],
    base: Annotated[
        str | None,
        typer.Option("--base", "-b", help="The image of the chain to commit into (implies -d)."),
    ] = None,
    keep: Annotated[
        bool,
        typer.Option("-d", "--keep", help="Do not empty the overlay afterwards."),
    ] = False,
    fmt: FormatOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No message.")] = False,
    allow_probed_chain: AllowProbedChainOpt = False,
    allow_block_devices: AllowBlockOpt = False,
    allow_remote_backing: AllowRemoteOpt = False,
    force_share: ForceShareOpt = False,
    show_progress: ProgressOpt = False,
    rate: RateOpt = None,
    cache: Annotated[
        str, cache_option("-t", "--cache", "CACHE", "The base's cache mode (qemu-img -t)")
    ] = "writeback",
) -> None:
    """Write an overlay's data into its backing file, then empty it (qemu-img commit)."""
    from formats.commit import commit_image

    rules = open_rules(
        None, allow_probed_chain, allow_block_devices, allow_remote_backing=allow_remote_backing
    )
    with errors_as_exit():
        shown = show_progress and not quiet
        with progress_bar(os.path.basename(image), shown, parse_rate(rate)) as (pace, _):
            runtime.run(
                commit_image(
                    image,
                    base=base,
                    fmt=fmt,
                    keep=keep,
                    share=force_share,
                    rules=rules,
                    pace=pace,
                    cache=cache,
                )
            )
    if not quiet:
        typer.echo("Image committed.")


@app.command("resize", context_settings={"ignore_unknown_options": True})
def resize_cmd(
    image: Annotated[str, typer.Argument(help="The raw, qcow, qcow2 or VHD image.")],
    size: Annotated[
        str, typer.Argument(help="The new size (10G), or a change of it (+1G, -512M).")
    ],
    shrink: Annotated[
        bool,
        typer.Option("--shrink", help="Allow a smaller size: the data past it is lost."),
    ] = False,
    fmt: FormatOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No message.")] = False,
    allow_probed_chain: AllowProbedChainOpt = False,
    allow_block_devices: AllowBlockOpt = False,
    allow_remote_backing: AllowRemoteOpt = False,
    force_share: ForceShareOpt = False,
    preallocation: Annotated[
        str,
        typer.Option(
            "--preallocation",
            help="Allocate the grown range (raw and qcow2): off, metadata (qcow2), falloc "
            "or full (qemu-img resize --preallocation).",
        ),
    ] = "off",
) -> None:
    """Grow an image, or shrink it with --shrink (qemu-img resize)."""
    from formats.resize import resize_image

    rules = open_rules(
        None, allow_probed_chain, allow_block_devices, allow_remote_backing=allow_remote_backing
    )
    with errors_as_exit():
        runtime.run(
            resize_image(
                image,
                size,
                fmt=fmt,
                shrink=shrink,
                share=force_share,
                rules=rules,
                preallocation=preallocation,
            )
        )
    if not quiet:
        typer.echo("Image resized.")


@app.command("amend")
def amend_cmd(
    image: Annotated[str, typer.Argument(help="The qcow2 image to change.")],
    options: Annotated[
        str,
        typer.Option(
            "-o",
            "--options",
            metavar="OPTS",
            help="key=value,...: compat (0.10 or 1.1), lazy_refcounts (on or off) and "
            "refcount_bits (1 to 64).",
        ),
    ],
    fmt: FormatOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No message.")] = False,
    force_share: ForceShareOpt = False,
    show_progress: Annotated[
        bool,
        typer.Option(
            "--progress",
            "-p",
            help="Show a progress bar on stderr (qemu-img's -p); it moves as each step "
            "ends (the refcount width, then the header), not within one.",
        ),
    ] = False,
) -> None:
    """Change a qcow2 image's version, refcount width or lazy refcounts in place (qemu-img amend)."""
    from formats.qcow2.amend import amend_qcow2
    from formats.rebase import image_format
    from tapnbd.cli.image_flags import parse_options
    from tapnbd.errors import ImageError

    with errors_as_exit():
        kind = image_format(image, fmt)
        if kind != "qcow2":
            raise ImageError(f"{image}: amend changes qcow2 images; this one is {kind}")
        with progress_bar(os.path.basename(image), show_progress and not quiet) as (pace, _):
            changed = runtime.run(
                amend_qcow2(image, parse_options(options), share=force_share, pace=pace)
            )
    if not quiet:
        typer.echo("; ".join(changed) if changed else "Nothing to change.")


@app.command("snapshot")
def snapshot_cmd(
    image: Annotated[str, typer.Argument(help="The qcow2 image.")],
    list_: Annotated[bool, typer.Option("-l", "--list", help="List the snapshots.")] = False,
    create: Annotated[
        str | None, typer.Option("-c", "--create", metavar="NAME", help="Take a snapshot.")
    ] = None,
    delete: Annotated[
        str | None,
        typer.Option("-d", "--delete", metavar="ID|NAME", help="Delete a snapshot."),
    ] = None,
    apply: Annotated[
        str | None,
        typer.Option("-a", "--apply", metavar="ID|NAME", help="Revert the image to a snapshot."),
    ] = None,
    fmt: FormatOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No message.")] = False,
    force_share: ForceShareOpt = False,
) -> None:
    """List, take, delete or apply internal qcow2 snapshots (qemu-img snapshot).

    The image must not be in use; each change is made beside the old state and switched
    to with one sector write, so a power cut leaves one or the other.
    """
    from formats.qcow2 import snapshot_edit as se
    from formats.rebase import image_format
    from tapnbd.cli.app import fail
    from tapnbd.errors import ImageError

    asked = [a for a in (list_ or None, create, delete, apply) if a is not None]
    if len(asked) != 1:
        fail("give exactly one of -l, -c NAME, -d ID|NAME and -a ID|NAME")
    with errors_as_exit():
        kind = image_format(image, fmt)
        if kind != "qcow2":
            raise ImageError(f"{image}: only qcow2 images have internal snapshots; this is {kind}")
        if list_:
            _print_snapshots(runtime.run(se.list_snapshots(image)))
            return
        if create is not None:
            said = "Snapshot " + runtime.run(se.create_snapshot(image, create, share=force_share))
            said += f" ({create!r}) taken."
        elif delete is not None:
            said = f"Snapshot {runtime.run(se.delete_snapshot(image, delete, share=force_share))}"
            said += " deleted."
        else:
            assert apply is not None
            said = f"Snapshot {runtime.run(se.apply_snapshot(image, apply, share=force_share))}"
            said += " applied."
    if not quiet:
        typer.echo(said)


def _op(name: str) -> Callable[[typer.Context, object], object]:
    """A callback recording the operation ``name`` in ``ctx.meta``. click runs the
    callbacks in command-line order, which is the order qemu-img bitmap applies them."""

    def record(ctx: typer.Context, value: object) -> object:
        if value:  # a flag given, or --merge's SOURCE
            ctx.meta.setdefault("bitmap_ops", []).append((name, value))
        return value

    return record


@app.command("bitmap")
def bitmap_cmd(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(help="The qcow2 image.")],
    name: Annotated[str, typer.Argument(metavar="BITMAP", help="The bitmap.")],
    add: Annotated[
        bool, typer.Option("--add", help="Add the bitmap, empty.", callback=_op("add"))
    ] = False,
    remove: Annotated[
        bool, typer.Option("--remove", help="Remove it.", callback=_op("remove"))
    ] = False,
    clear: Annotated[
        bool, typer.Option("--clear", help="Clear all its bits.", callback=_op("clear"))
    ] = False,
    enable: Annotated[
        bool,
        typer.Option("--enable", help="Record writes in it (the default).", callback=_op("enable")),
    ] = False,
    disable: Annotated[
        bool,
        typer.Option("--disable", help="Stop recording writes in it.", callback=_op("disable")),
    ] = False,
    merge: Annotated[
        str | None,
        typer.Option(
            "--merge",
            metavar="SOURCE",
            help="Set the bits that bitmap SOURCE has set (of this image, or of -b).",
            callback=_op("merge"),
        ),
    ] = None,
    source_file: Annotated[
        str | None,
        typer.Option("--source-file", "-b", help="The qcow2 image --merge's SOURCE is in."),
    ] = None,
    source_fmt: Annotated[
        str | None, typer.Option("--source-format", "-F", help="-b's format: qcow2.")
    ] = None,
    granularity: Annotated[
        str | None,
        typer.Option(
            "--granularity",
            "-g",
            help="--add's bytes per bit: a power of two, 512 to 2G (default: the cluster "
            "size, at least 4 KiB).",
        ),
    ] = None,
    fmt: FormatOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No message.")] = False,
    force_share: ForceShareOpt = False,
) -> None:
    """Add, remove, clear, enable, disable or merge a persistent dirty bitmap of a qcow2
    image (qemu-img bitmap). The operations apply in the order given.

    The image must not be in use; the change is made beside the old state and switched
    to with one sector write, so a power cut leaves one or the other.
    """
    from formats import parse_size
    from formats.qcow2.bitmap_edit import Op, edit_bitmap
    from formats.rebase import image_format
    from tapnbd.cli.app import fail
    from tapnbd.errors import ImageError

    del add, remove, clear, enable, disable, merge  # read in command-line order from ctx
    ops = [
        Op(op, str(value) if op == "merge" else "", source_file if op == "merge" else None)
        for op, value in ctx.meta.get("bitmap_ops", [])
    ]
    if not ops:
        fail("give at least one of --add, --remove, --clear, --enable, --disable, --merge")
    if source_file is None and source_fmt is not None:
        fail("-F (the source's format) needs -b")
    with errors_as_exit():
        kind = image_format(image, fmt)
        if kind != "qcow2":
            raise ImageError(f"{image}: only qcow2 images have persistent bitmaps; this is {kind}")
        if source_file is not None and image_format(source_file, source_fmt or "auto") != "qcow2":
            raise ImageError(f"{source_file}: only qcow2 images have persistent bitmaps")
        g = parse_size(granularity) if granularity is not None else None
        runtime.run(edit_bitmap(image, name, ops, granularity=g, share=force_share))
    if not quiet:
        typer.echo(f"Bitmap {name!r}: {', '.join(op.name for op in ops)}.")


def _print_snapshots(snaps: list[Snapshot]) -> None:
    """qemu-img snapshot -l's table, column for column; names and ids escaped (they
    come from the image)."""
    import time

    from formats.qcow2.snapshot import shown
    from tapnbd.cli._output import qemu_size

    print("Snapshot list:")
    print(f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}")
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date_sec))
        secs, ns = divmod(s.vm_clock_nsec, 10**9)
        clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{ns // 10**6:03d}"
        counted = "" if s.icount in (-1, (1 << 64) - 1) else str(s.icount)
        size = qemu_size(s.vm_state_size)
        print(
            f"{shown(s.id_str):<9} {shown(s.name):<16} {size:>8}{date:>20}{clock:>13}{counted:>11}"
        )
