"""``tapnbd map``, ``compare`` and ``measure``: qemu-img's commands of the same names.

Output and exit codes follow qemu-img's, so scripts written for it keep working: map
prints qemu-img map's table or JSON, compare exits 0 (identical), 1 (different) or 2
(an error), measure prints the required and fully allocated sizes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

import typer

from tapnbd import runtime
from tapnbd.cli._image_opts import snapshot_option
from tapnbd.cli._output import JsonOpt, OutputOpt, print_json, wants_json
from tapnbd.cli._progress import ProgressOpt, progress_bar
from tapnbd.cli._trust import (
    AllowBlockOpt,
    AllowProbedChainOpt,
    AllowRemoteOpt,
    BackingFormatOpt,
    ReadShareOpt,
    open_rules,
)
from tapnbd.cli.app import app, errors_as_exit, fail
from tapnbd.cli.image_flags import parse_options

if TYPE_CHECKING:
    from formats import OpenRules
    from formats.imagemap import MapEntry
    from formats.measure import Measure
    from formats.pacing import Pace
    from tapnbd.driver import Driver

#: qemu-img compare's buffer: the most it reads of each image at once.
IO_BUF_SIZE = 2 << 20
#: qemu-img reports a content mismatch at the start of the first sector that differs.
SECTOR = 512


async def _open(spec: str, fmt: str, rules: OpenRules, snapshot: str | None = None) -> Driver:
    from formats import open_image

    return await open_image(spec, fmt=fmt, read_only=True, rules=rules, snapshot=snapshot)


# map


async def _map(
    spec: str, fmt: str, rules: OpenRules, start: int, length: int | None
) -> list[MapEntry]:
    from formats.imagemap import image_map

    driver = await _open(spec, fmt, rules)
    try:
        return await image_map(driver, spec, start, length)
    finally:
        await driver.close()


@app.command("map")
def map_cmd(
    image: Annotated[str, typer.Argument(help="The image (a file, or an NBD URI).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="The image's format.")] = "auto",
    output: OutputOpt = "human",
    as_json: JsonOpt = False,
    start_at: Annotated[
        str, typer.Option("--start-offset", "-s", metavar="OFFSET", help="Start at this offset.")
    ] = "0",
    max_length: Annotated[
        str | None, typer.Option("--max-length", "-l", metavar="LEN", help="Map at most this much.")
    ] = None,
    backing_format: BackingFormatOpt = None,
    allow_probed_chain: AllowProbedChainOpt = False,
    allow_block_devices: AllowBlockOpt = False,
    allow_remote_backing: AllowRemoteOpt = False,
    force_share: ReadShareOpt = False,
) -> None:
    """Show where each run of the disk comes from: which layer of the backing chain, data
    or zeros, and where in which file (as qemu-img map).
    """
    from formats import parse_size
    from formats.imagemap import format_human, format_json

    use_json = wants_json(output, as_json)
    rules = open_rules(
        backing_format,
        allow_probed_chain,
        allow_block_devices,
        force_share,
        allow_remote_backing=allow_remote_backing,
    )
    with errors_as_exit():
        start = parse_size(start_at, allow_zero=True)
        length = parse_size(max_length) if max_length is not None else None
        entries = runtime.run_command(_map(image, fmt, rules, start, length))
    if use_json:
        print(format_json(entries))
        return
    try:
        print(format_human(entries))
    except ValueError as e:  # compressed clusters have no place to show
        fail(str(e))


# compare


async def _first(driver: Driver, pos: int, end: int, name: str) -> MapEntry:
    from formats.imagemap import block_status

    async for entry in block_status(driver, pos, end, name):
        return entry
    raise AssertionError("block_status gave nothing for a non-empty range")


def _status(e: MapEntry) -> tuple[bool, bool, bool, bool]:
    return e.present, e.zero, e.data, e.offset is not None


async def _nonzero_at(driver: Driver, pos: int, n: int) -> int | None:
    """qemu-img's check_empty_sectors: the sector holding the first nonzero byte."""
    data = bytes(await driver.pread(pos, n))
    first = len(data) - len(data.lstrip(b"\0"))
    return None if first == len(data) else pos + first // SECTOR * SECTOR


