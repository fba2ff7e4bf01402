"""The control daemon: owns the exports and the attachments, serves them over NBD.

blktap's blktapctrl, done with today's tools. One process per state directory (see
``state.py``) runs

- the NBD server (tapnbd.server) on a unix socket in the state directory, on TCP if
  configured, and on a private socket that only the daemon's own attachments use;
- the control socket, mode 0600, where each connection's peer is checked with
  SO_PEERCRED (its owner's uid, or root) and then speaks request/reply pairs
  (tapnbd.control.messages), one JSON line each;
- optionally a Prometheus endpoint (tapnbd.control.metrics).

Every change to exports or attachments is serialised by one lock and recorded in the
state file before the reply goes out. On start the daemon cleans up after a predecessor
that died (devices, nbdfuse, sockets) and opens the exports it recorded. ``daemon stop``
detaches every device (fsync first), drains requests in flight, flushes and closes every
image, and only then answers.

Anything that may wait on a device (attach, detach, fsync) runs in a worker thread: the
device's I/O comes back through this very event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import itertools
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from formats import open_image
from tapnbd.backend import Backend
from tapnbd.control import attach as devices
from tapnbd.control.attach import Attachment
from tapnbd.control.messages import (
    MAX_LINE,
    AttachmentRecord,
    AttachReply,
    AttachRequest,
    DetachReply,
    DetachRequest,
    ErrorReply,
    ExportAddReply,
    ExportAddRequest,
    ExportRecord,
    ExportRemoveReply,
    ExportRemoveRequest,
    ExportStats,
    ListReply,
    ListRequest,
    MessageError,
    OpCounters,
    Reply,
    Request,
    ShutdownReply,
    ShutdownRequest,
    StatsReply,
    StatsRequest,
    StatusReply,
    StatusRequest,
    decode,
    encode,
)
from tapnbd.control.metrics import MetricsServer, prometheus_text
from tapnbd.control.state import ExportEntry, State, StateDir
from tapnbd.errors import TapnbdError
from tapnbd.server.exports import Export, ExportRegistry
from tapnbd.server.listener import DEFAULT_MAX_CONNECTIONS, Endpoint, NBDServer
from tapnbd.server.standalone import export_name

log = logging.getLogger("tapnbd.control")

try:  # the distribution's version: works however the package was installed
    VERSION = importlib.metadata.version("tapnbd")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a bare checkout
    VERSION = "unknown"

#: The daemon listens for NBD here unless told otherwise (the IANA port, loopback only).
DEFAULT_TCP = "127.0.0.1:10809"
#: Longest export name accepted (the NBD spec's limit on names is 4096 bytes).
MAX_NAME = 256


@dataclass
class DaemonConfig:
    state_dir: str
    #: "HOST:PORT" for NBD over TCP, or None for none.
    tcp: str | None = DEFAULT_TCP
    #: Whether ``tcp`` was asked for; the default one is given up if its port is taken.
    tcp_explicit: bool = False
    #: NBD on ``nbd.sock`` in the state directory.
    unix: bool = True
    #: "HOST:PORT" for the Prometheus endpoint, or None.
    metrics: str | None = None
    stats: bool = True
    max_connections: int = DEFAULT_MAX_CONNECTIONS


def split_host_port(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise TapnbdError(f"invalid {what} {text!r}: expected HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def canonical_image(spec: str) -> str:
    """How an image is identified: its real path, or the ``ram:SIZE`` spec as given."""
    if spec.startswith("ram:"):
        return spec
    if not os.path.isabs(spec):
        raise TapnbdError(f"image path {spec!r} must be absolute (the client resolves it)")
    return os.path.realpath(spec)


def check_name(name: str) -> str:
    if not name:
        raise TapnbdError("an export name cannot be empty")
    if len(name.encode()) > MAX_NAME or not name.isprintable():
        raise TapnbdError(f"invalid export name {name!r}: printable, at most {MAX_NAME} bytes")
    return name


def peer_uid(sock: Any) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid


class Daemon:
    """The daemon's state and its request handlers."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.dir = StateDir(config.state_dir)
        self.registry = ExportRegistry()
        self.server = NBDServer(self.registry, max_connections=config.max_connections)
        self.origin: dict[str, str] = {}  # export name -> "export" | "attach"
        self.formats: dict[str, str] = {}  # export name -> format asked for
        self.attachments: dict[str, Attachment] = {}  # id -> attachment
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # id -> nbdfuse
        self.ids = itertools.count(1)
        self.lock = asyncio.Lock()
        self.stopping = False
        self.stopped = asyncio.Event()
        self.notes: list[str] = []
        self.started = time.time()
        self.metrics: MetricsServer | None = None
        self.control: asyncio.AbstractServer | None = None
        self.attach_endpoint: Endpoint | None = None
        self._handlers: dict[type[Request], Callable[[Any], Awaitable[Reply]]] = {
            StatusRequest: self.on_status,
            ListRequest: self.on_list,
            StatsRequest: self.on_stats,
            ExportAddRequest: self.on_export_add,
            ExportRemoveRequest: self.on_export_remove,
            AttachRequest: self.on_attach,
            DetachRequest: self.on_detach,
            ShutdownRequest: self.on_shutdown,
        }

    # Start and stop.

    async def start(self, pid_fd: int) -> None:
        """Clean up, restore, listen; the pidfile is written once everything is up."""
        d = self.dir
        previous = d.load()
        self.notes += await asyncio.to_thread(
            devices.cleanup_stale, previous.attachments, d.run_dir
        )
        for name in d.remove_sockets():
            log.info("removed stale %s", name)
        for entry in previous.exports:
            if entry.origin != "export":
                continue  # made by an attach that is gone now
            try:
                await self._open_export(
                    entry.image, entry.name, entry.read_only, entry.format, "export"
                )
            except (TapnbdError, OSError) as e:
                self.notes.append(f"could not restore export {entry.name!r} ({entry.image}): {e}")
            else:
                self.notes.append(f"restored export {entry.name!r} ({entry.image})")
        for note in self.notes:
            log.info("%s", note)
        self._save()

        self.attach_endpoint = await self.server.listen_unix(d.attach_socket)
        if self.config.unix:
            await self.server.listen_unix(d.nbd_socket)
        if self.config.tcp:
            host, port = split_host_port(self.config.tcp, "NBD address")
            try:
                await self.server.listen_tcp(host, port)
            except OSError as e:
                if self.config.tcp_explicit or not self.config.unix:
                    raise TapnbdError(
                        f"cannot listen on {self.config.tcp}: {e.strerror or e}"
                    ) from None
                note = f"not serving NBD on TCP {self.config.tcp}: {e.strerror or e}"
                self.notes.append(note)
                log.warning("%s", note)
        if self.config.metrics:
            host, port = split_host_port(self.config.metrics, "metrics address")
            self.metrics = MetricsServer(self.prometheus)
            try:
                await self.metrics.start(host, port)
            except OSError as e:
                raise TapnbdError(
                    f"cannot listen on {self.config.metrics}: {e.strerror or e}"
                ) from None
        old = os.umask(0o177)
        try:
            self.control = await asyncio.start_unix_server(
                self._client, d.control, limit=MAX_LINE + 1
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
            ", ".join(self._listen()),
            f", metrics http://{self.metrics.address}/metrics" if self.metrics else "",
        )

    async def stop(self, force: bool = True) -> ShutdownReply:
        """Detach everything, drain, flush and close every image."""
        self.stopping = True
        detached = []
        for att in list(self.attachments.values()):
            try:
                await self._detach(att, lazy=force)
                detached.append(att.device)
            except (TapnbdError, OSError) as e:
                log.error("detaching %s: %s", att.device, e)
        flushed = [e.name for e in self.registry]
        await self.server.shutdown()
        for name in flushed:
            log.info("flushed and closed %r", name)
        self._save()
        return ShutdownReply(detached=detached, flushed=flushed)

    async def close(self) -> None:
        if self.control is not None:
            self.control.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dir.control)
        if self.metrics is not None:
            await self.metrics.close()

    # The control socket.

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            pid, uid = peer_uid(writer.get_extra_info("socket"))
            if uid not in (0, os.geteuid()):
                log.warning("refused control connection from pid %d, uid %d", pid, uid)
                # Take its request first, so that it reads the refusal, not EPIPE.
                with contextlib.suppress(TimeoutError, ValueError, asyncio.LimitOverrunError):
                    await asyncio.wait_for(reader.readline(), timeout=2)
                writer.write(
                    encode(ErrorReply(f"permission denied: uid {uid} does not own this daemon"))
                )
                await writer.drain()
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(encode(ErrorReply("message too long")))
                    return
                if not line:
                    return
                reply, after = await self._dispatch(line)
                writer.write(encode(reply))
                await writer.drain()
                if after is not None:
                    after()
        except (ConnectionError, OSError) as e:
            log.debug("control client: %s", e)
        finally:
            writer.close()

    async def _dispatch(self, line: bytes) -> tuple[Reply, Callable[[], None] | None]:
        try:
            req = decode(line)
        except MessageError as e:
            return ErrorReply(f"bad request: {e}"), None
        handler = self._handlers.get(type(req)) if isinstance(req, Request) else None
        if handler is None:
            return ErrorReply(f"{req.TYPE!r} is not a request"), None
        if self.stopping and not isinstance(req, StatusRequest):
            return ErrorReply("the daemon is stopping"), None
        try:
            reply = await handler(req)
        except (TapnbdError, OSError) as e:
            text = (
                str(e)
                if isinstance(e, TapnbdError)
                else f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"
            )
            return ErrorReply(text), None
        except Exception as e:
            log.exception("handling %s", req.TYPE)
            return ErrorReply(f"internal error: {type(e).__name__}: {e}"), None
        after = self.stopped.set if isinstance(req, ShutdownRequest) else None
        return reply, after

    # Requests that only read.

    async def on_status(self, req: StatusRequest) -> StatusReply:
        return StatusReply(
            pid=os.getpid(),
            version=VERSION,
            state_dir=self.dir.path,
            log=self.dir.log,
            started=self.started,
            listen=self._listen(),
            metrics=self.metrics.address if self.metrics else None,
            exports=len(self.registry),
            attachments=len(self.attachments),
            stats_enabled=self.config.stats,
            notes=list(self.notes),
        )

    async def on_list(self, req: ListRequest) -> ListReply:
        return ListReply(
            exports=[self._record(e) for e in self.registry],
            attachments=[self._att_record(a) for a in self.attachments.values()],
        )

    async def on_stats(self, req: StatsRequest) -> StatsReply:
        if req.name is not None:
            export = self._export(req.name)
            return StatsReply([self._stats(export)])
        return StatsReply([self._stats(e) for e in self.registry])

    def prometheus(self) -> str:
        return prometheus_text(
            [self._stats(e) for e in self.registry],
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
            other = self._export_of_image(image)
            if other is not None:
                raise TapnbdError(f"{req.image} is already exported as {other.name!r}")
            name = check_name(req.name if req.name is not None else export_name(image))
            if self.registry.get(name) is not None:
                raise TapnbdError(
                    f"an export named {name!r} already exists; choose another with --name"
                )
            export = await self._open_export(image, name, req.read_only, req.format, "export")
            self._save()
            log.info("added export %r (%s, %s)", name, image, export.format)
            return ExportAddReply(self._record(export))

    async def on_export_remove(self, req: ExportRemoveRequest) -> ExportRemoveReply:
        async with self.lock:
            export = self._export(req.name)
            atts = [a for a in self.attachments.values() if a.export == export.name]
            clients = self._clients(export)
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
                busy = await asyncio.to_thread(devices.busy_reason, att.device)
                if busy:
                    raise TapnbdError(f"cannot remove export {export.name!r}: {busy}")
            detached = []
            for att in atts:
                await self._detach(att)
                detached.append(att.device)
            clients = self._clients(export)
            await self._remove_export(export)
            self._save()
            log.info(
                "removed export %r (detached %s, disconnected %d)",
                export.name,
                detached,
                len(clients),
            )
            return ExportRemoveReply(name=export.name, detached=detached, disconnected=len(clients))

    async def on_attach(self, req: AttachRequest) -> AttachReply:
        async with self.lock:
            export, created = await self._export_for_attach(req)
            try:
                for att in self.attachments.values():
                    if att.export == export.name:
                        raise TapnbdError(f"{export.image} is already attached as {att.device}")
                via, reason = await asyncio.to_thread(devices.choose_via, req.via)
                read_only = req.read_only or export.backend.read_only
                if read_only and not req.read_only:
                    reason += "; read-only, as the export is"
                att = Attachment(
                    id=str(next(self.ids)),
                    export=export.name,
                    image=export.image,
                    via=via,
                    read_only=read_only,
                )
                self.attachments[att.id] = att
                self._save()  # recorded before anything exists, so a crash is undone
                try:
                    await self._attach(att, export)
                except BaseException:
                    del self.attachments[att.id]
                    self._save()
                    raise
            except BaseException:
                if created:
                    await self._remove_export(export)
                    self._save()
                raise
            self._save()
            log.info("attached %r as %s via %s (%s)", export.name, att.device, via, reason)
            return AttachReply(self._att_record(att), reason=reason, created_export=created)

    async def on_detach(self, req: DetachRequest) -> DetachReply:
        async with self.lock:
            att = self._find_attachment(req.target)
            busy = await asyncio.to_thread(devices.busy_reason, att.device)
            if busy:
                raise TapnbdError(f"cannot detach: {busy}")
            await self._detach(att)
            removed = False
            export = self.registry.get(att.export)
            if (
                export is not None
                and self.origin.get(export.name) == "attach"
                and not self._clients(export)
            ):
                await self._remove_export(export)
                removed = True
            self._save()
            log.info("detached %s (%r)", att.device, att.export)
            return DetachReply(self._att_record(att), removed_export=removed)

    async def on_shutdown(self, req: ShutdownRequest) -> ShutdownReply:
        async with self.lock:
            if not req.force:
                for att in self.attachments.values():
                    busy = await asyncio.to_thread(devices.busy_reason, att.device)
                    if busy:
                        raise TapnbdError(f"not stopping: {busy} (or use --force)")
            return await self.stop(force=req.force)

    # Helpers.

    async def _open_export(
        self, image: str, name: str, read_only: bool, fmt: str, origin: str
    ) -> Export:
        driver = await open_image(image, fmt=fmt, read_only=read_only)
        try:
            backend = Backend(driver, read_only=read_only)
            backend.stats.enabled = self.config.stats
            export = Export(name, backend, image, f"{image} ({driver.name})")
            self.registry.add(export)
        except BaseException:
            await driver.close()
            raise
        self.origin[name] = origin
        self.formats[name] = driver.name  # what was opened, never "auto": no re-probe
        return export

    async def _remove_export(self, export: Export) -> None:
        """Take the export out of the registry, disconnect its clients, flush, close."""
        if self.registry.get(export.name) is export:
            self.registry.remove(export.name)
        conns = [c for c in self.server.connections if c.export is export]
        if conns:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(c.drain()) for c in conns], timeout=30
            )
            for task in pending:
                task.cancel()
        self.origin.pop(export.name, None)
        self.formats.pop(export.name, None)
        await export.backend.close()

    async def _export_for_attach(self, req: AttachRequest) -> tuple[Export, bool]:
        """The export to attach (made now if needed), and whether it was made now."""
        image = canonical_image(req.image) if req.image.startswith(("/", "ram:")) else req.image
        existing = self._export_of_image(image) if not image.startswith("ram:") else None
        if existing is None and not image.startswith(("/", "ram:")):
            existing = self.registry.get(image)  # the name of an export
            if existing is None:
                raise TapnbdError(f"no image or export named {req.image!r}")
        if existing is not None:
            if req.name is not None and req.name != existing.name:
                raise TapnbdError(f"{existing.image} is already exported as {existing.name!r}")
            return existing, False
        if req.name is not None:
            name = check_name(req.name)
            if self.registry.get(name) is not None:
                raise TapnbdError(
                    f"an export named {name!r} already exists; choose another with --name"
                )
        else:
            base = check_name(export_name(image) or "disk")
            name = base
            for n in itertools.count(2):
                if self.registry.get(name) is None:
                    break
                name = f"{base}-{n}"
        return await self._open_export(image, name, req.read_only, req.format, "attach"), True

    async def _attach(self, att: Attachment, export: Export) -> None:
        socket_path = self.dir.attach_socket
        if att.via == "nbd":
            conns = 4 if export.backend.can_multi_conn else 1
            await asyncio.to_thread(devices.attach_nbd, att, socket=socket_path, connections=conns)
            return
        uri = f"nbd+unix:///{urllib.parse.quote(export.name, safe='')}?socket={socket_path}"
        mountdir = os.path.join(self.dir.run_dir, att.id)
        proc = await asyncio.to_thread(devices.attach_fuse, att, uri=uri, mountdir=mountdir)
        self.procs[att.id] = proc

    async def _detach(self, att: Attachment, lazy: bool = False) -> None:
        """fsync the device, then take it down; the record goes once it is gone."""
        if att.device:
            await asyncio.to_thread(devices.flush_device, att.device)
        if att.via == "nbd":
            await asyncio.to_thread(devices.detach_nbd, att)
        else:
            proc = self.procs.pop(att.id, None)
            await asyncio.to_thread(devices.detach_fuse, att, proc, lazy=lazy)
        self.attachments.pop(att.id, None)
        self._save()

    def _find_attachment(self, target: str) -> Attachment:
        atts = list(self.attachments.values())
        if target.startswith("/"):
            real = os.path.realpath(target)
            for att in atts:
                if att.device and os.path.realpath(att.device) == real:
                    return att
            for att in atts:
                if att.image == real:
                    return att
        for att in atts:
            if att.export == target or att.image == target:
                return att
        raise TapnbdError(f"nothing is attached as {target}")

    def _export(self, name: str) -> Export:
        export = self.registry.get(name) if name else None
        if export is None:
            raise TapnbdError(f"no export named {name!r}")
        return export

    def _export_of_image(self, image: str) -> Export | None:
        for export in self.registry:
            if export.image == image:
                return export
        return None

    def _is_attachment_conn(self, conn: Any) -> bool:
        transport = conn.transport
        if transport is None:
            return False
        return str(transport.get_extra_info("sockname") or "") == self.dir.attach_socket

    def _clients(self, export: Export) -> list[Any]:
        """NBD connections to ``export`` other than those carrying its attachments."""
        return [
            c
            for c in self.server.connections
            if c.export is export and not self._is_attachment_conn(c)
        ]

    def _listen(self) -> list[str]:
        out = []
        for ep in self.server.endpoints:
            if ep is self.attach_endpoint:
                continue
            out.append(f"unix:{ep.path}" if ep.kind == "unix" else f"tcp:{ep.host}:{ep.port}")
        return out

    def _uris(self, export: Export) -> list[str]:
        return [
            ep.uri(export.name) for ep in self.server.endpoints if ep is not self.attach_endpoint
        ]

    def _record(self, export: Export) -> ExportRecord:
        return ExportRecord(
            name=export.name,
            image=export.image,
            format=export.format,
            size=export.backend.size,
            read_only=export.backend.read_only,
            clients=len(self._clients(export)),
            devices=[a.device for a in self.attachments.values() if a.export == export.name],
            uris=self._uris(export),
            origin=cast("Any", self.origin.get(export.name, "export")),
        )

    def _att_record(self, att: Attachment) -> AttachmentRecord:
        return AttachmentRecord(
            device=att.device,
            export=att.export,
            image=att.image,
            via=att.via,
            read_only=att.read_only,
        )

    def _stats(self, export: Export) -> ExportStats:
        stats = export.backend.stats
        snap = cast("dict[str, Any]", stats.snapshot())
        return ExportStats(
            name=export.name,
            image=export.image,
            format=export.format,
            ops={op: OpCounters(**c) for op, c in snap["ops"].items()},
            errors_by_errno=dict(snap["errors_by_errno"]),
            in_flight=snap["in_flight"],
            connections=snap["connections"],
            uptime_s=snap["uptime_s"],
            enabled=stats.enabled,
        )

    def _save(self) -> None:
        state = State(
            exports=[
                ExportEntry(
                    name=e.name,
                    image=e.image,
                    format=self.formats.get(e.name, "auto"),
                    read_only=e.backend.read_only,
                    origin=cast("Any", self.origin.get(e.name, "export")),
                )
                for e in self.registry
            ],
            attachments=list(self.attachments.values()),
        )
        self.dir.save(state)


