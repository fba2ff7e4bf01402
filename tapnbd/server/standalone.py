"""``tapnbd serve``: open images, listen, print URIs, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from formats import OpenRules, parse_size
from formats.filters import FaultSpec, at_file_layer
from formats.filters.cachemode import check_cache_mode, files_for, with_cache_mode
from formats.filters.discard import check_modes, with_modes
from formats.filters.window import from_offset
from formats.imagemap import described, overlay_wanted
from formats.overlay import open_image_or_overlay
from tapnbd import safefs
from tapnbd.backend import Backend
from tapnbd.driver import Driver
from tapnbd.errors import TapnbdError
from tapnbd.protocol.handshake import TLSMode
from tapnbd.server.budget import DEFAULT_PAYLOAD_BUDGET
from tapnbd.server.exports import Export, ExportRegistry
from tapnbd.server.listener import (
    DEFAULT_HANDSHAKE_GRACE,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HANDSHAKES,
    NBDServer,
    activation_sockets,
    make_ssl_context,
)

if TYPE_CHECKING:
    from tapnbd.control.metrics import MetricsServer

log = logging.getLogger("tapnbd.server")


@dataclass
class ServeOptions:
    images: list[str]
    name: str | None = None
    read_only: bool = False
    fmt: str = "auto"
    #: Persistent dirty bitmaps exported as qemu:dirty-bitmap:NAME (qemu-nbd -B).
    bitmaps: list[str] = field(default_factory=list)
    #: The qemu:allocation-depth context too (qemu-nbd -A).
    allocation_depth: bool = False
    #: qemu-nbd's --discard (ignore, unmap) and --detect-zeroes (off, on, unmap).
    discard: str = "unmap"
    detect_zeroes: str = "off"
    description: str = ""
    bind: str = "127.0.0.1"
    port: int | None = None
    socket: str | None = None
    pidfile: str | None = None
    stats_file: str | None = None  # each export's counters, as JSON at exit
    metrics: str | None = None  # Prometheus endpoint: unix:PATH or a loopback HOST:PORT
    tls: TLSMode = TLSMode.OFF
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES
    handshake_grace: float = DEFAULT_HANDSHAKE_GRACE
    payload_budget: str = f"{DEFAULT_PAYLOAD_BUDGET >> 20}M"  # server-wide, see budget.py
    poll_us: int = 0  # see tapnbd/server/poll.py
    # Fault injection (formats.filters): ERRNO:RATE[:OPS] rules, OP=TIME delays, where
    # ("export": in front of the whole stack; "file": between a format and its file),
    # and a file whose existence switches the errors on (nbdkit error-file).
    inject_error: list[str] = field(default_factory=list)
    delay: list[str] = field(default_factory=list)
    inject_at: str = "export"
    inject_error_file: str | None = None
    # Hand-over of shared images (rbd): take the exclusive lock at open, waiting up to
    # lock_wait seconds for the previous host to release it (SIGUSR1 releases ours).
    exclusive: bool = False
    lock_wait: float = 0.0
    # The image trust rules (formats.OpenRules): backing format, probed chains, locks.
    rules: OpenRules = field(default_factory=OpenRules)
    inject_seed: int | None = None  # None: a fresh random sequence each run
    # An internal qcow2 snapshot (id or name) to serve read-only (qemu-nbd -l).
    snapshot: str | None = None
    # Writes go to a throwaway overlay; the image is only read (qemu-nbd -s).
    throwaway: bool = False
    # Serve each image from this byte on (qemu-nbd -o): a size, e.g. 1M.
    offset: str = "0"
    # qemu-nbd's --cache: writeback, writethrough or unsafe (formats.filters.cachemode).
    cache: str = "writeback"
    # --fork: a pipe to the parent, told once clients can connect (-1: not forked).
    ready_fd: int = -1


def detach(ready_fd: int) -> None:
    """--fork: tell the waiting parent we serve, and let go of its terminal and pipes
    (a caller reading our output until EOF would wait for us forever), as qemu-nbd
    --fork does."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.write(ready_fd, b"1")
    os.close(ready_fd)


def export_name(image: str) -> str:
    """An export is named after its file (``ram:1G`` is named ``ram``)."""
    if image.startswith("ram:"):
        return "ram"
    if "://" in image:  # an NBD URI: named after the upstream export
        from formats.nbd import NbdUri

        return NbdUri.parse(image).export or "nbd"
    return os.path.basename(os.path.normpath(image))


