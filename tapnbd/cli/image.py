"""``tapnbd create``, ``convert`` and ``check``: blktap's qcow-create, img2qcow and
qcow2raw, plus what ``qemu-img check`` tells about an image (``info`` is in info.py).

The commands only parse their options and call the library (formats.qcow.*).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

import typer

from tapnbd import runtime
from tapnbd.cli._image_opts import cache_option, snapshot_option
from tapnbd.cli._output import JsonOpt, OutputOpt, print_json, wants_json
from tapnbd.cli._progress import RateOpt, parse_rate, progress_bar
from tapnbd.cli._trust import (
    AllowBlockOpt,
    AllowProbedChainOpt,
    AllowRemoteOpt,
    BackingFormatOpt,
    ForceShareOpt,
    ReadShareOpt,
    open_rules,
)
from tapnbd.cli.app import app, errors_as_exit, fail
from tapnbd.text import printable

if TYPE_CHECKING:
    from formats.qcow2.create import Qcow2Options


def _size(text: str, *, allow_zero: bool = False) -> int:
    from formats import parse_size

    return parse_size(text, allow_zero=allow_zero)


@app.command("create")
def create_cmd(
    image: Annotated[str, typer.Argument(help="The image file to create (overwritten).")],
    size_arg: Annotated[
        str | None,
        typer.Argument(metavar="SIZE", help="The virtual size, as qemu-img create takes it."),
    ] = None,
    size: Annotated[
        str | None,
        typer.Option(
            "--size", "-s", help="Virtual size: 10G, 512M... (default: the backing file's)."
        ),
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="qcow, qcow2, vhd (or vpc) or raw.")
    ] = "qcow",
    backing: Annotated[
        str | None,
        typer.Option(
            "--backing", "-b", help="Backing file (any format; qcow, qcow2; vhd: a VHD parent)."
        ),
    ] = None,
    preallocation: Annotated[
        str | None, typer.Option("--preallocation", help="qcow2: off, metadata, falloc or full.")
    ] = None,
    optimise: Annotated[
        bool | None,
        typer.Option(
            "--optimise/--no-optimise",
            help="qcow: allocate whole extents and use the fast path (the default without "
            "a backing file; refused with one).",
        ),
    ] = None,
    cluster_size: Annotated[
        str | None,
        typer.Option(
            "--cluster-size",
            help="A power of two: 512 to 64K (qcow), 2M (qcow2); vhd: block size, 2M default.",
        ),
    ] = None,
    subformat: Annotated[
        str | None, typer.Option("--subformat", help="vhd: dynamic (default) or fixed.")
    ] = None,
    reserve: Annotated[
        bool, typer.Option("--reserve", "-r", help="Reserve the space now (not sparse).")
    ] = False,
    backing_format: BackingFormatOpt = None,
    allow_probed_chain: AllowProbedChainOpt = False,
    allow_block_devices: AllowBlockOpt = False,
    allow_remote_backing: AllowRemoteOpt = False,
    force_share: ForceShareOpt = False,
    options: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--options",
            metavar="OPTS",
            help="qemu-img's key=value,... qcow2: compat, refcount_bits, lazy_refcounts, "
            "cluster_size, preallocation; all: size, backing_file (and backing_fmt); "
            "qcow: cluster_size; vhd: subformat, block_size.",
        ),
    ] = None,
    unsafe: Annotated[
        bool,
        typer.Option(
            "-u",
            "--unsafe",
            help="Record the backing file without opening it (it may not exist yet); "
            "the size and -F are then needed (qemu-img create -u).",
        ),
    ] = False,
) -> None:
    """Create an empty image, as blktap's qcow-create did (optimised and sparse by default).

    An image in use (locked by a server) is refused and left as it was.
    """
    from tapnbd.cli.image_flags import create_options, refuse_create_flags

    kind = "rbd" if image.startswith("rbd:") else fmt
    if size_arg is not None:
        if size is not None:
            fail("the size is given twice (SIZE and --size)")
        size = size_arg
    given, q2 = create_options(
        kind,
        options,
        {
            "--size": size,
            "--backing": backing,
            "--backing-format": backing_format,
            "--cluster-size": cluster_size,
            "--preallocation": preallocation,
            "--subformat": subformat,
        },
    )
    size, backing, backing_format = given["--size"], given["--backing"], given["--backing-format"]
    cluster_size, preallocation = given["--cluster-size"], given["--preallocation"]
    subformat = given["--subformat"]
    refuse_create_flags(
        kind,
        backing=backing,
        backing_format=backing_format,
        preallocation=preallocation,
        optimise=optimise,
        cluster_size=cluster_size,
        subformat=subformat,
        reserve=reserve,
    )
    if unsafe and backing is None:
        fail("-u is for a backing file (-b) that is not to be opened")
    if unsafe and fmt in ("vhd", "vpc"):
        fail("-u: a differencing VHD records its parent's UUID, so the parent must be opened")
    with errors_as_exit():
        nbytes = _size(size) if size is not None else None
        csize = _size(cluster_size) if cluster_size is not None else None
        # A backing file is checked by opening it: its chain follows the rules.
        rules = open_rules(
            None,
            allow_probed_chain,
            allow_block_devices,
            allow_remote_backing=allow_remote_backing,
        )
        if image.startswith("rbd:"):
            from formats.rbd.driver import create_blocking

            if backing is not None:
                fail("an rbd image cannot have a backing file here (use rbd clone)")
            if nbytes is None:
                fail("--size is required")
            create_blocking(image, nbytes)
        elif fmt == "raw":
            from formats.raw import create_raw

            if backing is not None:
                fail("a raw image cannot have a backing file")
            if nbytes is None:
                fail("--size is required")
            create_raw(image, nbytes, reserve=reserve, share=force_share)
        elif fmt == "qcow":
            from formats.qcow.create import create_qcow

            runtime.run_command(
                create_qcow(
                    image,
                    nbytes,
                    backing=backing,
                    backing_format=backing_format or "auto",
                    optimise=optimise is not False,
                    cluster_size=csize,
                    reserve=reserve,
                    share=force_share,
                    rules=rules,
                    unsafe=unsafe,
                )
            )
        elif fmt == "qcow2":
            from formats.qcow2.create import Qcow2Options, create_qcow2

            runtime.run_command(
                create_qcow2(
                    image,
                    nbytes,
                    backing=backing,
                    backing_fmt=backing_format,
                    cluster_size=csize,
                    preallocation=preallocation or "off",
                    options=Qcow2Options.from_keys(q2),
                    unsafe=unsafe,
                    rules=rules,
                )
            )
        elif fmt in ("vhd", "vpc"):
            from formats.vhd.create import create_vhd

            runtime.run_command(
                create_vhd(
                    image,
                    nbytes,
                    subformat=subformat or "dynamic",
                    backing=backing,
                    block_size=csize,
                    share=force_share,
                )
            )
        else:
            fail(f"unknown format {fmt!r}: use qcow, qcow2, vhd or raw")


def _qcow2_options(keys: dict[str, str]) -> Qcow2Options | None:
    """-o's qcow2 keys; the qcow2 modules are imported only when there are some (a raw
    or qcow destination, or none given, never needs them)."""
    if not keys:
        return None
    from formats.qcow2.create import Qcow2Options

    return Qcow2Options.from_keys(keys)


@app.command("convert")
def convert_cmd(
    images: Annotated[
        list[str],
        typer.Argument(
            metavar="SRC... DST",
            help="The source image (any supported format), or several copied back to "
            "back (qemu-img convert's several sources), then the destination image "
            "(created, or overwritten).",
        ),
    ],
    out_fmt: Annotated[
        str | None,
        typer.Option(
            "-O",
            "--output-format",
            help="raw, qcow, qcow2 or vhd (vpc); qcow by default, or with -n the existing "
            "image's format, probed.",
        ),
    ] = None,
    src_fmt: Annotated[str, typer.Option("-f", "--format", help="Source format.")] = "auto",
    no_create: Annotated[
        bool,
        typer.Option(
            "-n",
            "--no-create",
            help="Write into DST, an existing image at least as big, zeros included "
            "(qemu-img convert -n).",
        ),
    ] = False,
    optimise: Annotated[
        bool, typer.Option("--optimise/--no-optimise", help="For a qcow destination.")
    ] = True,
    cluster_size: Annotated[
        str | None, typer.Option("--cluster-size", help="For a qcow destination.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    show_progress: Annotated[
        bool,
        typer.Option("-p", "--progress", help="The progress bar (shown unless -q; qemu-img's -p)."),
    ] = False,
    backing_format: BackingFormatOpt = None,
    allow_probed_chain: AllowProbedChainOpt = False,
    allow_block_devices: AllowBlockOpt = False,
    allow_remote_backing: AllowRemoteOpt = False,
    force_share: ForceShareOpt = False,
    compress: Annotated[
        bool, typer.Option("--compress", "-c", help="qcow2: write compressed clusters.")
    ] = False,
    options: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--options",
            metavar="OPTS",
            help="qemu-img's key=value,... for the new image. qcow2: compat, refcount_bits, "
            "lazy_refcounts, cluster_size; qcow: cluster_size; vhd: block_size.",
        ),
    ] = None,
    backing: Annotated[
        str | None,
        typer.Option(
            "-B",
            "--backing",
            metavar="BACKING",
            help="Make a qcow2 or qcow overlay on BACKING holding only what reads "
            "differently from it (qemu-img convert -B); -F is then BACKING's format.",
        ),
    ] = None,
    snapshot: Annotated[
        str | None,
        snapshot_option(
            "Copy this internal qcow2 snapshot, not the current state (qemu-img convert -l)"
        ),
    ] = None,
    bitmaps: Annotated[
        bool,
        typer.Option(
            "--bitmaps", help="qcow2 to qcow2: copy the source's persistent dirty bitmaps too."
        ),
    ] = False,
    skip_broken: Annotated[
        bool,
        typer.Option(
            "--skip-broken-bitmaps", help="With --bitmaps: leave out bitmaps left in use."
        ),
    ] = False,
    sparse_size: Annotated[
        str | None,
        typer.Option(
            "-S",
            "--sparse-size",
            metavar="SIZE",
            help="Blocks of zeros this big become holes (a multiple of 512, 64k by "
            "default); 0 writes every byte, a fully allocated image (qemu-img -S).",
        ),
    ] = None,
    target_is_zero: Annotated[
        bool,
        typer.Option(
            "--target-is-zero",
            help="With -n: the existing image reads as zeros, so its zero runs are not "
            "written (qemu-img --target-is-zero).",
        ),
    ] = False,
    coroutines: Annotated[
        int,
        typer.Option(
            "-m", "--coroutines", metavar="N", help="Requests in flight, 1 to 16 (qemu-img -m)."
        ),
    ] = 4,
    out_of_order: Annotated[
        bool,
        typer.Option(
            "-W",
            "--out-of-order",
            help="Let the -m requests write as their reads finish (qemu-img -W). Without "
            "it each chunk is written after the one before it, so a new qcow, qcow2 or "
            "VHD image's clusters follow the guest's order.",
        ),
    ] = False,
    salvage: Annotated[
        bool,
        typer.Option(
            "--salvage",
            help="Go on past read errors: what cannot be read is written as zeros, and "
            "each such range is reported unless -q (qemu-img --salvage).",
        ),
    ] = False,
    rate: RateOpt = None,
    offload: Annotated[
        bool,
        typer.Option(
            "-C",
            "--copy-offloading",
            help="Let the kernel copy the data (copy_file_range) when both images are raw "
            "files; otherwise the usual copy (qemu-img -C). Not with -S or -c.",
        ),
    ] = False,
    cache: Annotated[
        str, cache_option("-t", "--cache", "CACHE", "The destination's cache mode (qemu-img -t)")
    ] = "writeback",
    src_cache: Annotated[
        str,
        cache_option("-T", "--source-cache", "SRC_CACHE", "The source's cache mode (qemu-img -T)"),
    ] = "writeback",
) -> None:
    """Copy an image into a new raw, qcow, qcow2 or VHD image, skipping zeros and holes.

    The destination's lock is taken before it is truncated: an image in use is refused.
    """
    # is_nbd from formats itself: formats.nbd would import the NBD client for a name.
    from formats import is_nbd
    from formats.qcow.convert import ZERO_BLOCK, CopyTuning, convert_image
    from tapnbd.cli.image_flags import create_options

    del show_progress  # the bar is drawn anyway, unless -q: -p is for qemu-img's command lines
    if len(images) < 2:
        fail("give the source image(s), then the destination")
    *sources, dst = images
    src = sources[0]
    if len(sources) > 1 and (snapshot or bitmaps or backing):
        fail("several sources are copied whole into one image: no -l, --bitmaps or -B")

    out_fmt = out_fmt or ("auto" if no_create else "qcow")
    if no_create and (options or cluster_size or backing):
        fail("-n writes into an existing image: -o, --cluster-size and -B do not apply")
    if bitmaps and (out_fmt != "qcow2" or no_create or snapshot or backing):
        fail("--bitmaps copies into a new qcow2 image (-O qcow2), without -n, -l or -B")
    if skip_broken and not bitmaps:
        fail("--skip-broken-bitmaps goes with --bitmaps")
    if offload and (sparse_size is not None or compress):
        # As qemu-img: the kernel copies whole runs, so nothing looks for zeros in them.
        fail("-C copies data runs whole: it cannot go with -S or -c")
    kind = "rbd" if dst.startswith("rbd:") else "nbd" if is_nbd(dst) else out_fmt
    given, q2 = create_options(kind, options, {"--cluster-size": cluster_size}, command="convert")
    cluster_size = given["--cluster-size"]
    with errors_as_exit():
        csize = _size(cluster_size) if cluster_size is not None else None
        if bitmaps:
            from formats.rebase import image_format
            from tapnbd.errors import ImageError

            if image_format(src, src_fmt) != "qcow2":
                raise ImageError(f"{src}: --bitmaps copies a qcow2 image's bitmaps")
        with progress_bar(os.path.basename(dst), not quiet, parse_rate(rate)) as (pace, note):
            runtime.run(
                convert_image(
                    sources,
                    dst,
                    out_fmt,
                    src_fmt=src_fmt,
                    optimise=optimise,
                    cluster_size=csize,
                    pace=pace,
                    rules=open_rules(
                        None if backing else backing_format,
                        allow_probed_chain,
                        allow_block_devices,
                        force_share,
                        allow_remote_backing=allow_remote_backing,
                    ),
                    compress=compress,
                    qcow2=_qcow2_options(q2),
                    snapshot=snapshot,
                    backing=backing,
                    backing_format=backing_format if backing else None,
                    create=not no_create,
                    target_is_zero=target_is_zero,
                    tuning=CopyTuning(
                        sparse_size=ZERO_BLOCK
                        if sparse_size is None
                        else _size(sparse_size, allow_zero=True),  # -S 0: no holes
                        depth=coroutines,
                        out_of_order=out_of_order,
                        offload=offload,
                        cache=cache,
                        src_cache=src_cache,
                        salvage=None
                        if not salvage
                        else (lambda _m: None)
                        if quiet
                        else (lambda m: note(f"{dst}: {m}")),
                    ),
                )
            )
        if bitmaps:
            from formats.qcow2.bitmap_edit import copy_bitmaps

            runtime.run(copy_bitmaps(src, dst, skip_broken=skip_broken))


@app.command("dd")
def dd_cmd(
    operands: Annotated[
        list[str],
        typer.Argument(
            metavar="if=INPUT of=OUTPUT [bs=N] [count=N] [skip=N]",
            help="dd's operands: bs is the block size (512 by default), count and skip are "
            "in blocks; sizes take qemu's units.",
        ),
    ],
    src_fmt: Annotated[str, typer.Option("-f", "--format", help="Input format.")] = "auto",
    out_fmt: Annotated[
        str, typer.Option("-O", "--output-format", help="raw, qcow, qcow2 or vhd (vpc).")
    ] = "raw",
    backing_format: BackingFormatOpt = None,
    allow_probed_chain: AllowProbedChainOpt = False,
    allow_block_devices: AllowBlockOpt = False,
    allow_remote_backing: AllowRemoteOpt = False,
    force_share: ForceShareOpt = False,
) -> None:
    """Copy part of an image into a new image, in dd's terms (qemu-img dd).

    The new image holds count blocks from block skip of the input, or up to its end.
    """
    from formats.qcow.convert import convert_image

    ops: dict[str, str] = {}
    for op in operands:
        key, sep, value = op.partition("=")
        if not sep or key not in ("if", "of", "bs", "count", "skip"):
            fail(f"{op!r}: expected if=, of=, bs=, count= or skip=")
        if key in ops:
            fail(f"{key}= is given twice")
        ops[key] = value
    if "if" not in ops or "of" not in ops:
        fail("give both if=INPUT and of=OUTPUT")
    with errors_as_exit():
        bs = _blocks(ops.get("bs", "512"))
        if bs <= 0:
            fail("bs must be at least 1")
        count = _blocks(ops["count"]) * bs if "count" in ops else None
        runtime.run(
            convert_image(
                ops["if"],
                ops["of"],
                out_fmt,
                src_fmt=src_fmt,
                rules=open_rules(
                    backing_format,
                    allow_probed_chain,
                    allow_block_devices,
                    force_share,
                    allow_remote_backing=allow_remote_backing,
                ),
                window=(_blocks(ops.get("skip", "0")) * bs, count),
            )
        )


def _blocks(text: str) -> int:
    """A count of blocks: a number, 0 included, or a size in qemu's units (30K)."""
    return int(text) if text.isdigit() else _size(text)


