"""Listeners (TCP, unix socket, systemd socket activation) and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from tapnbd.errors import TapnbdError
from tapnbd.protocol.handshake import TLSMode
from tapnbd.protocol.uri import tcp_uri, unix_uri
from tapnbd.server.budget import DEFAULT_PAYLOAD_BUDGET, PayloadBudget
from tapnbd.server.connection import NBDConnection
from tapnbd.server.exports import ExportRegistry

log = logging.getLogger("tapnbd.server")

#: qemu-nbd's defaults after CVE-2024-7409: at most 100 clients, 10 s to finish the handshake.
DEFAULT_MAX_CONNECTIONS = 100
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Unfinished handshakes, a lower cap of their own: past it the oldest is dropped, so
#: clients that connect and stall hold at most this many slots and never lock out a
#: client that completes its handshake.
DEFAULT_MAX_HANDSHAKES = 16
#: A handshake younger than this is never dropped to make room: a burst of real clients
#: (fio --numjobs=100) may connect faster than the loop greets them. Over the cap with
#: only young handshakes, a newcomer is let in if the connection cap allows.
DEFAULT_HANDSHAKE_GRACE = 1.0
#: systemd's sd_listen_fds(3): passed sockets start at fd 3.
SD_LISTEN_FDS_START = 3


@dataclass(frozen=True)
class Endpoint:
    """Where a listener listens, for URIs."""

    kind: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def uri(self, export: str, tls: bool = False) -> str:
        if self.kind == "unix":
            return unix_uri(export, self.path, tls)
        return tcp_uri(export, self.host, self.port, tls)


def make_ssl_context(cert: str, key: str, ca: str | None) -> ssl.SSLContext:
    """An X.509 server context; with ``ca``, clients must present a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # "Implementations MUST support TLS 1.2"
    # ssl names no file in its errors ("No such file or directory", "PEM lib"): we do.
    for what, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise TapnbdError(f"{what} {path}: {e.strerror or e}") from None
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise TapnbdError(
            f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its private "
            f"key ({e.reason or e})"
        ) from None
    if ca:
        try:
            ctx.load_verify_locations(ca)
        except ssl.SSLError as e:
            raise TapnbdError(
                f"--tls-ca {ca}: not a PEM CA certificate ({e.reason or e})"
            ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_uid(sock: Any) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid


class PeerCheckedConnection(NBDConnection):
    """A connection on a unix socket whose peer's uid must pass ``allow`` (checked with
    SO_PEERCRED before the greeting); any other peer is dropped without a byte."""

    def __init__(self, server: NBDServer, allow: Callable[[int], bool]) -> None:
        super().__init__(server)
        self._allow = allow

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        pid, uid = peer_uid(sock) if sock is not None else (0, -1)
        if not self._allow(uid):
            log.warning("refused NBD connection from pid %d, uid %d", pid, uid)
            cast("asyncio.Transport", transport).abort()
            return
        super().connection_made(transport)


def activation_sockets() -> list[socket.socket]:
    """Sockets passed by systemd-style socket activation (LISTEN_PID, LISTEN_FDS)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not inherited by children (sd_listen_fds unset_environment)
    return [socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(count)]


class NBDServer:
    """Accepts NBD connections for the exports in ``registry``."""

    def __init__(
        self,
        registry: ExportRegistry,
        *,
        tls_mode: TLSMode = TLSMode.OFF,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        handshake_grace: float = DEFAULT_HANDSHAKE_GRACE,
        payload_budget: int = DEFAULT_PAYLOAD_BUDGET,
        poll_us: int = 0,
    ) -> None:
        if tls_mode is not TLSMode.OFF and ssl_context is None:
            raise ValueError("TLS needs a certificate and key")
        self.registry = registry
        self.tls_mode = tls_mode
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.max_handshakes = max(1, max_handshakes)
        self.handshake_grace = handshake_grace
        self.budget = PayloadBudget(payload_budget)
        self.poll_ns = max(0, poll_us) * 1000  # each connection's polling limit, 0: off
        self.shutting_down = False
        self.connections: set[NBDConnection] = set()
        # Connections still in the handshake and when they came, oldest first.
        self.handshaking: dict[NBDConnection, float] = {}
        self.endpoints: list[Endpoint] = []
        self._servers: list[asyncio.AbstractServer] = []

    # Connection bookkeeping, called by NBDConnection.

    def admit(self, conn: NBDConnection) -> bool:
        if self.shutting_down:
            return False
        now = time.monotonic()
        full = len(self.connections) >= self.max_connections
        if len(self.handshaking) >= self.max_handshakes:
            oldest, since = next(iter(self.handshaking.items()))
            if now - since >= self.handshake_grace:
                log.warning(
                    "%d unfinished handshakes: dropping the oldest, %s",
                    len(self.handshaking),
                    oldest.peer,
                )
                self.forget(oldest)
                oldest.drop()
                full = False
        if full:
            return False
        self.connections.add(conn)
        self.handshaking[conn] = now
        return True

    def handshake_done(self, conn: NBDConnection) -> None:
        self.handshaking.pop(conn, None)

    def forget(self, conn: NBDConnection) -> None:
        self.connections.discard(conn)
        self.handshaking.pop(conn, None)

    def _factory(self) -> NBDConnection:
        return NBDConnection(self)

    # Listening.

    async def listen_tcp(self, host: str, port: int) -> Endpoint:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self._factory, host, port, backlog=1024, reuse_address=True
        )
        self._servers.append(server)
        sockname = server.sockets[0].getsockname()
        endpoint = Endpoint("tcp", host=host, port=sockname[1])
        self.endpoints.append(endpoint)
        return endpoint

    async def listen_unix(
        self, path: str, *, mode: int | None = None, allow: Callable[[int], bool] | None = None
    ) -> Endpoint:
        """Listen on ``path``. With ``mode``, the socket is created with that mode (no
        window in which it is more open); with ``allow``, each peer's uid must pass it."""
        loop = asyncio.get_running_loop()
        if os.path.lexists(path):
            remove_stale_socket(path)

        def factory() -> NBDConnection:
            return PeerCheckedConnection(self, allow) if allow else NBDConnection(self)

        old = os.umask(0o777 & ~mode) if mode is not None else None
        try:
            server = await loop.create_unix_server(factory, path, backlog=1024)
        finally:
            if old is not None:
                os.umask(old)
        self._servers.append(server)
        endpoint = Endpoint("unix", path=path)
        self.endpoints.append(endpoint)
        return endpoint

    async def listen_sockets(self, socks: list[socket.socket]) -> list[Endpoint]:
        loop = asyncio.get_running_loop()
        out = []
        for sock in socks:
            if sock.family == socket.AF_UNIX:
                server = await loop.create_unix_server(self._factory, sock=sock)
                endpoint = Endpoint("unix", path=str(sock.getsockname()))
            else:
                server = await loop.create_server(self._factory, sock=sock)
                addr = sock.getsockname()
                endpoint = Endpoint("tcp", host=addr[0], port=addr[1])
            self._servers.append(server)
            self.endpoints.append(endpoint)
            out.append(endpoint)
        return out

    def uris(self) -> list[str]:
        tls = self.tls_mode is TLSMode.REQUIRE
        return [ep.uri(export.name, tls) for ep in self.endpoints for export in self.registry]

    async def shutdown(self, timeout: float = 30.0) -> list[str]:
        """Stop listening, let requests in flight finish, close connections and exports.

        Returns the exports not closed cleanly (Backend.close_within), for the exit
        status: empty when every one was."""
        self.shutting_down = True
        for server in self._servers:
            server.close()
        conns = list(self.connections)
        if conns:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(c.drain()) for c in conns], timeout=timeout
            )
            if pending:
                log.warning("%d connections did not drain in %g s", len(pending), timeout)
            for task in pending:
                task.cancel()
        for server in self._servers:
            await server.wait_closed()
        unclean = []
        for export in self.registry:
            if not await export.backend.close_within(export.name):
                unclean.append(export.name)
        for ep in self.endpoints:
            if ep.kind == "unix" and ep.path:
                try:
                    os.unlink(ep.path)
                except OSError:
                    pass
        return unclean


def remove_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on; refuse to steal a live one, and never
    remove anything that is not a socket (connecting to a regular file is refused just
    as to a dead socket, and the path may name any file)."""
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise OSError(17, f"{path}: exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(98, f"{path}: address already in use")