def split_named(arg: str) -> tuple[str | None, str]:
    """``NAME=IMAGE`` -> (NAME, IMAGE); anything else -> (None, arg).

    A path may hold ``=`` too, so the form counts only when NAME has no ``/`` or ``:``
    (which rules out paths, ``ram:``, ``rbd:`` and URIs with their ``?k=v``) and ``arg``
    is not an existing file.
    """
    name, sep, image = arg.partition("=")
    if not sep or not name or not image or "/" in name or ":" in name or os.path.lexists(arg):
        return None, arg
    return name, image


async def open_exports(opts: ServeOptions) -> ExportRegistry:
    named = [split_named(arg) for arg in opts.images]
    if opts.name is not None and len(opts.images) != 1:
        raise TapnbdError("--name renames a single image's export; name several with NAME=IMAGE")
    if opts.name is not None and named[0][0] is not None:
        raise TapnbdError(f"{opts.images[0]}: named twice (NAME=IMAGE and --name)")
    faults = FaultSpec.parse(
        opts.inject_error, opts.delay, trigger=opts.inject_error_file, seed=opts.inject_seed
    )
    check_modes(opts.discard, opts.detect_zeroes)
    if opts.inject_at not in ("export", "file"):
        raise TapnbdError(f"--inject-at {opts.inject_at!r}: expected export or file")
    if opts.snapshot is not None and len(opts.images) != 1:
        raise TapnbdError("--snapshot serves one image's snapshot; give exactly one image")
    offset = parse_size(opts.offset, allow_zero=True)
    check_cache_mode(opts.cache)
    at_file = bool(faults) and opts.inject_at == "file"
    wrapped: list[Driver] = []  # files the fault filters went in front of

    def wrap_file(child: Driver) -> Driver:
        wrapped.append(child)
        return faults.wrap(child)

    registry = ExportRegistry()
    opened: list[Driver] = []
    try:
        for given, image in named:
            name = opts.name if opts.name is not None else given
            if name is None:
                name = export_name(image)
            if registry.get(name) is not None and name:
                raise TapnbdError(
                    f"two images would both be exported as {name!r}; name them with "
                    f"NAME=IMAGE, e.g. a={image}"
                )
            wrapped.clear()
            overlay = overlay_wanted(opts.throwaway, opts.read_only)
            with at_file_layer(wrap_file if at_file else None), files_for(opts.cache):
                driver = await open_image_or_overlay(
                    image,
                    throwaway=overlay,
                    fmt=opts.fmt,
                    read_only=opts.read_only,
                    rules=opts.rules,
                    # A snapshot opens read-only: without an overlay, so is the Backend.
                    snapshot=opts.snapshot,
                )
            what = described(driver, overlay, opts.snapshot)
            opened.append(driver)
            if opts.exclusive:
                await _acquire_exclusive(image, driver, opts.lock_wait)
            if at_file and not wrapped:
                raise TapnbdError(
                    f"{image}: --inject-at file needs an image format with a file under "
                    f"it (qcow); a {driver.name} image has none, use --inject-at export"
                )
            driver = with_cache_mode(from_offset(driver, offset, image), opts.cache)
            if faults and not at_file:
                driver = faults.wrap(driver)
            driver = with_modes(driver, opts.discard, opts.detect_zeroes)
            description = opts.description or f"{image} ({what})"
            backend = Backend(driver, read_only=opts.read_only)
            registry.add(
                Export(
                    name,
                    backend,
                    image,
                    description,
                    bitmaps=tuple(opts.bitmaps),
                    allocation_depth=opts.allocation_depth,
                    discard=opts.discard,
                    detect_zeroes=opts.detect_zeroes,
                    cache=opts.cache,
                    offset=offset,
                    share=opts.rules.share,
                    throwaway=overlay,
                )
            )
    except BaseException:
        for driver in opened:
            await driver.close()
        raise
    return registry


async def _acquire_exclusive(image: str, driver: Driver, wait: float) -> None:
    acquire = getattr(driver, "acquire", None)
    if acquire is None:
        raise TapnbdError(f"{image}: --exclusive is for shared images (rbd:), not {driver.name}")
    if driver.can_write():
        await acquire(wait)


async def release_exclusive(registry: ExportRegistry) -> None:
    """Hand-over: flush each shared image and give up its exclusive lock.

    From then on a write that still reaches this host fails with EPERM (librbd refuses
    it with EROFS), so nothing can land after the next host took over.
    """
    for export in registry:
        driver = export.backend.driver
        release = getattr(driver, "release", None)
        if release is None:
            continue
        try:
            await release()
            log.info("%s: flushed and released the exclusive lock", export.name)
        except OSError as e:
            log.error("%s: releasing the exclusive lock failed: %s", export.name, e)


