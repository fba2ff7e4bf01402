"""``tapnbd serve``."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from tapnbd import runtime
from tapnbd.cli._image_opts import (
    AllocationDepthOpt,
    BitmapOpt,
    CacheOpt,
    DetectZeroesOpt,
    DiscardOpt,
    NoCacheOpt,
    OffsetOpt,
    ProbedFormatOpt,
    SnapshotOpt,
    cache_mode,
    throwaway_option,
)
from tapnbd.cli._server_opts import PollUsOpt
from tapnbd.cli._trust import (
    AllowBlockOpt,
    AllowProbedChainOpt,
    AllowRemoteOpt,
    BackingFormatOpt,
    ShareOpt,
    open_rules,
)
from tapnbd.cli.app import app, errors_as_exit, fail
from tapnbd.logformat import log_to_stderr
from tapnbd.protocol.handshake import TLSMode
from tapnbd.server.budget import DEFAULT_PAYLOAD_BUDGET
from tapnbd.server.listener import (
    DEFAULT_HANDSHAKE_GRACE,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HANDSHAKES,
)
from tapnbd.server.standalone import ServeOptions, serve


@app.command("serve")
def serve_cmd(
    images: Annotated[
        list[str],
        typer.Argument(
            help="Images to export (paths, ram:SIZE, rbd:POOL/IMAGE, nbd:// URIs), each "
            "named after its file, or NAME=IMAGE."
        ),
    ],
    name: Annotated[
        str | None,
        typer.Option("--name", "-x", "--export-name", help="Export name, for a single image."),
    ] = None,
    read_only: Annotated[bool, typer.Option("--read-only", "-r", help="Refuse writes.")] = False,
    fmt: ProbedFormatOpt = "auto",
    bitmap: BitmapOpt = None,
    allocation_depth: AllocationDepthOpt = False,
    discard: DiscardOpt = "unmap",
    detect_zeroes: DetectZeroesOpt = "off",
    description: Annotated[
        str, typer.Option("--description", "-D", help="Export description.")
    ] = "",
    bind: Annotated[str, typer.Option("--bind", "-b", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int | None,
        typer.Option("--port", "-p", help="TCP port; 0 picks a free one. [default: 10809]"),
    ] = None,
    socket: Annotated[
        str | None,
        typer.Option("--socket", "-k", help="Unix socket path (TCP only if --port too)."),
    ] = None,
    pidfile: Annotated[
        str | None,
        typer.Option(
            "--pidfile",
            "--pid-file",
            help="Write the pid here once ready; an existing file is refused unless it is "
            "a stale pidfile of ours. Removed on exit if it still holds our pid.",
        ),
    ] = None,
    stats_file: Annotated[
        str | None, typer.Option(help="On exit, write each export's statistics here (JSON).")
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            help="Serve Prometheus metrics on unix:PATH (mode 0600) or a loopback HOST:PORT."
        ),
    ] = None,
    tls: Annotated[TLSMode, typer.Option(help="TLS: off, on (offered) or require.")] = TLSMode.OFF,
    tls_cert: Annotated[str | None, typer.Option(help="Server certificate (PEM).")] = None,
    tls_key: Annotated[str | None, typer.Option(help="Server private key (PEM).")] = None,
    tls_ca: Annotated[
        str | None, typer.Option(help="CA certificate; clients must present one it signed.")
    ] = None,
    max_connections: Annotated[
        int,
        typer.Option(
            "--max-connections", "-e", "--shared", help="Refuse clients beyond this many."
        ),
    ] = DEFAULT_MAX_CONNECTIONS,
    persistent: Annotated[
        bool,
        typer.Option(
            "--persistent",
            "-t",
            help="Serve on when the last client leaves: always so here (qemu-nbd -t).",
        ),
    ] = True,
    fork: Annotated[
        bool,
        typer.Option(
            "--fork",
            help="Go to the background once clients can connect; exit 0 then, or with "
            "the server's error (qemu-nbd --fork).",
        ),
    ] = False,
    handshake_timeout: Annotated[
        float, typer.Option(help="Seconds a client has to finish the handshake.")
    ] = DEFAULT_HANDSHAKE_TIMEOUT,
    max_handshakes: Annotated[
        int,
        typer.Option(help="Unfinished handshakes at once; past this the oldest is dropped."),
    ] = DEFAULT_MAX_HANDSHAKES,
    handshake_grace: Annotated[
        float,
        typer.Option(help="Seconds an unfinished handshake is safe from being dropped."),
    ] = DEFAULT_HANDSHAKE_GRACE,
    payload_budget: Annotated[
        str,
        typer.Option(
            help="Payload bytes in flight, all clients together (reads being built, "
            "writes being received); clients wait past it."
        ),
    ] = f"{DEFAULT_PAYLOAD_BUDGET >> 20}M",
    poll_us: PollUsOpt = 0,
    inject_error: Annotated[
        list[str] | None,
        typer.Option(
            help="Fault injection: fail ops with ERRNO at RATE, e.g. EIO:1% or "
            "ENOSPC:100%:write,flush (ops: read write flush trim zero extents cache grow).",
        ),
    ] = None,
    delay: Annotated[
        list[str] | None, typer.Option(help="Fault injection: slow ops down, e.g. read=5ms.")
    ] = None,
    inject_at: Annotated[
        str, typer.Option(help="Where faults go: export (in front) or file (under the format).")
    ] = "export",
    inject_error_file: Annotated[
        str | None, typer.Option(help="Inject errors only while this file exists.")
    ] = None,
    exclusive: Annotated[
        bool,
        typer.Option(
            help="Shared images (rbd:): hold the exclusive lock; SIGUSR1 flushes and releases it."
        ),
    ] = False,
    lock_wait: Annotated[
        float,
        typer.Option(help="With --exclusive: seconds to wait for the previous owner to release."),
    ] = 0.0,
    inject_seed: Annotated[
        int | None, typer.Option(help="Seed of the injected errors, to replay a run.")
    ] = None,
    snapshot: SnapshotOpt = None,
    throwaway: Annotated[bool, throwaway_option("$TMPDIR", "on exit")] = False,
    offset: OffsetOpt = "0",
    cache: CacheOpt = "writeback",
    nocache: NoCacheOpt = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log connections and failed requests.")
    ] = False,
    backing_format: BackingFormatOpt = None,
    allow_probed_chain: AllowProbedChainOpt = False,
    allow_block_devices: AllowBlockOpt = False,
    allow_remote_backing: AllowRemoteOpt = False,
    share: ShareOpt = False,
) -> None:
    """Serve images over NBD until SIGTERM or SIGINT; print each export's URI when ready."""
    log_to_stderr(
        logging.DEBUG if verbose else logging.WARNING, "tapnbd: %(levelname)s %(message)s"
    )
    if port is not None and not 0 <= port <= 65535:
        fail(f"invalid port {port}")
    cache = cache_mode(cache, nocache)
    opts = ServeOptions(
        images=images,
        name=name,
        read_only=read_only,
        fmt=fmt,
        bitmaps=bitmap or [],
        allocation_depth=allocation_depth,
        discard=discard,
        detect_zeroes=detect_zeroes,
        description=description,
        bind=bind,
        port=port,
        socket=socket,
        pidfile=pidfile,
        stats_file=stats_file,
        metrics=metrics,
        tls=tls,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        max_connections=max_connections,
        handshake_timeout=handshake_timeout,
        max_handshakes=max_handshakes,
        handshake_grace=handshake_grace,
        payload_budget=payload_budget,
        poll_us=poll_us,
        inject_error=inject_error or [],
        delay=delay or [],
        inject_at=inject_at,
        inject_error_file=inject_error_file,
        exclusive=exclusive,
        lock_wait=lock_wait,
        rules=open_rules(
            backing_format,
            allow_probed_chain,
            allow_block_devices,
            share,
            allow_remote_backing=allow_remote_backing,
        ),
        inject_seed=inject_seed,
        snapshot=snapshot,
        throwaway=throwaway,
        offset=offset,
        cache=cache,
    )
    if fork:
        opts.ready_fd = _fork()
    with errors_as_exit():
        code = runtime.run(serve(opts))
    raise typer.Exit(code)


def _fork() -> int:
    """The child's end of a pipe its parent waits on: the parent exits 0 once the child
    says it serves (standalone.detach), else with the child's exit status."""
    import os

    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rd)
        os.setsid()  # not killed with the caller's terminal or process group
        return wr
    os.close(wr)
    ready = os.read(rd, 1)
    if ready == b"1":
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) or 1)
