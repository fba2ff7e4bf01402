"""The control daemon: owns the exports and the attachments, serves them over NBD.

blktap's blktapctrl, done with today's tools. One process per state directory (see
``state.py``) runs

- the NBD server (tapnbd.server) for ``export add``'s exports, on a unix socket in the
  state directory and on TCP if configured;
- the control socket, mode 0600, where each connection's peer is checked with
  SO_PEERCRED (``auth``) and then speaks request/reply pairs (``dispatch``,
  tapnbd.control.messages), one JSON line each;
- optionally a Prometheus endpoint (tapnbd.control.metrics).

Attached devices are not served from here: each has a data-path process of its own
(``tapdisk``, started by ``attachments`` through ``tapctl``), so they keep working when
the daemon dies, and a restarted daemon re-adopts them from its state file.

The roles are split by module: ``exports`` (the images it serves), ``attachments``
(devices and their data paths), ``persist`` (the state file), ``main`` (the process).
This module holds the daemon's life (start, stop) and its request handlers.

Every change to exports or attachments is serialised by one lock and recorded in the
state file before the reply goes out. On start the daemon re-adopts the data paths that
still run, undoes those that died unless their device is in use, and opens the exports
it recorded. ``daemon stop`` drains requests in flight, flushes and closes every export
and leaves the devices running; ``--all`` detaches them first (fsync, then down), and
is refused while any is mounted.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import time
from dataclasses import dataclass

from formats.filters.cachemode import check_cache_mode
from formats.imagemap import overlay_wanted
from tapnbd.control import attach as devices
from tapnbd.control import persist
from tapnbd.control.attachments import Attachments
from tapnbd.control.auth import allowed
from tapnbd.control.dispatch import Dispatcher, Handler
from tapnbd.control.exports import Exports, canonical_image, check_name
from tapnbd.control.messages import (
    MAX_LINE,
    Attachment,
    AttachReply,
    AttachRequest,
    DetachReply,
    DetachRequest,
    ExportAddReply,
    ExportAddRequest,
    ExportRecord,
    ExportRemoveReply,
    ExportRemoveRequest,
    ListReply,
    ListRequest,
    Request,
    ShutdownReply,
    ShutdownRequest,
    StatsReply,
    StatsRequest,
    StatusReply,
    StatusRequest,
)
from tapnbd.control.metrics import MetricsServer, check_address, prometheus_text, split_host_port
from tapnbd.control.state import StateDir
from tapnbd.errors import TapnbdError
from tapnbd.protocol.handshake import TLSMode
from tapnbd.server.exports import ExportRegistry
from tapnbd.server.listener import DEFAULT_MAX_CONNECTIONS, NBDServer, make_ssl_context
from tapnbd.server.poll import POLL_US_MAX
from tapnbd.server.standalone import export_name

log = logging.getLogger("tapnbd.control")

try:  # the distribution's version: works however the package was installed
    VERSION = importlib.metadata.version("tapnbd")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a bare checkout
    VERSION = "unknown"


@dataclass
class DaemonConfig:
    state_dir: str
    #: "HOST:PORT" for NBD over TCP, or None (the default): NBD only on the 0600
    #: unix socket. TCP needs TLS (``tls_cert`` and ``tls_key``) or ``insecure_tcp``.
    tcp: str | None = None
    #: Serve TCP without TLS: any local user (or any host, off loopback) can connect.
    insecure_tcp: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    #: With a CA, TCP clients must present a certificate it signed.
    tls_ca: str | None = None
    #: NBD on ``nbd.sock`` in the state directory.
    unix: bool = True
    #: "unix:PATH" or "HOST:PORT" on loopback for the Prometheus endpoint, or None.
    metrics: str | None = None
    #: Show image paths in NBD export descriptions.
    expose_paths: bool = False
    stats: bool = True
    #: Microseconds each NBD connection, here and in every tapdisk, busy-waits for its
    #: client's next request before sleeping (tapnbd.server.poll); 0: off.
    poll_us: int = 0
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def check(self) -> None:
        """Refuse a configuration that would let other users in by accident."""
        if self.tcp and not self.insecure_tcp and not (self.tls_cert and self.tls_key):
            raise TapnbdError(
                f"NBD on TCP {self.tcp} lets every local user (and, off loopback, every "
                "host) read and write the exports: give --tls-cert and --tls-key (and "
                "--tls-ca to ask for client certificates), or --insecure-tcp"
            )
        if (self.tls_cert or self.tls_key) and not self.tcp:
            raise TapnbdError("--tls-cert and --tls-key are for --tcp")
        if self.metrics:
            check_address(self.metrics)
        if not 0 <= self.poll_us <= POLL_US_MAX:  # else every tapdisk would refuse it
            raise TapnbdError(f"--poll-us {self.poll_us} is not in 0..{POLL_US_MAX}")


class Daemon:
    """The daemon's state and its request handlers."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.dir = StateDir(config.state_dir)
        self.registry = ExportRegistry()
        config.check()
        tls = bool(config.tcp and config.tls_cert and config.tls_key)
        self.server = NBDServer(
            self.registry,
            max_connections=config.max_connections,
            poll_us=config.poll_us,
            # TLS is the server's, so with TLS on TCP the unix socket asks for it too.
            tls_mode=TLSMode.REQUIRE if tls else TLSMode.OFF,
            ssl_context=(
                make_ssl_context(config.tls_cert, config.tls_key, config.tls_ca)
                if config.tls_cert and config.tls_key and tls
                else None
            ),
        )
        self.exports = Exports(self.server, self.registry, config.stats)
        self.exports.expose_paths = config.expose_paths
        self.attachments = Attachments(
            self.dir.path, self.dir.run_dir, config.stats, poll_us=config.poll_us
        )
        self.lock = asyncio.Lock()
        self.stopping = False
        self.unclean = False  # stop() closed an export without its last flush
        self.stopped = asyncio.Event()
        self.notes: list[str] = []
        self.started = time.time()
        self.metrics: MetricsServer | None = None
        self.control: asyncio.AbstractServer | None = None
        handlers: dict[type[Request], Handler] = {
            StatusRequest: self.on_status,
            ListRequest: self.on_list,
            StatsRequest: self.on_stats,
            ExportAddRequest: self.on_export_add,
            ExportRemoveRequest: self.on_export_remove,
            AttachRequest: self.on_attach,
            DetachRequest: self.on_detach,
            ShutdownRequest: self.on_shutdown,
        }
        self.dispatcher = Dispatcher(handlers, lambda: self.stopping, self.stopped.set)

    # Start and stop.

    async def start(self, pid_fd: int) -> None:
        """Clean up, restore, listen; the pidfile is written once everything is up."""
        d = self.dir
        previous = d.load()
        self.notes += await asyncio.to_thread(self.attachments.adopt, previous.attachments)
        for name in d.remove_sockets():
            log.info("removed stale %s", name)
        self.notes += await persist.restore_exports(previous, self.exports)
        for note in self.notes:
            log.info("%s", note)
        self._save()

        # The unix socket is the owner's: 0600 from the start, and SO_PEERCRED checked
        # (the owner and root only), as the control socket is.
        if self.config.unix:
            await self.server.listen_unix(d.nbd_socket, mode=0o600, allow=allowed)
        if self.config.tcp:
            host, port = split_host_port(self.config.tcp, "NBD address")
            try:
                await self.server.listen_tcp(host, port)
            except OSError as e:
                raise TapnbdError(
                    f"cannot listen on {self.config.tcp}: {e.strerror or e}"
                ) from None
            if self.config.insecure_tcp:
                log.warning("serving NBD on TCP %s without TLS (--insecure-tcp)", self.config.tcp)
        if self.config.metrics:
            self.metrics = MetricsServer(self.prometheus)
            await self.metrics.listen(self.config.metrics)
        old = os.umask(0o177)
        try:
            self.control = await asyncio.start_unix_server(
                self.dispatcher.client, d.control, limit=MAX_LINE + 1
            )
        finally:
            os.umask(old)
        os.chmod(d.control, 0o600)
        d.write_pid(pid_fd)
        log.info(
            "tapnbd %s daemon ready, pid %d: control %s, NBD %s%s",
            VERSION,
            os.getpid(),
            d.control,
            ", ".join(self.exports.listen()),
            f", metrics {self.metrics.address} /metrics" if self.metrics else "",
        )

    async def stop(self, detach: bool = False, lazy: bool = False) -> ShutdownReply:
        """Drain, flush and close every export; detach the devices too if ``detach``
        (the caller has checked that none is in use), else leave them running."""
        self.stopping = True
        detached = []
        unclean: list[str] = []
        if detach:
            for att in list(self.attachments):
                try:
                    if not await self._detach(att, lazy=lazy):
                        unclean.append(att.export)
                    detached.append(att.device)
                except (TapnbdError, OSError) as e:
                    log.error("detaching %s: %s", att.device, e)
        kept = [a.device or a.image for a in self.attachments]
        for device in kept:
            log.info("left %s attached: its data path runs on its own", device)
        unclean += await self.server.shutdown()
        self.unclean = bool(unclean)
        flushed = [e.name for e in self.registry if e.name not in unclean]
        for name in flushed:
            log.info("flushed and closed %r", name)
        self._save()
        return ShutdownReply(detached=detached, flushed=flushed, kept=kept, unclean=unclean)

    async def close(self) -> None:
        if self.control is not None:
            self.control.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dir.control)
        if self.metrics is not None:
            await self.metrics.close()

    # Requests that only read.

    async def on_status(self, req: StatusRequest) -> StatusReply:
        return StatusReply(
            pid=os.getpid(),
            version=VERSION,
            state_dir=self.dir.path,
            log=self.dir.log,
            started=self.started,
            listen=self.exports.listen(),
            metrics=self.metrics.address if self.metrics else None,
            exports=len(self.registry),
            attachments=len(self.attachments),
            stats_enabled=self.config.stats,
            poll_us=self.config.poll_us,
            notes=list(self.notes),
        )

    async def on_list(self, req: ListRequest) -> ListReply:
        exports = [self._record(e.name) for e in self.registry]
        for att in self._tapdisk_only():
            # Clients as `stats` counts them: every connection to its data path (an
            # nbdfuse or nbd-client device has several), so the two commands agree.
            try:
                clients = (await self.attachments.stats(att)).connections
            except TapnbdError as e:
                log.warning("no client count for %r: %s", att.export, e)
                clients = 0
            exports.append(Attachments.export_record(att, clients))
        return ListReply(
            exports=exports, attachments=[Attachments.record(a) for a in self.attachments]
        )

    async def on_stats(self, req: StatsRequest) -> StatsReply:
        if req.name is not None:
            if self.registry.get(req.name) is None:
                for att in self._tapdisk_only():
                    if att.export == req.name:
                        return StatsReply([await self.attachments.stats(att)])
            export = self.exports.get(req.name)
            return StatsReply([self.exports.stats(export)])
        out = [self.exports.stats(e) for e in self.registry]
        for att in self._tapdisk_only():
            try:
                out.append(await self.attachments.stats(att))
            except TapnbdError as e:
                log.warning("no statistics for %r: %s", att.export, e)
        return StatsReply(out)

    async def prometheus(self) -> str:
        # The attachments' exports too: their counters live in their data paths.
        stats = (await self.on_stats(StatsRequest(name=None))).exports
        return prometheus_text(
            stats,
            {
                "up": 1,
                "exports": len(self.registry),
                "attachments": len(self.attachments),
                "daemon_uptime_seconds": round(time.time() - self.started, 3),
            },
        )

    # Requests that change things, one at a time.

    async def on_export_add(self, req: ExportAddRequest) -> ExportAddReply:
        async with self.lock:
            image = canonical_image(req.image)
            other = self.exports.of_image(image)
            if other is not None:
                raise TapnbdError(f"{req.image} is already exported as {other.name!r}")
            name = check_name(req.name if req.name is not None else export_name(image))
            if self.registry.get(name) is not None:
                raise TapnbdError(
                    f"an export named {name!r} already exists; choose another with --name"
                )
            export = await self.exports.open(
                image,
                name,
                req.read_only,
                req.format,
                "export",
                req.snapshot,
                req.bitmaps,
                req.allocation_depth,
                req.discard,
                req.detect_zeroes,
                cache=req.cache,
                offset=req.offset,
                share=req.share,
                throwaway=req.throwaway,
                trust=req.trust,
            )
            self._save()
            log.info("added export %r (%s, %s)", name, image, export.format)
            return ExportAddReply(self._record(name))

    async def on_export_remove(self, req: ExportRemoveRequest) -> ExportRemoveReply:
        async with self.lock:
            export = self.exports.get(req.name)
            atts = self.attachments.of_export(export.name)
            clients = self.exports.clients(export)
            if (atts or clients) and not req.force:
                devs = ", ".join(a.device for a in atts)
                n = len(clients)
                who = f"{n} client{'s' if n != 1 else ''} connected"
                if atts and clients:
                    why = f"is attached as {devs} and has {who}; detach it first, or use --force"
                elif atts:
                    why = f"is attached as {devs}; detach it first, or use --force"
                else:
                    why = f"has {who}; use --force to disconnect them"
                raise TapnbdError(f"export {export.name!r} {why}")
            for att in atts:
                busy = await self.attachments.busy(att)
                if busy:
                    raise TapnbdError(f"cannot remove export {export.name!r}: {busy}")
            detached = []
            for att in atts:
                await self._detach(att)
                detached.append(att.device)
            clients = self.exports.clients(export)
            flushed = await self.exports.remove(export)
            self._save()
            log.info(
                "removed export %r (detached %s, disconnected %d)",
                export.name,
                detached,
                len(clients),
            )
            return ExportRemoveReply(
                name=export.name,
                detached=detached,
                disconnected=len(clients),
                flushed=flushed,
            )

    async def on_attach(self, req: AttachRequest) -> AttachReply:
        async with self.lock:
            image = canonical_image(req.image) if req.image.startswith("/") else req.image
            for other in self.attachments:
                if other.export == req.image or (other.image == image and "ram:" not in image):
                    raise TapnbdError(f"{other.image} is already attached as {other.device}")
            existing, image, name = self.exports.attach_target(req, self.attachments.names())
            via, reason = await asyncio.to_thread(devices.choose_via, req.via)
            # A snapshot is shown read-only, unless a throwaway overlay takes the writes.
            read_only = req.read_only or (req.snapshot is not None and not req.throwaway)
            fmt, snapshot, cache = req.format, req.snapshot, req.cache
            probed_raw, trust = False, req.trust
            check_cache_mode(cache)
            if existing is not None:
                # A device's throwaway overlay is its data path's own: it would not show
                # what the export shows, nor the export what the device writes.
                if existing.throwaway:
                    raise TapnbdError(
                        f"export {name!r} writes to a throwaway overlay in the daemon, which "
                        f"a device's own data path cannot share; `tapnbd export remove "
                        f"{name}`, then `tapnbd attach -s {image}`"
                    )
                if req.throwaway:
                    raise TapnbdError(
                        f"{image} is already exported as {name!r}, and a device's throwaway "
                        f"overlay (-s) would not show what the export shows; attach it "
                        f"without -s, or `tapnbd export remove {name}` first"
                    )
                kept = self.exports.kept[existing.name]
                fmt, probed_raw = kept.format, kept.probed_raw
                # The device opens the chain as the export did.
                trust = kept.trust
                cache = existing.cache
                # The device shows what the export shows.
                snapshot = kept.snapshot
                if snapshot is not None:
                    read_only = True
                if existing.backend.read_only and not read_only:
                    read_only = True
                    reason += "; read-only, as the export is"
            att = self.attachments.new(name, image, via, read_only)
            att.snapshot, att.cache, att.share = snapshot, cache, req.share
            att.throwaway = overlay_wanted(req.throwaway, read_only)
            att.trust = trust
            self._save()  # recorded before anything exists, so a crash is undone
            try:
                # A raw export of ours and the device's data path may share the file
                # (one page cache); a qcow's tables may not, so its lock stays, unless
                # the user shares the image (--share).
                share = req.share or (existing is not None and fmt == "raw")
                await self.attachments.start(
                    att, fmt, self._save, share=share, probed_raw=probed_raw
                )
            except BaseException as e:
                self.attachments.by_id.pop(att.id, None)
                self._save()
                if existing is not None and isinstance(e, TapnbdError) and "in use" in str(e):
                    # A writable qcow is locked by the daemon's own export of it.
                    raise TapnbdError(
                        f"{e}: the daemon's export {name!r} holds it, and a device needs "
                        f"a data path of its own; `tapnbd export remove {name}`, then "
                        f"`tapnbd attach {image}`"
                    ) from None
                raise
            self._save()
            log.info(
                "attached %r as %s via %s (%s), data path pid %d",
                name,
                att.device,
                via,
                reason,
                att.tapdisk_pid,
            )
            return AttachReply(
                Attachments.record(att), reason=reason, created_export=existing is None
            )

    async def on_detach(self, req: DetachRequest) -> DetachReply:
        async with self.lock:
            att = self.attachments.find(req.target)
            busy = await self.attachments.busy(att)
            if busy:
                raise TapnbdError(f"cannot detach: {busy}")
            flushed = await self._detach(att)
            log.info("detached %s (%r)", att.device, att.export)
            # An export attach made lived in the tapdisk, and went with it.
            removed = self.registry.get(att.export) is None
            return DetachReply(Attachments.record(att), removed_export=removed, flushed=flushed)

    async def on_shutdown(self, req: ShutdownRequest) -> ShutdownReply:
        async with self.lock:
            if req.all:
                # Forced or not: detaching a mounted device loses its file system.
                for att in self.attachments:
                    busy = await self.attachments.busy(att)
                    if busy:
                        raise TapnbdError(
                            f"not stopping: {busy}; or stop without --all, which leaves "
                            "the devices running"
                        )
            return await self.stop(detach=req.all, lazy=req.force)

    # Helpers.

    async def _detach(self, att: Attachment, lazy: bool = False) -> bool:
        flushed = await self.attachments.detach(att, lazy=lazy)
        self._save()
        if not flushed:
            log.error("%s (%r): its data path closed without a last flush", att.device, att.export)
        return flushed

    def _record(self, name: str) -> ExportRecord:
        export = self.exports.get(name)
        devs = [a.device for a in self.attachments.of_export(name)]
        return self.exports.record(export, devs)

    def _tapdisk_only(self) -> list[Attachment]:
        """Attachments whose export is the tapdisk's alone (made by ``attach``)."""
        return [a for a in self.attachments if self.registry.get(a.export) is None]

    def _save(self) -> None:
        persist.save(self.dir, self.exports, list(self.attachments))