async def compare_drivers(
    a: Driver, b: Driver, name_a: str, name_b: str, strict: bool, pace: Pace | None = None
) -> tuple[int, list[str]]:
    """(exit code, lines to print), as img_compare walks the two images; ``pace`` (-p)
    advances by each range compared, of the bigger image's size."""
    from formats.pacing import Pace

    pace = pace or Pace()
    size_a, size_b = a.size(), b.size()
    if strict and size_a != size_b:
        return 1, ["Strict mode: Image size mismatch!"]
    pace.begin(max(size_a, size_b))
    total = min(size_a, size_b)
    pos = 0
    while pos < total:
        ea = await _first(a, pos, size_a, name_a)
        eb = await _first(b, pos, size_b, name_b)
        chunk = min(ea.length, eb.length, total - pos)
        if strict and _status(ea) != _status(eb):
            return 1, [f"Strict mode: Offset {pos} block status mismatch!"]
        if ea.zero and eb.zero:
            pass  # both read as zeros
        elif ea.present == eb.present:
            chunk = min(chunk, IO_BUF_SIZE)
            da = bytes(await a.pread(pos, chunk))
            db = bytes(await b.pread(pos, chunk))
            if da != db:
                i = next(
                    i for i in range(0, chunk, SECTOR) if da[i : i + SECTOR] != db[i : i + SECTOR]
                )
                return 1, [f"Content mismatch at offset {pos + i}!"]
        else:
            chunk = min(chunk, IO_BUF_SIZE)
            at = await _nonzero_at(a if ea.present else b, pos, chunk)
            if at is not None:
                return 1, [f"Content mismatch at offset {at}!"]
        pos += chunk
        pace.advance(chunk)
    lines: list[str] = []
    if size_a != size_b:
        lines.append("Warning: Image size mismatch!")
        over, name, end = (a, name_a, size_a) if size_a > size_b else (b, name_b, size_b)
        while pos < end:
            e = await _first(over, pos, end, name)
            chunk = e.length
            if e.present and not e.zero:
                chunk = min(chunk, IO_BUF_SIZE)
                at = await _nonzero_at(over, pos, chunk)
                if at is not None:
                    return 1, [*lines, f"Content mismatch at offset {at}!"]
            pos += chunk
            pace.advance(chunk)
    return 0, [*lines, "Images are identical."]


async def _compare(
    spec_a: str,
    spec_b: str,
    fmt_a: str,
    fmt_b: str,
    rules: OpenRules,
    strict: bool,
    pace: Pace,
) -> tuple[int, list[str]]:
    a = await _open(spec_a, fmt_a, rules)
    try:
        b = await _open(spec_b, fmt_b, rules)
        try:
            return await compare_drivers(a, b, spec_a, spec_b, strict, pace)
        finally:
            await b.close()
    finally:
        await a.close()


@app.command("compare")
def compare_cmd(
    image_a: Annotated[str, typer.Argument(metavar="A", help="The first image.")],
    image_b: Annotated[str, typer.Argument(metavar="B", help="The second image.")],
    fmt_a: Annotated[str, typer.Option("-f", "--format", help="A's format.")] = "auto",
    fmt_b: Annotated[str, typer.Option("-F", "--second-format", help="B's format.")] = "auto",
    strict: Annotated[
        bool,
        typer.Option("--strict", "-s", help="Sizes and allocation must match too, not only data."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing.")] = False,
    allow_probed_chain: AllowProbedChainOpt = False,
    allow_block_devices: AllowBlockOpt = False,
    allow_remote_backing: AllowRemoteOpt = False,
    force_share: ReadShareOpt = False,
    show_progress: ProgressOpt = False,
) -> None:
    """Check whether two images hold the same disk contents (as qemu-img compare).

    A part only one image has must read as zeros (unless --strict). Exit codes: 0 the
    same, 1 different (with the first differing offset), 2 an error.
    """
    rules = open_rules(
        None,
        allow_probed_chain,
        allow_block_devices,
        force_share,
        allow_remote_backing=allow_remote_backing,
    )
    code, lines = 2, list[str]()
    with (
        errors_as_exit(2),
        progress_bar(os.path.basename(image_b), show_progress and not quiet) as (pace, _),
    ):
        code, lines = runtime.run(_compare(image_a, image_b, fmt_a, fmt_b, rules, strict, pace))
    if not quiet:
        for line in lines:
            print(line)
    raise typer.Exit(code)


# measure


#: The -o keys each output format takes.
_MEASURE_KEYS = {
    "qcow2": {"cluster_size", "refcount_bits", "preallocation", "compat"},
    "raw": set(),
    "qcow": {"cluster_size"},
    "vhd": {"block_size", "subformat"},
}


async def _source_facts(
    spec: str, fmt: str, rules: OpenRules, snapshot: str | None = None
) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]] | None]:
    """(size, data runs, bitmaps) of a source image (at its internal ``snapshot``, if
    given): each persistent bitmap's name length and granularity bits if it is a qcow2
    v3 image, else None."""
    from formats.imagemap import image_map, unwrap
    from formats.measure import data_runs

    driver = await _open(spec, fmt, rules, snapshot)
    try:
        entries = await image_map(driver, spec)
        specific = unwrap(driver).describe().get("format-specific")
        v3 = (
            isinstance(specific, dict)
            and specific.get("type") == "qcow2"
            and specific.get("data", {}).get("compat") == "1.1"
        )
        meta = getattr(unwrap(driver), "meta", None)
        bitmaps = getattr(meta, "bitmaps", [])
        shape = [
            (len(b.name.encode("utf-8", "surrogateescape")), b.granularity_bits) for b in bitmaps
        ]
        return driver.size(), data_runs(entries), shape if v3 else None
    finally:
        await driver.close()