def _setup_logging(path: str, verbose: bool) -> None:
    root = logging.getLogger("tapnbd")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    if sys.stderr.isatty():
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("tapnbd: %(message)s"))
        root.addHandler(console)


async def run_daemon(config: DaemonConfig, *, verbose: bool = False) -> int:
    """Run the daemon in this process until ``daemon stop``, SIGTERM or SIGINT."""
    d = StateDir(config.state_dir)
    d.create()
    os.umask(0o077)
    pid_fd = d.lock()
    if pid_fd is None:
        raise TapnbdError(f"a daemon is already running for {d.path} (pid {d.read_pid()})")
    try:
        _setup_logging(d.log, verbose)
        daemon = Daemon(config)
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, signalled.set)
        try:
            try:
                await daemon.start(pid_fd)
            except BaseException:
                await daemon.server.shutdown()
                await daemon.close()
                raise
            waiters = [
                asyncio.ensure_future(daemon.stopped.wait()),
                asyncio.ensure_future(signalled.wait()),
            ]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
            if signalled.is_set() and not daemon.stopped.is_set():
                log.info("signalled: stopping")
                async with daemon.lock:
                    await daemon.stop(force=True)
            await daemon.close()
            log.info("stopped")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    finally:
        with contextlib.suppress(OSError):
            d.clear_pid(pid_fd)
        os.close(pid_fd)
    return 0
