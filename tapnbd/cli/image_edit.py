"""``tapnbd rebase``, ``commit``, ``resize`` and ``amend``: the commands that change an
image in place, in qemu-img's spellings. Each takes the image's lock before it writes.

The commands only parse their options and call the library (formats.rebase,
formats.commit, formats.resize, formats.qcow2.amend).
"""

from __future__ import annotations

from typing import Annotated

import typer

from tapnbd import runtime
from tapnbd.cli._trust import (
    AllowBlockOpt,
    AllowProbedChainOpt,
    ForceShareOpt,
    open_rules,
)
from tapnbd.cli.app import app, errors_as_exit

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
    force_share: ForceShareOpt = False,
) -> None:
    """Give an overlay a new backing file, keeping what it reads (qemu-img rebase).

    Without -u, every range the overlay does not hold and where the old and new backing
    files differ is copied into it first.
    """
    from formats.rebase import rebase_image

    rules = open_rules(None, allow_probed_chain, allow_block_devices)
    with errors_as_exit():
        runtime.run(
            rebase_image(
                image,
                backing,
                backing_format=backing_fmt,
                fmt=fmt,
                unsafe=unsafe,
                share=force_share,
                rules=rules,
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
    force_share: ForceShareOpt = False,
) -> None:
    """Write an overlay's data into its backing file, then empty it (qemu-img commit)."""
    from formats.commit import commit_image

    rules = open_rules(None, allow_probed_chain, allow_block_devices)
    with errors_as_exit():
        runtime.run(
            commit_image(image, base=base, fmt=fmt, keep=keep, share=force_share, rules=rules)
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
    force_share: ForceShareOpt = False,
) -> None:
    """Grow an image, or shrink it with --shrink (qemu-img resize)."""
    from formats.resize import resize_image

    rules = open_rules(None, allow_probed_chain, allow_block_devices)
    with errors_as_exit():
        runtime.run(
            resize_image(image, size, fmt=fmt, shrink=shrink, share=force_share, rules=rules)
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
            help="key=value,...: compat (0.10 or 1.1) and lazy_refcounts (on or off).",
        ),
    ],
    fmt: FormatOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No message.")] = False,
    force_share: ForceShareOpt = False,
) -> None:
    """Change a qcow2 image's version or lazy refcounts in place (qemu-img amend)."""
    from formats.qcow2.amend import amend_qcow2
    from formats.rebase import image_format
    from tapnbd.cli.image_flags import parse_options
    from tapnbd.errors import ImageError

    with errors_as_exit():
        kind = image_format(image, fmt)
        if kind != "qcow2":
            raise ImageError(f"{image}: amend changes qcow2 images; this one is {kind}")
        changed = runtime.run(amend_qcow2(image, parse_options(options), share=force_share))
    if not quiet:
        typer.echo("; ".join(changed) if changed else "Nothing to change.")

