"""Reusable buffers for big reads and WRITE payloads.

A fresh 1 MiB bytearray costs a memset, page faults and cold caches; on this kind of
machine that made sequential reads a third slower than reading into a warm buffer. A
driver takes its read buffer here, and the NBD connection gives it back once the reply
has left the process (``NBDConnection._send_lent``). WRITE payloads come from here too
and go back when the driver's pwrite returns: drivers keep no reference to ``data``.
Whoever does not give a buffer back just lets it be collected: giving back is an
optimisation, never an obligation.

Only a buffer nobody else can still see may be given back: the connection never leaves
a pooled buffer queued in the transport. The connections' I/O threads take and give
too (tapnbd.server.iothreads), so the pool has a lock.
"""

from __future__ import annotations

import threading
from functools import cache
from typing import Any

from tapnbd.driver import MAX_PAYLOAD

#: Smaller reads are cheap to allocate; pooling them would only cost a dict lookup.
POOL_MIN = 128 * 1024
#: Buffers kept per size; queue depth 8-32 of one request size is the common case.
PER_SIZE = 8
#: Sizes kept at once (a client that varies its request size must not grow the pool);
#: past it, the size given back longest ago goes.
MAX_SIZES = 8
#: Bytes kept in all, whatever the sizes: two 32 MiB buffers, or 64 of 1 MiB.
MAX_BYTES = 64 << 20
#: Pooled buffers start on a page boundary. The kernel copies a page-cache page into a
#: read buffer with ``rep movsb``, and a destination 8 to 40 bytes past a 4 KiB boundary
#: (a fresh big bytearray starts 16 bytes into the pages malloc maps for it) has every
#: load alias the store just before it ("4K aliasing"): that copy ran five times slower
#: on this VM (bench/results/2026-12-04-s32-convert/NOTES.md), and a pooled buffer
#: would keep it slow for ever.
PAGE = 4096

#: Zeros to send from, shared and never written: a read that the driver's extents say
#: is a hole is answered from here instead of from a fresh buffer. ``bytes(n)`` is
#: calloc'd, so its pages are the kernel's shared zero page and cost no memory.
ZEROES = memoryview(bytes(MAX_PAYLOAD))
_ZERO_PROBE = bytes(64)


def all_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` is non-empty and every byte of it is zero: a READ that may go
    out as a hole (tapnbd.server.replies), a WRITE stored as a zeroing
    (formats.filters.discard)."""
    # Cheap rejection on the first bytes (no copy); count() then runs at memchr speed.
    n = len(data)
    if n >= 64 and data[:64] != _ZERO_PROBE:
        return False
    if isinstance(data, memoryview):
        data = data.tobytes()
    return n > 0 and data.count(0) == n


class PooledBuffer(bytearray):
    """A bytearray that came from the pool (its contents are undefined when taken)."""

    __slots__ = ()


_free: dict[int, list[PooledBuffer]] = {}
_held = 0  # bytes in _free
_lock = threading.Lock()


def take(length: int) -> bytearray:
    """A buffer of ``length`` bytes; only a small one is guaranteed to be zeroed."""
    if length < POOL_MIN:
        return bytearray(length)
    global _held
    with _lock:
        free = _free.get(length)
        if free:
            _held -= length
            return free.pop()
    return _aligned(length)


def _aligned(length: int) -> PooledBuffer:
    """A new pooled buffer of ``length`` bytes whose first byte is on a page boundary
    (where the interpreter cannot say, it is simply not aligned)."""
    buf = PooledBuffer(length + PAGE)
    skip = -_address(buf) % PAGE
    # CPython's bytearray moves its start to cut its head, and only its length to cut a
    # small tail: the bytes stay where they were, now aligned.
    del buf[:skip]
    del buf[length:]
    return buf


def _address(buf: bytearray) -> int:
    """Where ``buf``'s bytes are in memory (0 if ctypes cannot say)."""
    ct = _ctypes()
    if ct is None:
        return 0
    view = ct.c_char.from_buffer(buf)
    try:
        return int(ct.addressof(view))
    finally:
        del view  # its export of ``buf`` would forbid the cuts


@cache
def _ctypes() -> Any:
    """ctypes, imported for the first pooled buffer rather than at every start-up."""
    try:
        import ctypes
    except ImportError:
        return None
    return ctypes


def give(buf: object) -> None:
    """Return ``buf`` (or the buffer a memoryview is over) if it came from the pool."""
    if type(buf) is memoryview:
        buf = buf.obj
    global _held
    if type(buf) is not PooledBuffer:
        return
    size = len(buf)
    with _lock:
        # The sizes in order of their last give: a ninth one drops only the size given
        # back longest ago, so a client that tries many sizes costs the common one
        # nothing.
        free = _free.pop(size, None)
        if free is None:
            if len(_free) >= MAX_SIZES:
                stale = next(iter(_free))
                _held -= stale * len(_free.pop(stale))
            free = []
        _free[size] = free
        if len(free) < PER_SIZE and _held + size <= MAX_BYTES:
            free.append(buf)
            _held += size
