"""Fixed-layout messages, as precompiled ``struct.Struct`` (parsed on every request)."""

from __future__ import annotations

import struct

# S->C greeting: NBDMAGIC, IHAVEOPT, handshake flags (proto.md "Newstyle negotiation").
GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
# C->S option header: IHAVEOPT, option, data length.
OPTION = struct.Struct(">QII")
# S->C option reply header: magic, option, reply type, length.
OPTION_REPLY = struct.Struct(">QIII")
# EXPORT_NAME answer: size, transmission flags (+124 zeros without NO_ZEROES).
EXPORT_NAME_REPLY = struct.Struct(">QH")
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

# Transmission: compact request (28 bytes) and replies.
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
CHUNK_OFFSET = struct.Struct(">IHHQIQ")  # chunk header + u64 offset (OFFSET_DATA)
CHUNK_HOLE = struct.Struct(">IHHQIQI")  # chunk header + offset + hole size
CHUNK_ERROR = struct.Struct(">IHHQIIH")  # chunk header + error + message length
EXTENT = struct.Struct(">II")


def string(text: str, limit: int = 4096) -> bytes:
    """``text`` as an NBD string: UTF-8, cut at a character boundary to ``limit`` bytes.

    "MUST be at most 4096 bytes" (proto.md, Conventions); a cut inside a multi-byte
    character would leave invalid UTF-8.
    """
    raw = text.encode()
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode()