def write_stats(path: str, registry: ExportRegistry) -> None:
    """Each export's final counters (Stats.snapshot), for scripts and tests to check."""
    snapshot = {export.name: export.backend.stats.snapshot() for export in registry}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(snapshot, f, indent=2)
    os.replace(tmp, path)


async def start_metrics(spec: str, registry: ExportRegistry) -> MetricsServer:
    """The Prometheus endpoint of ``serve --metrics``, as the daemon's (same checks)."""
    from tapnbd.control.exports import export_stats
    from tapnbd.control.metrics import MetricsServer, check_address, prometheus_text

    check_address(spec)

    async def render() -> str:
        stats = [
            export_stats(
                e.name,
                e.image,
                e.backend.driver.name,
                e.backend.stats.snapshot(),
                e.backend.stats.enabled,
            )
            for e in registry
        ]
        return prometheus_text(stats, {"up": 1, "exports": len(registry)})

    server = MetricsServer(render)
    await server.listen(spec)
    return server


async def serve(opts: ServeOptions) -> int:
    budget = parse_size(opts.payload_budget)
    if opts.max_handshakes < 1:
        raise TapnbdError(f"--max-handshakes {opts.max_handshakes}: must be at least 1")
    registry = await open_exports(opts)
    ssl_context = None
    if opts.tls is not TLSMode.OFF:
        if not (opts.tls_cert and opts.tls_key):
            raise TapnbdError("--tls on|require needs --tls-cert and --tls-key")
        ssl_context = make_ssl_context(opts.tls_cert, opts.tls_key, opts.tls_ca)
    server = NBDServer(
        registry,
        tls_mode=opts.tls,
        ssl_context=ssl_context,
        max_connections=opts.max_connections,
        handshake_timeout=opts.handshake_timeout,
        max_handshakes=opts.max_handshakes,
        handshake_grace=opts.handshake_grace,
        payload_budget=budget,
        poll_us=opts.poll_us,
    )
    try:
        passed = activation_sockets()
        if passed:
            await server.listen_sockets(passed)
        else:
            if opts.socket:
                await server.listen_unix(opts.socket)
            if opts.port is not None or not opts.socket:
                await server.listen_tcp(opts.bind, 10809 if opts.port is None else opts.port)
    except OSError as e:
        await server.shutdown()
        where = opts.socket if opts.socket and opts.port is None else f"{opts.bind}:{opts.port}"
        raise TapnbdError(f"cannot listen on {where}: {e.strerror or e}") from None
    metrics = None
    if opts.metrics:
        try:
            metrics = await start_metrics(opts.metrics, registry)
        except BaseException:
            await server.shutdown()
            raise
    # Handlers first: a script may signal us as soon as it reads the URI.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    releases: set[asyncio.Task[None]] = set()

    def on_release() -> None:
        task = loop.create_task(release_exclusive(registry))
        releases.add(task)
        task.add_done_callback(releases.discard)

    loop.add_signal_handler(signal.SIGUSR1, on_release)
    # The pidfile is written once clients can connect (qemu-storage-daemon --pidfile),
    # with O_EXCL: only a stale pidfile of ours is replaced, nothing else (safefs).
    if opts.pidfile:
        try:
            safefs.write_pidfile(opts.pidfile)
        except (OSError, TapnbdError) as e:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            await server.shutdown()
            if isinstance(e, TapnbdError):
                raise
            raise TapnbdError(f"--pidfile {opts.pidfile}: {e.strerror or e}") from None
    # Ready: one URI per export, as nbdkit --print-uri; scripts wait for this line.
    # Not under socket activation: the activator knows the socket, and our stdout is
    # often its own (nbdinfo -- [ tapnbd serve ... ] prints JSON there).
    if not passed:
        for uri in server.uris():
            print(uri)
        sys.stdout.flush()
    if opts.ready_fd >= 0:
        detach(opts.ready_fd)

    unclean: list[str] = []
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        unclean = await server.shutdown()
        if metrics is not None:
            await metrics.close()
        if opts.pidfile:
            safefs.remove_pidfile(opts.pidfile)  # only if it still holds our pid
        if opts.stats_file:
            write_stats(opts.stats_file, registry)  # after shutdown: nothing in flight
    if unclean:
        # A script must not take the image for consistent. The reasons are logged.
        log.error("exiting with status 1: %s not closed cleanly", ", ".join(map(repr, unclean)))
        return 1
    return 0
