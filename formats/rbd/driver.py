"""rbd: a Ceph RBD image, through librbd's asynchronous calls (qemu's block/rbd.c shape).

Every data call is an ``rbd_aio_*`` whose completion reaches the event loop through an
eventfd (see ``librbd.Completions``); only opening, closing and block status, which librbd offers only as
blocking calls, run on a worker thread. FUA is a write followed by a flush (librbd has
no per-write FUA). Block status comes from ``rbd_diff_iterate2``, asked for at most
``EXTENTS_WINDOW`` bytes per call and cached until a write touches the range: an
unbounded walk per request made qemu's backups quadratic.

Failure: librados is given ``rados_osd_op_timeout`` (default 30 s, ``:rados_osd_op_timeout=N``
in the name), so a dead OSD turns a request into ETIMEDOUT, which the Backend reports
as EIO; the export keeps working once the OSD is back.

Hand-over (``exclusive``): the driver takes RBD's exclusive lock with
``rbd_lock_acquire`` at open, waiting up to ``lock_wait`` seconds for the old owner to
release it, and ``release()`` flushes and gives it up. Once another host holds the lock,
librbd fails our writes with EROFS, which the Backend sends as EPERM.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import time
from dataclasses import dataclass

from formats.rbd import librbd
from formats.rbd.spec import RbdSpec, parse
from tapnbd.driver import BlockSize, Driver, Extent, ExtentFlags, FuaMode
from tapnbd.errors import ImageError

#: Largest range one rbd_diff_iterate2 call walks for block status.
EXTENTS_WINDOW = 1 << 30
#: librbd feature bits (rbd/features.h) shown by ``info``.
FEATURES = {
    1 << 0: "layering",
    1 << 1: "striping",
    1 << 2: "exclusive-lock",
    1 << 3: "object-map",
    1 << 4: "fast-diff",
    1 << 5: "deep-flatten",
    1 << 6: "journaling",
    1 << 7: "data-pool",
}
#: rbd create's defaults without journaling or data-pool (RBD_FEATURES_DEFAULT).
DEFAULT_FEATURES = 0x3D


@dataclass
class Cluster:
    """A connected librados handle and an I/O context on one pool."""

    cluster: ctypes.c_void_p
    ioctx: ctypes.c_void_p

    @classmethod
    def connect(cls, spec: RbdSpec) -> Cluster:
        """Blocking: read the configuration, connect, open the pool (call off the loop)."""
        rados, _ = librbd.libs()
        cluster = ctypes.c_void_p()
        user = spec.user.encode() if spec.user else None
        librbd.check(rados.rados_create(ctypes.byref(cluster), user), "rados_create")
        try:
            conf = spec.conf.encode() if spec.conf else None
            ret = rados.rados_conf_read_file(cluster, conf)
            if ret < 0 and spec.conf:
                librbd.check(ret, f"reading {spec.conf}")
            rados.rados_conf_parse_env(cluster, None)  # honours CEPH_ARGS
            for key, value in spec.rados_options().items():
                librbd.check(
                    rados.rados_conf_set(cluster, key.encode(), value.encode()),
                    f"{spec}: option {key}",
                )
            librbd.check(rados.rados_connect(cluster), "cannot reach the Ceph cluster")
        except BaseException:
            rados.rados_shutdown(cluster)
            raise
        ioctx = ctypes.c_void_p()
        ret = rados.rados_ioctx_create(cluster, spec.pool.encode(), ctypes.byref(ioctx))
        if ret < 0:
            rados.rados_shutdown(cluster)
            librbd.check(ret, f"pool {spec.pool!r}")
        return cls(cluster, ioctx)

    def close(self) -> None:
        rados, _ = librbd.libs()
        rados.rados_ioctx_destroy(self.ioctx)
        rados.rados_shutdown(self.cluster)


def _open_blocking(spec: RbdSpec, read_only: bool) -> tuple[Cluster, ctypes.c_void_p]:
    _, rbd = librbd.libs()
    cluster = Cluster.connect(spec)
    image = ctypes.c_void_p()
    snap = spec.snap.encode() if spec.snap else None
    opener = rbd.rbd_open_read_only if read_only else rbd.rbd_open
    ret = opener(cluster.ioctx, spec.image.encode(), ctypes.byref(image), snap)
    if ret < 0:
        cluster.close()
        what = f"snapshot {spec.snap!r} of " if spec.snap and ret == -errno.ENOENT else ""
        raise ImageError(f"{spec}: {what}image: {os.strerror(-ret)}")
    return cluster, image


class RbdDriver(Driver):
    """One open RBD image (or a read-only snapshot of it)."""

    name = "rbd"

    def __init__(
        self, spec: RbdSpec, cluster: Cluster, image: ctypes.c_void_p, read_only: bool
    ) -> None:
        _, self._rbd = librbd.libs()
        self.spec = spec
        self._cluster = cluster
        self._image = image
        self._read_only = read_only or spec.snap is not None
        size = ctypes.c_uint64()
        librbd.check(self._rbd.rbd_get_size(image, ctypes.byref(size)), "rbd_get_size")
        self._size = size.value
        info = librbd.ImageInfo()
        librbd.check(self._rbd.rbd_stat(image, ctypes.byref(info), ctypes.sizeof(info)), "rbd_stat")
        self.object_size = info.obj_size
        # Block status cache: (start, end, extents) of the last diff walk.
        self._extents_cache: tuple[int, int, list[Extent]] | None = None
        self._closed = False
        self._aio = librbd.Completions(image)

    @classmethod
    async def open(
        cls, name: str, read_only: bool, *, exclusive: bool = False, lock_wait: float = 0.0
    ) -> RbdDriver:
        spec = parse(name)
        cluster, image = await asyncio.to_thread(_open_blocking, spec, read_only)
        drv = cls(spec, cluster, image, read_only)
        if exclusive and not drv._read_only:
            try:
                await drv.acquire(lock_wait)
            except BaseException:
                await drv.close()
                raise
        return drv

    # --- data path -------------------------------------------------------------------

    def size(self) -> int:
        return self._size

    async def pread(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        cbuf = (ctypes.c_char * length).from_buffer(buf)
        n = await self._aio.call(
            lambda c: self._rbd.rbd_aio_read(self._image, offset, length, cbuf, c),
            "rbd read",
            keep=(buf, cbuf),
        )
        if n != length:  # librbd reads holes as zeros; a short read is an error
            raise OSError(errno.EIO, f"rbd read returned {n} of {length} bytes")
        return buf

    async def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        view = memoryview(data)
        # data is lent until we return; librbd copies it into its own bufferlist on submit.
        src: object = view if not view.readonly else bytearray(view)
        cbuf = (ctypes.c_char * len(view)).from_buffer(src)  # type: ignore[arg-type]
        self._invalidate(offset, len(view))
        await self._aio.call(
            lambda c: self._rbd.rbd_aio_write(self._image, offset, len(view), cbuf, c),
            "rbd write",
            keep=(src, cbuf),
        )
        if fua:
            await self.flush()

    async def flush(self) -> None:
        await self._aio.call(lambda c: self._rbd.rbd_aio_flush(self._image, c), "rbd flush")

    def can_fua(self) -> FuaMode:
        return FuaMode.NATIVE

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._invalidate(offset, length)
        await self._aio.call(
            lambda c: self._rbd.rbd_aio_discard(self._image, offset, length, c), "rbd discard"
        )
        if fua:
            await self.flush()

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        # write_zeroes deallocates whole objects and zeroes partial ones: always cheap.
        self._invalidate(offset, length)
        await self._aio.call(
            lambda c: self._rbd.rbd_aio_write_zeroes(self._image, offset, length, c, 0, 0),
            "rbd write_zeroes",
        )
        if fua:
            await self.flush()

    def can_write(self) -> bool:
        return not self._read_only

    def can_trim(self) -> bool:
        return not self._read_only

    def can_fast_zero(self) -> bool:
        return not self._read_only

    async def extents(self, offset: int, length: int) -> list[Extent]:
        cached = self._extents_cache
        if cached is not None and cached[0] <= offset < cached[1]:
            return [e for e in cached[2] if e.offset + e.length > offset]
        end = min(self._size, offset + max(length, 1), offset + EXTENTS_WINDOW)
        found = await asyncio.to_thread(self._diff, offset, end)
        extents: list[Extent] = []
        pos = offset
        for start, n in found:
            start, stop = max(start, offset), min(start + n, end)
            if stop <= start:
                continue
            if start > pos:
                extents.append(Extent(pos, start - pos, ExtentFlags.HOLE | ExtentFlags.ZERO))
            extents.append(Extent(start, stop - start))
            pos = stop
        if pos < end:
            extents.append(Extent(pos, end - pos, ExtentFlags.HOLE | ExtentFlags.ZERO))
        self._extents_cache = (offset, end, extents)
        return extents

    def _diff(self, start: int, end: int) -> list[tuple[int, int]]:
        """Blocking: the allocated runs in [start, end), merged, in order."""
        runs: list[tuple[int, int]] = []

        def cb(off: int, n: int, exists: int, _arg: object) -> int:
            if exists:
                if runs and runs[-1][0] + runs[-1][1] == off:
                    runs[-1] = (runs[-1][0], runs[-1][1] + n)
                else:
                    runs.append((off, n))
            return 0

        callback = librbd.DIFF_CALLBACK(cb)
        librbd.check(
            self._rbd.rbd_diff_iterate2(
                self._image, None, start, end - start, 1, 0, callback, None
            ),
            "rbd diff_iterate2",
        )
        runs.sort()
        return runs

    def _invalidate(self, offset: int, length: int) -> None:
        cached = self._extents_cache
        if cached is not None and offset < cached[1] and offset + length > cached[0]:
            self._extents_cache = None

    def block_size(self) -> BlockSize:
        return BlockSize(1, 4096, 32 << 20)

    # --- hand-over ---------------------------------------------------------------------

    async def acquire(self, wait: float = 0.0) -> None:
        """Take the exclusive lock, retrying for ``wait`` seconds while another host has it."""
        deadline = time.monotonic() + wait
        delay = 0.05
        while True:
            ret = await asyncio.to_thread(
                self._rbd.rbd_lock_acquire, self._image, librbd.RBD_LOCK_MODE_EXCLUSIVE
            )
            if ret == 0:
                return
            if ret not in (-errno.EROFS, -errno.EBUSY) or time.monotonic() >= deadline:
                owner = ", ".join(await asyncio.to_thread(self.lock_owners)) or "another client"
                raise ImageError(
                    f"{self.spec}: exclusive lock held by {owner} ({os.strerror(-ret)})"
                )
            await asyncio.sleep(delay)  # poll: librbd has no lock-released notification
            delay = min(delay * 2, 1.0)

    async def release(self) -> None:
        """Flush, then give the exclusive lock up so that another host can take it."""
        await self.flush()
        librbd.check(
            await asyncio.to_thread(self._rbd.rbd_lock_release, self._image), "rbd_lock_release"
        )

    def is_lock_owner(self) -> bool:
        owner = ctypes.c_int()
        librbd.check(
            self._rbd.rbd_is_exclusive_lock_owner(self._image, ctypes.byref(owner)),
            "rbd_is_exclusive_lock_owner",
        )
        return bool(owner.value)

    def lock_owners(self) -> list[str]:
        mode = ctypes.c_int()
        owners = (ctypes.c_char_p * 8)()
        count = ctypes.c_size_t(8)
        ret = self._rbd.rbd_lock_get_owners(
            self._image, ctypes.byref(mode), owners, ctypes.byref(count)
        )
        if ret < 0:  # -ENOENT: nobody holds it
            return []
        names = [(owners[i] or b"").decode() for i in range(count.value)]
        self._rbd.rbd_lock_get_owners_cleanup(owners, count)
        return names

    # --- facts ---------------------------------------------------------------------------

    def features(self) -> list[str]:
        bits = ctypes.c_uint64()
        librbd.check(
            self._rbd.rbd_get_features(self._image, ctypes.byref(bits)), "rbd_get_features"
        )
        return [name for bit, name in FEATURES.items() if bits.value & bit]

    def snapshots(self) -> list[dict[str, object]]:
        count = ctypes.c_int(16)
        while True:
            snaps = (librbd.SnapInfo * count.value)()
            ret = self._rbd.rbd_snap_list(self._image, snaps, ctypes.byref(count))
            if ret != -errno.ERANGE:
                break
        librbd.check(ret, "rbd_snap_list")
        out = [
            {
                "id": snaps[i].id,
                "name": (snaps[i].name or b"").decode(),
                "vm-state-size": 0,
                "size": snaps[i].size,
            }
            for i in range(ret)
        ]
        if ret:
            self._rbd.rbd_snap_list_end(snaps)
        return out

    def describe(self) -> dict[str, object]:
        facts = super().describe()
        facts.update(
            {
                "filename": str(self.spec),
                "object-size": self.object_size,
                "features": self.features(),
                "snapshots": self.snapshots(),
                "lock-owners": self.lock_owners(),
            }
        )
        return facts

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._close_blocking)  # rbd_close waits for in-flight I/O
        self._aio.close()

    def _close_blocking(self) -> None:
        self._rbd.rbd_close(self._image)
        self._cluster.close()


async def open_rbd(name: str, read_only: bool) -> Driver:
    return await RbdDriver.open(name, read_only)


def create_blocking(name: str, size: int, features: int = DEFAULT_FEATURES) -> None:
    """``tapnbd create rbd:POOL/IMAGE --size N`` (call off the loop)."""
    spec = parse(name)
    if spec.snap:
        raise ImageError(f"{name}: cannot create a snapshot name; drop @{spec.snap}")
    _, rbd = librbd.libs()
    cluster = Cluster.connect(spec)
    try:
        order = ctypes.c_int(0)
        ret = rbd.rbd_create2(
            cluster.ioctx, spec.image.encode(), size, features, ctypes.byref(order)
        )
        if ret == -errno.EEXIST:
            raise ImageError(f"{spec}: image already exists")
        librbd.check(ret, f"{spec}: create")
    finally:
        cluster.close()
