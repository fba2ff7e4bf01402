"""ctypes bindings to librados.so.2 and librbd.so.1: only the calls the rbd driver makes.

Why ctypes and not Debian's python3-rbd: the Cython binding is built for /usr/bin/python3
only and is not on PyPI, so a project venv on another interpreter cannot import it, and
its ``Image(exclusive=True)`` segfaults. The C ABI of librbd is stable (``rbd/librbd.h``),
and ctypes needs nothing but the shared libraries.

Asynchronous calls complete through an eventfd that the event loop watches (see
``Completions``), so no thread is spent per request and no Python runs on librbd's.
"""

from __future__ import annotations

import asyncio
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

#: rbd_set_image_notification: librbd writes to an eventfd when a completion is ready.
EVENT_TYPE_EVENTFD = 2
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
        # The callback is always NULL (see Completions), so it is typed as a plain pointer.
        (rbd, "rbd_aio_create_completion"): (c_int, [c_void_p, c_void_p, P(c_void_p)]),
        (rbd, "rbd_aio_get_return_value"): (ctypes.c_ssize_t, [c_void_p]),
        (rbd, "rbd_aio_get_arg"): (c_void_p, [c_void_p]),
        (rbd, "rbd_set_image_notification"): (c_int, [c_void_p, c_int, c_int]),
        (rbd, "rbd_poll_io_events"): (c_int, [c_void_p, P(c_void_p), c_int]),
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


class Completions:
    """Asynchronous calls on one image, completed on the event loop's own thread.

    librbd signals completions on an eventfd (``rbd_set_image_notification``) that the
    loop watches; the loop then collects them with ``rbd_poll_io_events``. Python never
    runs on librbd's threads, so a completion does not wait for the GIL (up to the 5 ms
    switch interval while the loop is busy), and no thread wakes the loop per request.
    """

    BATCH = 64

    def __init__(self, image: c_void_p) -> None:
        _, self._rbd = libs()
        self._image = image
        self._loop = asyncio.get_running_loop()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        ret = self._rbd.rbd_set_image_notification(image, self._efd, EVENT_TYPE_EVENTFD)
        if ret < 0:
            os.close(self._efd)
            check(ret, "rbd_set_image_notification")
        # key -> (future, objects kept alive until librbd is done with them)
        self._pending: dict[int, tuple[asyncio.Future[int], object]] = {}
        self._keys = itertools.count(1)
        self._comps = (c_void_p * self.BATCH)()
        self._loop.add_reader(self._efd, self._collect)

    async def call(self, submit: Callable[[c_void_p], int], what: str, keep: object = None) -> int:
        """Run one rbd_aio_* call: ``submit(completion)`` starts it; return its result."""
        fut: asyncio.Future[int] = self._loop.create_future()
        key = next(self._keys)
        completion = c_void_p()
        # No callback: the completion is reported on the eventfd instead.
        check(
            self._rbd.rbd_aio_create_completion(c_void_p(key), None, ctypes.byref(completion)), what
        )
        self._pending[key] = (fut, keep)
        ret = submit(completion)
        if ret < 0:
            self._pending.pop(key, None)
            self._rbd.rbd_aio_release(completion)
            check(ret, what)
        return check(await fut, what)

    def _collect(self) -> None:
        # Reset the counter first: a completion that lands after the poll below
        # signals the eventfd again, so none is left behind.
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        rbd, comps = self._rbd, self._comps
        while True:
            n = rbd.rbd_poll_io_events(self._image, comps, self.BATCH)
            for i in range(max(n, 0)):
                c = comps[i]
                key = rbd.rbd_aio_get_arg(c) or 0
                ret = int(rbd.rbd_aio_get_return_value(c))
                rbd.rbd_aio_release(c)
                entry = self._pending.pop(key, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result(ret)
            if n < self.BATCH:
                return

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self._loop.remove_reader(self._efd)
        os.close(self._efd)
