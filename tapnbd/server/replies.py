"""READ replies as lists of pieces, built the same way on the loop and in I/O threads.

Pure functions of the request and its data: no I/O, no connection state, so an I/O
thread (tapnbd.server.iothreads) builds exactly the reply the loop would have.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tapnbd import buffers
from tapnbd.buffers import all_zero
from tapnbd.protocol.consts import CmdFlag
from tapnbd.protocol.transmission import data_chunk, hole_chunk, none_chunk, simple_reply

if TYPE_CHECKING:
    from tapnbd.protocol.transmission import Request

#: Structured reads above this are split at this granularity into DATA and HOLE chunks.
SPLIT_READ = 64 * 1024

#: One reply chunk: its header, and the data that follows it if any.
Part = tuple[bytes, bytes | bytearray | memoryview | None]


def read_parts(req: Request, data: bytes | bytearray | memoryview, structured: bool) -> list[Part]:
    """The reply to a READ that returned ``data``."""
    if not structured:
        return [(simple_reply(req.cookie), data)]
    if not data:
        # A zero-length read: OFFSET_DATA needs at least one byte, so just finish.
        return [(none_chunk(req.cookie), None)]
    if len(data) > SPLIT_READ and not req.flags & CmdFlag.DF:
        return split_read(req, memoryview(data))
    if all_zero(data):
        # A run of zeros goes out as a hole: 32 bytes instead of the data.
        return [(hole_chunk(req.cookie, req.offset, len(data)), None)]
    # One chunk, unfragmented, so DF is honoured.
    return [(data_chunk(req.cookie, req.offset, len(data)), data)]


def zero_parts(req: Request, structured: bool) -> list[Part]:
    """The reply to a READ of a hole: one OFFSET_HOLE chunk, or the shared zeros."""
    if structured:
        # One chunk covers the whole read, so DF ("MUST NOT fragment") is honoured.
        return [(hole_chunk(req.cookie, req.offset, req.length), None)]
    return [(simple_reply(req.cookie), buffers.ZEROES[: req.length])]


def split_read(req: Request, view: memoryview) -> list[Part]:
    """A large read as DATA and HOLE chunks, a hole for each zero piece."""
    runs: list[tuple[bool, int, int]] = []  # (is_hole, start, end) within the read
    for start in range(0, len(view), SPLIT_READ):
        end = min(start + SPLIT_READ, len(view))
        hole = all_zero(view[start:end])
        if runs and runs[-1][0] == hole:
            runs[-1] = (hole, runs[-1][1], end)
        else:
            runs.append((hole, start, end))
    last = len(runs) - 1
    parts: list[Part] = []
    for i, (hole, start, end) in enumerate(runs):
        offset = req.offset + start
        if hole:
            parts.append((hole_chunk(req.cookie, offset, end - start, done=i == last), None))
        else:
            header = data_chunk(req.cookie, offset, end - start, done=i == last)
            parts.append((header, view[start:end]))
    return parts


def flatten(parts: list[Part]) -> list[bytes | bytearray | memoryview]:
    """The parts flattened, for one writev."""
    return [p for part in parts for p in part if p is not None]
