"""Statistics in the Prometheus text exposition format (version 0.0.4), and its server.

Served on ``--metrics unix:PATH`` (a 0600 socket: ``curl --unix-socket PATH
http://x/metrics``) or on ``--metrics HOST:PORT`` on loopback, never by default, at
``/metrics`` by a few lines of asyncio: one
request per connection, GET only, no keep-alive, which is all a scraper needs.
Counters carry ``_total``; latency percentiles are gauges in seconds, as the histogram
behind them (tapnbd.stats) keeps no sum for a Prometheus summary.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Awaitable, Callable

from tapnbd.control.messages import ExportStats
from tapnbd.server.listener import remove_stale_socket

log = logging.getLogger("tapnbd.control")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Operations whose latency is exported (the rest are rare).
LATENCY_OPS = ("read", "write", "flush")


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

    def per_op(
        attr: str, scale: float = 1, ops: tuple[str, ...] | None = None
    ) -> list[tuple[str, float]]:
        rows: list[tuple[str, float]] = []
        for e in exports:
            for op, c in e.ops.items():
                if ops is None or op in ops:
                    value = getattr(c, attr)
                    rows.append(
                        (
                            f'{{export="{_label(e.name)}",op="{op}"}}',
                            value * scale if scale != 1 else value,
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
    for q in ("p50", "p99", "max"):
        family(
            f"tapnbd_request_latency_{q}_seconds",
            "gauge",
            f"Request latency, {q} since the export was opened (power-of-two buckets).",
            per_op(f"{q}_us", 1e-6, LATENCY_OPS),
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

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
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
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except OSError as e:
            log.debug("metrics client: %s", e)
        finally:
            writer.close()
