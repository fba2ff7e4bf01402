"""NBD URIs as the NBD project's ``doc/uri.md`` spells them, for clients to connect with.

Every part that comes from a name is percent-encoded: an export name may hold ``/``,
``?`` or ``#``, and a socket path spaces, ``&`` or ``%``. libnbd and QEMU unescape the
``socket`` query parameter, so a path in a directory named ``my disks`` still works
(``nbdkit --print-uri`` encodes it the same way).
"""

from __future__ import annotations

from urllib.parse import quote


def unix_uri(export: str, socket: str, tls: bool = False) -> str:
    """``nbd+unix:///EXPORT?socket=PATH`` ("nbds+unix" with TLS)."""
    scheme = "nbds+unix" if tls else "nbd+unix"
    return f"{scheme}:///{quote(export, safe='')}?socket={quote(socket, safe='/')}"


def tcp_uri(export: str, host: str, port: int, tls: bool = False) -> str:
    """``nbd://HOST:PORT/EXPORT`` ("nbds" with TLS); a wildcard address as localhost."""
    if host in ("", "0.0.0.0"):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"{'nbds' if tls else 'nbd'}://{host}:{port}/{quote(export, safe='')}"
