"""``tapnbd ring``: the Xen blkif front end (serve a vbd ring, drive it, look at it)."""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Annotated

import typer

from tapnbd import runtime
from tapnbd.cli._image_opts import ProbedFormatOpt, SnapshotOpt
from tapnbd.cli._trust import (
    AllowBlockOpt,
    AllowProbedChainOpt,
    AllowRemoteOpt,
    BackingFormatOpt,
    open_rules,
)
from tapnbd.cli.app import PLAIN, app, errors_as_exit, fail
from tapnbd.logformat import log_to_stderr

if TYPE_CHECKING:
    from tapnbd.xen.xenbus import VbdServer

ring = typer.Typer(
    rich_markup_mode=PLAIN,
    help="Serve an image over an emulated Xen blkif shared ring, as blkback/blktap did.",
    no_args_is_help=True,
)
app.add_typer(ring, name="ring")

PathOpt = Annotated[
    str,
    typer.Option(
        "--path",
        "-P",
        help="Directory holding the vbd's xenstore, grant table and ring (tmpfs is best).",
        envvar="TAPNBD_RING_PATH",
    ),
]
DomidOpt = Annotated[int, typer.Option(help="The frontend's domain id.")]
DevidOpt = Annotated[int, typer.Option(help="The vbd's device id (51712 is xvda).")]


def _size(text: str) -> int:
    from formats import parse_size

    with errors_as_exit():
        return parse_size(text)
    raise AssertionError("unreachable")


@ring.command("serve")
def serve_cmd(
    image: Annotated[str, typer.Argument(help="Image to serve (a path, or ram:SIZE).")],
    path: PathOpt,
    fmt: ProbedFormatOpt = "auto",
    read_only: Annotated[bool, typer.Option("--read-only", "-r", help="Refuse writes.")] = False,
    once: Annotated[bool, typer.Option(help="Exit after the first frontend disconnects.")] = False,
    domid: DomidOpt = 1,
    devid: DevidOpt = 51712,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log the handshake.")] = False,
    snapshot: SnapshotOpt = None,
    backing_format: BackingFormatOpt = None,
    allow_probed_chain: AllowProbedChainOpt = False,
    allow_block_devices: AllowBlockOpt = False,
    allow_remote_backing: AllowRemoteOpt = False,
) -> None:
    """Serve IMAGE as a blkif vbd in DIR until SIGTERM/SIGINT; print DIR when ready."""
    from tapnbd.xen.app import serve_image

    log_to_stderr(logging.INFO if verbose else logging.WARNING, "tapnbd: %(levelname)s %(message)s")

    def ready(server: VbdServer) -> None:
        print(os.path.abspath(path), flush=True)

    with errors_as_exit():
        runtime.run(
            serve_image(
                image,
                path,
                fmt=fmt,
                read_only=read_only,
                once=once,
                domid=domid,
                devid=devid,
                rules=open_rules(
                    backing_format,
                    allow_probed_chain,
                    allow_block_devices,
                    allow_remote_backing=allow_remote_backing,
                ),
                on_ready=ready,
                snapshot=snapshot,
            )
        )


@ring.command("bench")
def bench_cmd(
    path: PathOpt,
    rw: Annotated[str, typer.Option(help="read, write, randread or randwrite.")] = "randread",
    bs: Annotated[str, typer.Option(help="Block size (4k, 1M, ...).")] = "4k",
    iodepth: Annotated[int, typer.Option(help="I/Os kept in flight.")] = 32,
    runtime_s: Annotated[float, typer.Option("--runtime", help="Seconds to run.")] = 5.0,
    size: Annotated[str | None, typer.Option(help="Bytes of the disk to use.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    domid: DomidOpt = 1,
    devid: DevidOpt = 51712,
) -> None:
    """Drive a served ring as a frontend (fio-style) and print IOPS and MiB/s."""
    from tapnbd.xen.frontend import BlkFront, BlkFrontError, IOFailed
    from tapnbd.xen.loadgen import Job, run_job

    try:
        job = Job(
            rw=rw,
            bs=_size(bs),
            iodepth=iodepth,
            runtime=runtime_s,
            size=_size(size) if size else None,
        )
    except ValueError as e:
        fail(str(e))
    try:
        with BlkFront(path, domid=domid, devid=devid) as front:
            result = run_job(front, job)
    except (BlkFrontError, IOFailed, TimeoutError, ConnectionError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    print(
        f"{job.rw} bs={job.bs} iodepth={job.iodepth}: {result.iops:,.0f} IOPS, "
        f"{result.mib_s:,.1f} MiB/s, {result.ios} I/Os in {result.seconds:.2f}s; "
        f"{result.requests} ring requests, {result.notifications} kicks, "
        f"{result.events} events"
    )


@ring.command("status")
def status_cmd(
    path: PathOpt,
    domid: DomidOpt = 1,
    devid: DevidOpt = 51712,
) -> None:
    """Show the vbd's xenstore keys and both sides' states."""
    from tapnbd.xen.xenstore import XenStore, backend_dir, frontend_dir, ls_of, state_of

    xs = XenStore(path)
    if not xs.exists():
        fail(f"{path}: no xenstore here; is `tapnbd ring serve` running?")
    with errors_as_exit():
        snap = xs.load()  # a store the backend would reject is reported, not shown
    for title, d in (
        ("backend", backend_dir(domid, devid)),
        ("frontend", frontend_dir(domid, devid)),
    ):
        print(f"{title} {d}: {state_of(snap, d).name}")
        for key, value in sorted(ls_of(snap, d).items()):
            print(f"  {key} = {value}")