@app.command("bench")
def bench_cmd(
    image: Annotated[str, typer.Argument(help="The image (any format tapnbd opens).")],
    count: Annotated[int, typer.Option("-c", "--count", help="Requests in all.")] = 75000,
    depth: Annotated[int, typer.Option("-d", "--depth", help="Requests in flight.")] = 64,
    size: Annotated[
        str, typer.Option("-s", "--size", metavar="SIZE", help="Bytes per request.")
    ] = "4K",
    step: Annotated[
        str | None,
        typer.Option("-S", "--step", metavar="SIZE", help="From one request's offset to the next."),
    ] = None,
    offset: Annotated[
        str, typer.Option("-o", "--offset", metavar="OFFSET", help="The first request's offset.")
    ] = "0",
    write: Annotated[bool, typer.Option("-w", "--write", help="Write instead of read.")] = False,
    pattern: Annotated[int, typer.Option("--pattern", help="The byte written (0-255).")] = 0,
    fmt: Annotated[str, typer.Option("-f", "--format", help="The image's format.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the time.")] = False,
    force_share: ForceShareOpt = False,
    flush_interval: Annotated[
        int,
        typer.Option(
            "--flush-interval",
            metavar="N",
            help="A flush after every N writes, the writes in flight waited for first.",
        ),
    ] = 0,
    no_drain: Annotated[
        bool,
        typer.Option(
            "--no-drain", help="With --flush-interval: flush without waiting for the writes."
        ),
    ] = False,
    cache: Annotated[
        str, cache_option("-t", "--cache", "CACHE", "The image's cache mode (qemu-img -t)")
    ] = "writeback",
    aio: Annotated[
        str,
        typer.Option(
            "-i",
            "--aio",
            metavar="AIO",
            help="The I/O engine (qemu-img -i): threads, the only one here (a thread pool "
            "after an RWF_NOWAIT try); native and io_uring are refused.",
        ),
    ] = "threads",
    native: Annotated[
        bool,
        typer.Option("-n", "--native", help="qemu-img's -n, that is -i native: refused."),
    ] = False,
) -> None:
    """Time a run of reads or writes straight to an image's driver (qemu-img bench)."""
    from formats.iobench import BenchSpec, check_aio, run_bench

    aio = "native" if native else aio
    with errors_as_exit():
        check_aio(aio)  # before the first line, as qemu-img refuses before it
        spec = BenchSpec(
            count=count,
            depth=depth,
            size=_size(size),
            step=None if step is None else _blocks(step),
            offset=_blocks(offset),
            write=write,
            pattern=pattern,
            flush_interval=flush_interval,
            drain=not no_drain,
        )
        if not quiet:
            print(spec.describe())
        rules = open_rules(None, False, False, force_share)
        seconds = runtime.run(run_bench(image, spec, fmt=fmt, rules=rules, cache=cache, aio=aio))
    print(f"Run completed in {seconds:.3f} seconds.")