def measure(
    out_fmt: str,
    size: int,
    runs: list[tuple[int, int]] | None,
    opts: dict[str, str],
    bitmaps: list[tuple[int, int]] | None,
) -> Measure:
    from formats import parse_size
    from formats.measure import measure_qcow, measure_qcow2, measure_raw, measure_vhd

    def opt_size(key: str) -> int | None:
        return parse_size(opts[key]) if key in opts else None

    if out_fmt == "qcow2":
        compat = opts.get("compat", "1.1")
        if compat not in ("0.10", "1.1", "v2", "v3"):
            fail(f"compat {compat!r}: use 0.10 or 1.1")
        return measure_qcow2(
            size,
            runs,
            cluster_size=opt_size("cluster_size") or 65536,
            refcount_bits=int(opts.get("refcount_bits", "16")),
            preallocation=opts.get("preallocation", "off"),
            bitmaps=bitmaps if compat in ("1.1", "v3") else None,
        )
    if out_fmt == "raw":
        return measure_raw(size)
    if out_fmt == "qcow":
        return measure_qcow(size, runs, opt_size("cluster_size"))
    return measure_vhd(size, runs, opt_size("block_size"), opts.get("subformat", "dynamic"))


@app.command("measure")
def measure_cmd(
    image: Annotated[
        str | None, typer.Argument(help="The image to convert (or give --size).")
    ] = None,
    out_fmt: Annotated[
        str, typer.Option("-O", "--output-format", help="qcow2, raw, qcow or vhd (vpc).")
    ] = "raw",
    size: Annotated[
        str | None, typer.Option("--size", metavar="SIZE", help="Measure an empty image.")
    ] = None,
    fmt: Annotated[str, typer.Option("-f", "--format", help="The image's format.")] = "auto",
    options: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--options",
            metavar="OPTS",
            help="key=value,...: qcow2 cluster_size, refcount_bits, preallocation, compat; "
            "qcow cluster_size; vhd block_size, subformat.",
        ),
    ] = None,
    output: OutputOpt = "human",
    as_json: JsonOpt = False,
    backing_format: BackingFormatOpt = None,
    allow_probed_chain: AllowProbedChainOpt = False,
    allow_block_devices: AllowBlockOpt = False,
    allow_remote_backing: AllowRemoteOpt = False,
    snapshot: Annotated[
        str | None,
        snapshot_option("Measure this internal qcow2 snapshot's contents (qemu-img measure -l)"),
    ] = None,
) -> None:
    """How big a file an image converted to -O's format needs now (required), and once
    every byte is written (fully allocated), as qemu-img measure.
    """
    from formats import parse_size

    use_json = wants_json(output, as_json)
    out_fmt = "vhd" if out_fmt == "vpc" else out_fmt
    if out_fmt not in _MEASURE_KEYS:
        fail(f"-O {out_fmt!r}: use qcow2, raw, qcow or vhd")
    if snapshot is not None and image is None:
        fail("-l measures a snapshot of an image: give the image")
    if (image is None) == (size is None):
        fail(
            "give either --size N or one image, not both" if image else "give --size N or an image"
        )
    opts = parse_options(options)
    unknown = sorted(set(opts) - _MEASURE_KEYS[out_fmt])
    if unknown:
        fail(f"-O {out_fmt} does not take -o {', '.join(unknown)}")
    rules = open_rules(
        backing_format,
        allow_probed_chain,
        allow_block_devices,
        allow_remote_backing=allow_remote_backing,
    )
    with errors_as_exit():
        if image is None:
            assert size is not None
            result = measure(out_fmt, parse_size(size), None, opts, None)
        else:
            vsize, runs, bitmaps = runtime.run_command(_source_facts(image, fmt, rules, snapshot))
            result = measure(out_fmt, vsize, runs, opts, bitmaps)
    if use_json:
        print_json(result.to_json())
    else:
        print(result.human())
