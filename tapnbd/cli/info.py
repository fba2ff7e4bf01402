"""``tapnbd info``: what ``qemu-img info`` tells about an image and its backing chain.

A module of its own so that ``tapnbd info`` builds this one command, not create,
convert and check too (typer inspects every registered command's signature at start).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

import typer

from tapnbd import runtime
from tapnbd.cli._image_opts import ProbedFormatOpt
from tapnbd.cli._output import JsonOpt, OutputOpt, human_value, print_json, qemu_size, wants_json
from tapnbd.cli._trust import (
    AllowBlockOpt,
    AllowProbedChainOpt,
    AllowRemoteOpt,
    BackingFormatOpt,
    ReadShareOpt,
    open_rules,
)
from tapnbd.cli.app import app, errors_as_exit, say
from tapnbd.text import printable

if TYPE_CHECKING:
    from formats import OpenRules
    from tapnbd.driver import Driver


async def image_info(
    path: str, fmt: str = "auto", rules: OpenRules | None = None
) -> dict[str, object]:
    """``qemu-img info``-style facts about an image and its backing chain."""
    from formats.salvage import open_for_info

    # A damaged image is shown as far as it can be, as qemu-img info does (exit 0).
    driver, warnings = await open_for_info(path, fmt, rules)
    for warning in warnings:
        where = "" if warning.startswith(path) else f"{path}: "
        say("warning:", "", f"{where}{warning}")
    try:
        info = await _describe(path, driver)
        # A fixed VHD has its only footer at the end, which probing never reads.
        if (
            fmt == "auto"
            and driver.name == "raw"
            and driver.size() >= 512
            and bytes(await driver.pread(driver.size() - 512, 8)) == b"conectix"
        ):
            info["note"] = (
                "probed as raw, but the last 512 bytes are a VHD footer: if this is "
                "a fixed VHD, give --format vhd"
            )
        return info
    finally:
        await driver.close()


async def _describe(path: str, driver: Driver) -> dict[str, object]:
    info: dict[str, object] = {"filename": path}
    info.update(driver.describe())
    try:
        info["actual-size"] = os.stat(path).st_blocks * 512
    except OSError:
        pass
    if driver.name == "raw":
        return info  # start-up: a raw image needs none of the table formats' modules
    from formats.engine.image import ImageDriver

    if not isinstance(driver, ImageDriver):
        return await _with_backing(info, driver)
    if driver.name == "qcow":
        from formats.qcow.driver import QcowDriver  # imported already: it is open

        if isinstance(driver, QcowDriver):
            alloc, comp = await driver.allocation()
            info["allocated-clusters"] = alloc
            info["allocated-size"] = alloc * driver.g.cluster_size
            if comp:
                info["compressed-clusters"] = comp
    return await _with_backing(info, driver)


async def _with_backing(info: dict[str, object], driver: Driver) -> dict[str, object]:
    backing = getattr(driver, "backing", None)  # an image driver, or one described only
    if backing is not None:
        bpath = str(info.get("full-backing-filename", ""))
        info["backing-image"] = await _describe(bpath, backing)
    return info


def _int(info: dict[str, object], key: str) -> int:
    value = info.get(key, 0)
    return value if isinstance(value, int) else 0


def _print_info(info: dict[str, object], indent: str = "") -> None:
    vsize = _int(info, "virtual-size")
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {qemu_size(vsize)} ({vsize} bytes)",
    ]
    if "actual-size" in info:
        lines.append(f"disk size: {qemu_size(_int(info, 'actual-size'))}")
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "allocated-size" in info:
        lines.append(f"allocated: {qemu_size(_int(info, 'allocated-size'))}")
    if "backing-filename" in info:
        full = info.get("full-backing-filename", "")
        extra = f" (actual path: {full})" if full and full != info["backing-filename"] else ""
        lines.append(f"backing file: {info['backing-filename']}{extra}")
    if "backing-filename-format" in info:
        lines.append(f"backing file format: {info['backing-filename-format']}")
    snapshots = info.get("snapshots")
    if isinstance(snapshots, list) and snapshots:
        lines.append("Snapshot list:")
        lines.append(f"{'ID':<8}{'TAG':<20}{'VM SIZE':>10}  DATE (seconds since the epoch)")
        lines.extend(
            f"{s['id']:<8}{s['name']:<20}{s['vm-state-size']:>10}  {s['date-sec']}"
            for s in snapshots
        )
    specific = info.get("format-specific")
    if isinstance(specific, dict):
        lines.append("Format specific information:")
        lines.extend(_nested(specific.get("data", {}), 1))
    if "note" in info:
        lines.append(f"note: {info['note']}")
    for line in lines:
        print(indent + printable(line))  # the backing file's name is the header's
    backing = info.get("backing-image")
    if isinstance(backing, dict):
        print()
        _print_info(backing, indent)


def _nested(value: dict[str, object] | list[object], depth: int) -> list[str]:
    """A dict or list as qemu-img info prints one: ``key: value``, nested values under
    ``key:`` four spaces further in, list items as ``[i]:``; dashes in keys are spaces."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    pad = "    " * depth
    lines: list[str] = []
    for k, v in items:
        key = f"[{k}]" if isinstance(k, int) else k.replace("-", " ")  # as qemu's dump_qdict
        if isinstance(v, (dict, list)):
            lines.append(f"{pad}{key}:")
            lines.extend(_nested(v, depth + 1))
        else:
            lines.append(f"{pad}{key}: {human_value(v)}")
    return lines


def backing_chain(info: dict[str, object]) -> list[dict[str, object]]:
    """The chain as qemu-img info --backing-chain lists it: one flat entry per image."""
    chain: list[dict[str, object]] = []
    node: object = info
    while isinstance(node, dict):
        entry = dict(node)
        node = entry.pop("backing-image", None)
        chain.append(entry)
    return chain


@app.command("info")
def info_cmd(
    image: Annotated[str, typer.Argument(help="The image.")],
    fmt: ProbedFormatOpt = "auto",
    output: OutputOpt = "human",
    as_json: JsonOpt = False,
    chain: Annotated[
        bool,
        typer.Option(
            "--backing-chain", help="Every image of the chain (JSON: a list, as qemu-img)."
        ),
    ] = False,
    backing_format: BackingFormatOpt = None,
    allow_probed_chain: AllowProbedChainOpt = False,
    allow_block_devices: AllowBlockOpt = False,
    allow_remote_backing: AllowRemoteOpt = False,
    force_share: ReadShareOpt = False,
) -> None:
    """Format, sizes, allocation, backing chain and the Xen extension of an image."""
    use_json = wants_json(output, as_json)
    rules = open_rules(
        backing_format,
        allow_probed_chain,
        allow_block_devices,
        force_share,
        allow_remote_backing=allow_remote_backing,
    )
    with errors_as_exit():
        info = runtime.run_command(image_info(image, fmt, rules))
    if use_json:
        print_json(backing_chain(info) if chain else info)
    else:
        _print_info(info)