@app.command("check")
def check_cmd(
    image: Annotated[str, typer.Argument(help="The qcow, qcow2 or vhd image.")],
    output: OutputOpt = "human",
    as_json: JsonOpt = False,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="qcow2: set refcounts to the references, clear dirty; qcow: free leaked "
            "clusters, rewrite the L1 checksum.",
        ),
    ] = False,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="auto, or vhd for a fixed VHD.")
    ] = "auto",
    repair_mode: Annotated[
        str | None,
        typer.Option(
            "-r",
            metavar="leaks|all",
            help="qemu-img's spelling: all is --repair; leaks, on qcow2, only lowers "
            "refcounts above their references.",
        ),
    ] = None,
    force_share: ReadShareOpt = False,
) -> None:
    """Check a qcow image: leaks, overlaps, pointers past the end, checksum.

    Exit codes: 0 clean, 1 check failed, 2 corrupt, 3 leaked clusters, 4 checksum mismatch.
    """
    from formats import probe

    if TYPE_CHECKING:
        from formats.engine.checks import CheckResult

    use_json = wants_json(output, as_json)
    if repair_mode not in (None, "leaks", "all"):
        fail(f"-r {repair_mode}: use leaks or all")
    repair = repair or repair_mode is not None
    if repair and force_share:
        # As qemu-img: -U is for reading; a repair writes, under the image's lock.
        fail("-U reads an image in use; a repair writes it and takes its lock: drop -U", 1)
    with errors_as_exit():
        if fmt == "auto":
            fmt = probe(image)
        res: CheckResult
        if fmt in ("vhd", "vpc"):
            from formats.vhd.check import check_vhd

            if repair:
                fail(f"{image}: --repair is for qcow and qcow2 images", 1)
            res = runtime.run_command(check_vhd(image, share=force_share))
        elif fmt == "qcow2":
            from formats.qcow2.check import check_qcow2

            leaks_only = repair_mode == "leaks"
            res = runtime.run_command(
                check_qcow2(image, repair=repair, leaks_only=leaks_only, share=force_share)
            )
        elif fmt == "qcow" and repair:
            from formats.qcow.repair import repair_qcow

            res = runtime.run_command(repair_qcow(image))
        elif fmt == "qcow":
            from formats.qcow.check import check_qcow

            res = runtime.run_command(check_qcow(image, share=force_share))
        else:
            from formats.foreign import FOREIGN, refusal

            if fmt in FOREIGN:  # name the converter, as info and serve do
                fail(refusal(image, fmt), 1)
            fail(f"{image}: not a qcow image (only qcow, qcow2 and vhd images can be checked)", 1)
    if use_json:
        print_json(res.to_json())
    else:
        for msg in res.check_errors:
            print(f"ERROR: {printable(msg)}")
        for msg in res.corruptions:
            print(f"ERROR: {printable(msg)}")
        if res.corruption_count > len(res.corruptions):
            print(f"... and {res.corruption_count - len(res.corruptions)} more errors")
        for msg in res.notes:
            print(f"note: {printable(msg)}")
        if res.exit_code in (0, 4):
            print("No errors were found on the image.")
        counted = res.allocated_clusters or res.image_end_offset or res.corruption_count
        if res.check_errors and not counted:
            raise typer.Exit(res.exit_code)  # nothing was checked: no summary of zeros
        print(
            f"{res.allocated_clusters} clusters allocated"
            + (f" ({res.compressed_clusters} compressed)" if res.compressed_clusters else "")
            + f", {res.leaked_clusters} leaked; cksum: {res.cksum or 'n/a'}"
        )
        print(f"Image end offset: {res.image_end_offset}")
    raise typer.Exit(res.exit_code)
