"""Statistics in the Prometheus text exposition format (version 0.0.4), and its server.

Served on ``--metrics unix:PATH`` (a 0600 socket: ``curl --unix-socket PATH
http://x/metrics``) or on ``--metrics HOST:PORT`` on loopback, never by default, at
``/metrics`` by a few lines of asyncio: one
request per connection, GET only, no keep-alive, which is all a scraper needs.
Counters carry ``_total``. Latency is a real histogram per export and operation
(``tapnbd_request_duration_seconds_bucket{le=...}``, ``_sum``, ``_count``), its bounds
the power-of-two buckets tapnbd.stats counts into, from about 1 us to 34 s, so
``histogram_quantile()`` works on it; ``_count`` is the requests that succeeded. A
request served at once is observed as the duration of its batch (tapnbd.stats): an
upper bound on its own time in the server.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable

from tapnbd.control.messages import ExportStats
from tapnbd.errors import TapnbdError
from tapnbd.server.listener import remove_stale_socket

log = logging.getLogger("tapnbd.control")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Scrapes served at once. A loopback port is open to every local user: without a cap,
#: idle connections would take the process's file descriptors, and with them the NBD
#: and control sockets' accepts. Newcomers over it are closed at once.
MAX_CLIENTS = 8
#: A scrape's whole exchange, request to last byte sent (Prometheus' own default
#: scrape timeout is 10 s; a scraper reads a small page at once).
EXCHANGE_TIMEOUT = 5.0
#: The histogram's bounds: buckets 2**10 ns (1.024 us) to 2**35 ns (34.4 s) of
#: tapnbd.stats, whose bucket i holds 2**(i-1) < ns <= 2**i. Fixed, so series stay.
LE_BUCKETS = range(10, 36)


def _cumulative(hist: list[int]) -> list[int]:
    """Requests at or under each bound of LE_BUCKETS."""
    out = []
    total = sum(hist[: LE_BUCKETS[0]])
    for i in LE_BUCKETS:
        if i < len(hist):
            total += hist[i]
        out.append(total)
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host_port(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise TapnbdError(f"invalid {what} {text!r}: expected HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def check_address(spec: str) -> None:
    """Refuse a metrics address other users could reach: unix:PATH or loopback only."""
    if spec.startswith("unix:"):
        return
    host, _ = split_host_port(spec, "metrics address")
    if not is_loopback(host):
        raise TapnbdError(
            f"metrics on {spec}: serve them on unix:PATH or on a loopback address (127.0.0.1, ::1)"
        )


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def prometheus_text(exports: list[ExportStats], daemon: dict[str, float]) -> str:
    """The exposition text for ``exports``, plus daemon-wide gauges ``daemon``."""
    out: list[str] = []

    def family(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {_num(v)}" for labels, v in samples)

    for key, value in daemon.items():
        family(f"tapnbd_{key}", "gauge", key.replace("_", " ").capitalize() + ".", [("", value)])

    def per_op(attr: str, per: int = 1) -> list[tuple[str, float]]:
        rows: list[tuple[str, float]] = []
        for e in exports:
            for op, c in e.ops.items():
                value = getattr(c, attr)
                rows.append(
                    (
                        f'{{export="{_label(e.name)}",op="{op}"}}',
                        value / per if per != 1 else value,
                    )
                )
        return rows

    family("tapnbd_requests_total", "counter", "Requests completed, by operation.", per_op("ops"))
    family("tapnbd_bytes_total", "counter", "Bytes transferred, by operation.", per_op("bytes"))
    family(
        "tapnbd_request_errors_total", "counter", "Requests failed, by operation.", per_op("errors")
    )
    by_errno: list[tuple[str, float]] = []
    for e in exports:
        for num, count in e.errors_by_errno.items():
            name = errno.errorcode.get(int(num), num) if num.isdigit() else num
            by_errno.append((f'{{export="{_label(e.name)}",errno="{_label(name)}"}}', count))
    family("tapnbd_errors_by_errno_total", "counter", "Requests failed, by errno.", by_errno)
    name = "tapnbd_request_duration_seconds"
    out.append(
        f"# HELP {name} Latency of requests that succeeded, by operation; a request served "
        "at once counts the time of the batch of pipelined requests it came with."
    )
    out.append(f"# TYPE {name} histogram")
    for e in exports:
        for op, c in e.ops.items():
            labels = f'export="{_label(e.name)}",op="{op}"'
            for i, n in zip(LE_BUCKETS, _cumulative(c.hist), strict=True):
                out.append(f'{name}_bucket{{{labels},le="{_num((1 << i) / 1e9)}"}} {n}')
            out.append(f'{name}_bucket{{{labels},le="+Inf"}} {c.ops}')
            out.append(f"{name}_sum{{{labels}}} {_num(c.sum_ns / 1e9)}")
            out.append(f"{name}_count{{{labels}}} {c.ops}")
    family(
        "tapnbd_request_duration_max_seconds",
        "gauge",
        "The slowest request since the export was opened.",
        per_op("max_us", 1_000_000),
    )
    exports_labels = [(f'{{export="{_label(e.name)}"}}', e) for e in exports]
    family(
        "tapnbd_requests_in_flight",
        "gauge",
        "Requests being served now.",
        [(lab, e.in_flight) for lab, e in exports_labels],
    )
    family(
        "tapnbd_connections",
        "gauge",
        "NBD connections open.",
        [(lab, e.connections) for lab, e in exports_labels],
    )
    family(
        "tapnbd_export_uptime_seconds",
        "gauge",
        "Seconds since the export was opened.",
        [(lab, e.uptime_s) for lab, e in exports_labels],
    )
    return "\n".join(out) + "\n"


class MetricsServer:
    """A minimal HTTP/1.0-style responder for ``GET /metrics``."""

    def __init__(self, render: Callable[[], Awaitable[str]]) -> None:
        self.render = render
        self._server: asyncio.AbstractServer | None = None
        self.address = ""
        self._clients = 0

    async def start(self, host: str, port: int) -> str:
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        sockname = self._server.sockets[0].getsockname()
        shown = f"[{sockname[0]}]" if ":" in sockname[0] else sockname[0]
        self.address = f"{shown}:{sockname[1]}"
        return self.address

    async def start_unix(self, path: str) -> str:
        """Serve on a unix socket at ``path``, mode 0600 (chmod or chown it to let a
        scraper of another user in)."""
        if os.path.lexists(path):
            remove_stale_socket(path)
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path)
        finally:
            os.umask(old)
        self.address = f"unix:{path}"
        return self.address

    async def listen(self, spec: str) -> str:
        """Serve on ``unix:PATH`` or ``HOST:PORT``; an error names ``spec``."""
        try:
            if spec.startswith("unix:"):
                return await self.start_unix(spec[5:])
            host, port = split_host_port(spec, "metrics address")
            return await self.start(host, port)
        except OSError as e:
            raise TapnbdError(f"cannot listen on {spec}: {e.strerror or e}") from None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            writer.transport.abort()  # nothing said: it holds no descriptor of ours
            return
        self._clients += 1
        try:
            async with asyncio.timeout(EXCHANGE_TIMEOUT):
                await self._exchange(reader, writer)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except OSError as e:
            log.debug("metrics client: %s", e)
        finally:
            self._clients -= 1
            writer.transport.abort()  # a no-op once closed; else drops a stalled client

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            status, body, ctype = "405 Method Not Allowed", "GET only\n", "text/plain"
        elif parts[1].split("?", 1)[0] not in ("/metrics", "/"):
            status, body, ctype = "404 Not Found", "try /metrics\n", "text/plain"
        else:
            status, body, ctype = "200 OK", await self.render(), CONTENT_TYPE
        data = body.encode()
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        )
        if parts and parts[0] != "HEAD":
            writer.write(data)
        await writer.drain()
        writer.close()  # the rest is flushed before connection_lost
        await writer.wait_closed()
