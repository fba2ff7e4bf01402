"""A deliberately small, independent NBD client over a raw socket, for hostile tests.

It does not use tapnbd's codec, so codec bugs cannot cancel out in the tests.
"""

from __future__ import annotations

import socket
import struct
import time

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_SR = 1, 2, 3, 5, 6, 7, 8
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
ERR_UNSUP, ERR_POLICY, ERR_INVALID = (1 << 31) + 1, (1 << 31) + 2, (1 << 31) + 3
ERR_TLS_REQD, ERR_UNKNOWN = (1 << 31) + 5, (1 << 31) + 6
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3


def connect(host: str, port: int, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def closed_by_peer(sock: socket.socket, within: float = 5) -> bool:
    """True when the server closes the connection within ``within`` seconds."""
    sock.settimeout(within)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def greet(sock: socket.socket, client_flags: int = 3) -> int:
    magic, opt, flags = struct.unpack(">8s8sH", recv_exact(sock, 18))
    assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
    sock.sendall(struct.pack(">I", client_flags))
    return int(flags)


def send_option(sock: socket.socket, opt: int, data: bytes = b"") -> None:
    sock.sendall(IHAVEOPT + struct.pack(">II", opt, len(data)) + data)


def read_reply(sock: socket.socket) -> tuple[int, int, bytes]:
    magic, opt, rep, length = struct.unpack(">QIII", recv_exact(sock, 20))
    assert magic == REPLY_MAGIC
    return opt, rep, recv_exact(sock, length)


def go(sock: socket.socket, name: str = "", structured: bool = False) -> tuple[int, int]:
    """Negotiate with GO; returns (size, transmission flags)."""
    if structured:
        send_option(sock, OPT_SR)
        assert read_reply(sock)[1] == REP_ACK
    raw = name.encode()
    send_option(sock, OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
    size = flags = -1
    while True:
        _, rep, data = read_reply(sock)
        if rep == REP_ACK:
            return size, flags
        if rep == REP_INFO and struct.unpack(">H", data[:2])[0] == 0:
            _, size, flags = struct.unpack(">HQH", data)
        elif rep != REP_INFO:
            raise AssertionError(f"GO failed: {rep:#x} {data!r}")


def request(
    sock: socket.socket,
    cmd: int,
    offset: int,
    length: int,
    cookie: int = 1,
    flags: int = 0,
    payload: bytes = b"",
) -> None:
    sock.sendall(
        struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload
    )


def simple_reply(sock: socket.socket, data_len: int = 0) -> tuple[int, int, bytes]:
    """(error, cookie, data); data only follows a successful READ."""
    magic, error, cookie = struct.unpack(">IIQ", recv_exact(sock, 16))
    assert magic == SIMPLE_MAGIC, hex(magic)
    return error, cookie, recv_exact(sock, data_len) if error == 0 and data_len else b""
