"""ctypes bindings to librados.so.2 and librbd.so.1: only the calls the rbd driver makes.

Why ctypes and not Debian's python3-rbd: the Cython binding is built for /usr/bin/python3
only and is not on PyPI, so a project venv on another interpreter cannot import it, and
its ``Image(exclusive=True)`` segfaults. The C ABI of librbd is stable (``rbd/librbd.h``),
and ctypes needs nothing but the shared libraries.

Asynchronous calls complete on a librbd thread. Each completion carries an integer key;
the one C callback below looks the key up and hands the result to the waiting event loop
with ``call_soon_threadsafe``, so no thread is spent per request.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import errno
import itertools
import os
import threading
from collections.abc import Callable
from typing import Any

c_void_p = ctypes.c_void_p
c_char_p = ctypes.c_char_p
c_uint64 = ctypes.c_uint64
c_int = ctypes.c_int
c_size_t = ctypes.c_size_t

RBD_LOCK_MODE_EXCLUSIVE = 0
#: rbd_aio_write_zeroes: zero_flags and op_flags (none).
_NO_FLAGS = 0

#: void (*rbd_callback_t)(rbd_completion_t cb, void *arg)
_CALLBACK = ctypes.CFUNCTYPE(None, c_void_p, c_void_p)
#: int (*cb)(uint64_t offset, size_t length, int exists, void *arg) for diff_iterate2.
DIFF_CALLBACK = ctypes.CFUNCTYPE(c_int, c_uint64, c_size_t, c_int, c_void_p)


class SnapInfo(ctypes.Structure):
    _fields_ = [("id", c_uint64), ("size", c_uint64), ("name", c_char_p)]


class ImageInfo(ctypes.Structure):
    _fields_ = [
        ("size", c_uint64),
        ("obj_size", c_uint64),
        ("num_objs", c_uint64),
        ("order", c_int),
        ("block_name_prefix", ctypes.c_char * 24),
        ("parent_pool", ctypes.c_int64),
        ("parent_name", ctypes.c_char * 96),
    ]


def _load(name: str) -> ctypes.CDLL:
    path = ctypes.util.find_library(name) or f"lib{name}.so"
    try:
        return ctypes.CDLL(path, use_errno=True)
    except OSError as e:
        raise OSError(
            errno.ENOENT, f"lib{name} is not installed (Debian: apt-get install lib{name}1)"
        ) from e


_libs: tuple[ctypes.CDLL, ctypes.CDLL] | None = None
_libs_lock = threading.Lock()


def libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """(librados, librbd), loaded and typed on first use."""
    global _libs
    with _libs_lock:
        if _libs is None:
            rados, rbd = _load("rados"), _load("rbd")
            _declare(rados, rbd)
            _libs = (rados, rbd)
        return _libs


def _declare(rados: ctypes.CDLL, rbd: ctypes.CDLL) -> None:
    P = ctypes.POINTER
    sigs: dict[tuple[ctypes.CDLL, str], tuple[Any, list[Any]]] = {
        (rados, "rados_create"): (c_int, [P(c_void_p), c_char_p]),
        (rados, "rados_conf_read_file"): (c_int, [c_void_p, c_char_p]),
        (rados, "rados_conf_parse_env"): (c_int, [c_void_p, c_char_p]),
        (rados, "rados_conf_set"): (c_int, [c_void_p, c_char_p, c_char_p]),
        (rados, "rados_connect"): (c_int, [c_void_p]),
        (rados, "rados_shutdown"): (None, [c_void_p]),
        (rados, "rados_ioctx_create"): (c_int, [c_void_p, c_char_p, P(c_void_p)]),
        (rados, "rados_ioctx_destroy"): (None, [c_void_p]),
        (rbd, "rbd_open"): (c_int, [c_void_p, c_char_p, P(c_void_p), c_char_p]),
        (rbd, "rbd_open_read_only"): (c_int, [c_void_p, c_char_p, P(c_void_p), c_char_p]),
        (rbd, "rbd_close"): (c_int, [c_void_p]),
        (rbd, "rbd_get_size"): (c_int, [c_void_p, P(c_uint64)]),
        (rbd, "rbd_get_features"): (c_int, [c_void_p, P(c_uint64)]),
        (rbd, "rbd_stat"): (c_int, [c_void_p, P(ImageInfo), c_size_t]),
        (rbd, "rbd_create2"): (c_int, [c_void_p, c_char_p, c_uint64, c_uint64, P(c_int)]),
        (rbd, "rbd_remove"): (c_int, [c_void_p, c_char_p]),
        (rbd, "rbd_snap_list"): (c_int, [c_void_p, P(SnapInfo), P(c_int)]),
        (rbd, "rbd_snap_list_end"): (None, [P(SnapInfo)]),
        (rbd, "rbd_snap_create"): (c_int, [c_void_p, c_char_p]),
        (rbd, "rbd_lock_acquire"): (c_int, [c_void_p, c_int]),
        (rbd, "rbd_lock_release"): (c_int, [c_void_p]),
        (rbd, "rbd_is_exclusive_lock_owner"): (c_int, [c_void_p, P(c_int)]),
        (rbd, "rbd_lock_get_owners"): (
            c_int,
            [c_void_p, P(c_int), P(c_char_p), P(c_size_t)],
        ),
        (rbd, "rbd_lock_get_owners_cleanup"): (None, [P(c_char_p), c_size_t]),
        (rbd, "rbd_diff_iterate2"): (
            c_int,
            [
                c_void_p,
                c_char_p,
                c_uint64,
                c_uint64,
                ctypes.c_uint8,
                ctypes.c_uint8,
                DIFF_CALLBACK,
                c_void_p,
            ],
        ),
        (rbd, "rbd_aio_create_completion"): (c_int, [c_void_p, _CALLBACK, P(c_void_p)]),
        (rbd, "rbd_aio_get_return_value"): (ctypes.c_ssize_t, [c_void_p]),
        (rbd, "rbd_aio_release"): (None, [c_void_p]),
        (rbd, "rbd_aio_read"): (c_int, [c_void_p, c_uint64, c_size_t, c_void_p, c_void_p]),
        (rbd, "rbd_aio_write"): (c_int, [c_void_p, c_uint64, c_size_t, c_void_p, c_void_p]),
        (rbd, "rbd_aio_flush"): (c_int, [c_void_p, c_void_p]),
        (rbd, "rbd_aio_discard"): (c_int, [c_void_p, c_uint64, c_uint64, c_void_p]),
        (rbd, "rbd_aio_write_zeroes"): (
            c_int,
            [c_void_p, c_uint64, c_size_t, c_void_p, c_int, c_int],
        ),
    }
    for (lib, name), (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


def check(ret: int, what: str) -> int:
    """Raise OSError for a negative librados/librbd return (they return -errno)."""
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


# Completions in flight: key -> (loop, future, objects kept alive until completion).
_pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[int], object]] = {}
_keys = itertools.count(1)
# Results handed over by librbd's thread, and the loops that have a drain scheduled:
# a burst of completions costs the loop one wake-up, not one each.
_done: collections.deque[tuple[asyncio.Future[int], int]] = collections.deque()
_draining: set[asyncio.AbstractEventLoop] = set()


def _drain(loop: asyncio.AbstractEventLoop) -> None:
    # Clear the flag before taking results, so a completion that arrives meanwhile
    # either is taken here or schedules a drain of its own (never lost).
    _draining.discard(loop)
    keep: list[tuple[asyncio.Future[int], int]] = []
    while _done:
        fut, ret = _done.popleft()
        if fut.get_loop() is not loop:
            keep.append((fut, ret))  # another loop's (tests run several): put back
        elif not fut.done():
            fut.set_result(ret)
    _done.extend(keep)


@_CALLBACK  # type: ignore[untyped-decorator]
def _on_complete(completion: int, arg: int) -> None:
    # On a librbd thread: read the result, free the completion, wake the loop.
    _, rbd = libs()
    ret = int(rbd.rbd_aio_get_return_value(completion))
    rbd.rbd_aio_release(completion)
    entry = _pending.pop(arg, None)
    if entry is None:
        return
    loop, fut, _keep = entry
    _done.append((fut, ret))
    if loop not in _draining:
        _draining.add(loop)
        try:
            loop.call_soon_threadsafe(_drain, loop)
        except RuntimeError:  # the loop closed while librbd worked
            _draining.discard(loop)


async def aio(submit: Callable[[c_void_p], int], what: str, keep: object = None) -> int:
    """Run one rbd_aio_* call: ``submit(completion)`` starts it; return its result."""
    _, rbd = libs()
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    key = next(_keys)
    completion = c_void_p()
    check(
        rbd.rbd_aio_create_completion(c_void_p(key), _on_complete, ctypes.byref(completion)), what
    )
    _pending[key] = (loop, fut, keep)
    ret = submit(completion)
    if ret < 0:
        _pending.pop(key, None)
        rbd.rbd_aio_release(completion)
        check(ret, what)
    return check(await fut, what)
