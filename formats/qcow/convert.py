"""``tapnbd convert``: copy an image into a new raw or qcow image (img2qcow, qcow2raw).

Unlike blktap's tools it reads the source's block status and skips what is unallocated
or known to be zero, and it skips blocks that read as zeros, so the copy stays sparse.
Memory stays constant: at most ``DEPTH`` chunks of ``CHUNK`` bytes are in flight.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from formats.filters.cachemode import check_cache_mode, files_for, open_for_cache
from formats.locks import locked_target
from formats.pacing import Pace
from formats.raw import RawDriver, create_raw
from tapnbd import buffers
from tapnbd.backend import Backend
from tapnbd.driver import Driver, Extent, ExtentFlags
from tapnbd.errors import ImageError, RequestError

if TYPE_CHECKING:
    from formats import OpenRules
    from formats.qcow2.create import Qcow2Options

#: Bytes read per request.
CHUNK = 2 << 20
#: Requests in flight (qemu-img convert -m: 1 to MAX_DEPTH).
DEPTH = 4
MAX_DEPTH = 16
#: Zero detection granularity: blocks of zeros this big are not written (-S: a
#: multiple of 512 up to MAX_SPARSE, or 0 for no holes at all).
ZERO_BLOCK = 64 << 10
MAX_SPARSE = 16 << 20
#: --salvage reads a failed chunk again in pieces this big, then a failed piece by sector.
SALVAGE_PIECE = 64 << 10
#: Block status is asked for this much at a time.
STATUS_WINDOW = 1 << 30

OUTPUT_FORMATS = ("raw", "qcow", "qcow2", "vhd", "rbd", "nbd")


@dataclass(frozen=True)
class CopyTuning:
    """qemu-img convert's tuning: ``sparse_size`` (-S), blocks of zeros this big become
    holes, 0 writes every byte (a fully allocated image); ``depth`` (-m), requests in
    flight; ``salvage`` (--salvage), a reader that cannot read a sector goes on, the
    sector written as zeros, and each such range is told to this callback;
    ``offload`` (-C), data runs are copied by the kernel (copy_file_range(2)) when
    source and target are both plain files, else, or once the kernel refuses, the
    usual way (as qemu-img falls back); ``cache`` and ``src_cache`` (-t and -T), the
    target's and the source's cache modes (formats.filters.cachemode: ``none`` reads or
    writes them past the page cache; ``unsafe`` drops the target's final flush);
    ``out_of_order`` (-W), the ``depth`` requests write as their reads finish. Without
    it, as qemu-img without -W, reads still overlap but each chunk's writes wait for the
    chunk before it, so a new image's clusters are laid out in the guest's order."""

    sparse_size: int = ZERO_BLOCK
    depth: int = DEPTH
    salvage: Callable[[str], None] | None = None
    offload: bool = False
    cache: str = "writeback"
    src_cache: str = "writeback"
    out_of_order: bool = False

    def check(self) -> None:
        check_cache_mode(self.cache)
        check_cache_mode(self.src_cache)
        if self.sparse_size < 0 or self.sparse_size % 512 or self.sparse_size > MAX_SPARSE:
            raise ImageError(
                f"-S {self.sparse_size}: the sparse size must be a multiple of 512 up to "
                f"{MAX_SPARSE} (or 0: no holes)"
            )
        if not 1 <= self.depth <= MAX_DEPTH:
            raise ImageError(
                f"-m {self.depth}: the number of requests in flight is 1 to {MAX_DEPTH}"
            )


@dataclass
class ConvertStats:
    """What a conversion did."""

    size: int = 0
    written: int = 0
    skipped: int = 0
    offloaded: int = 0  # of ``written``, copied by copy_file_range (-C)


async def convert_image(
    src: str | list[str],
    dst: str,
    out_fmt: str,
    *,
    src_fmt: str = "auto",
    optimise: bool = True,
    cluster_size: int | None = None,
    pace: Pace | None = None,
    rules: OpenRules | None = None,
    compress: bool = False,
    qcow2: Qcow2Options | None = None,
    window: tuple[int, int | None] | None = None,
    snapshot: str | None = None,
    backing: str | None = None,
    backing_format: str | None = None,
    create: bool = True,
    target_is_zero: bool = False,
    tuning: CopyTuning = CopyTuning(),
) -> ConvertStats:
    """Copy ``src`` (any supported format) to a new ``out_fmt`` image at ``dst``; a list
    of several is copied back to back, as qemu-img convert copies several sources.

    ``pace`` (-p and -r, formats.pacing) begins with the source's size once it is
    open, admits each read of the source and advances by each range dealt with.
    ``rules`` are for opening the source's chain; ``rules.share`` also skips the
    destination's lock. ``qcow2``: a qcow2 destination's creation options (qemu-img's
    -o). ``window``: (offset, length)
    of the source to copy instead of all of it (``tapnbd dd``), cut at the source's end
    as qemu-img dd cuts it; a length of None runs to the end. ``snapshot``: copy that
    internal qcow2 snapshot instead of the current state (qemu-img convert -l).
    ``backing``: the new image is a qcow2 or qcow overlay on that file (stored as given,
    relative to the new image), holding only what reads differently from it
    (qemu-img convert -B). ``create=False`` (qemu-img convert -n): ``dst`` exists, in
    ``out_fmt`` (``auto``: probed), at least as big as the source, and is written over,
    its zero runs included, unless ``target_is_zero`` (qemu-img's --target-is-zero: it
    reads as zeros already). ``tuning``: -S, -m, --salvage and -C (``CopyTuning``).
    """
    from formats import OpenRules, is_nbd, open_image

    tuning.check()
    pace = pace or Pace()
    if target_is_zero and create:
        raise ImageError("--target-is-zero is for -n, an existing image that reads as zeros")
    srcs = [src] if isinstance(src, str) else src
    rules = rules or OpenRules()
    if dst.startswith("rbd:"):
        out_fmt = "rbd"  # the name says where it goes
    elif is_nbd(dst):
        out_fmt = "nbd"  # an existing export: written over, as qemu-img convert -n
    if out_fmt == "vpc":
        out_fmt = "vhd"  # qemu's name for it
    if out_fmt not in OUTPUT_FORMATS and not (out_fmt == "auto" and not create):
        raise ImageError(f"unknown output format {out_fmt!r}: use raw, qcow, qcow2 or vhd")
    if not create and backing is not None:
        raise ImageError("-n writes into an existing image, which keeps its backing file (-B)")
    if compress and out_fmt != "qcow2":
        raise ImageError("compressed output (-c) is for qcow2 only")
    if backing is not None and out_fmt not in ("qcow2", "qcow"):
        raise ImageError(f"a {out_fmt} image has no backing file (-B is for qcow2 and qcow)")
    if len(srcs) > 1 and (snapshot is not None or window is not None):
        raise ImageError("several sources are copied whole: no -l, skip or count")
    with files_for(tuning.src_cache):
        if len(srcs) > 1:
            driver = await _open_all(srcs, src_fmt, rules)
        else:
            driver = await open_image(
                srcs[0], fmt=src_fmt, read_only=True, rules=rules, snapshot=snapshot
            )
    if window is not None:
        from formats.filters.window import WindowFilter

        offset, length = window
        rest = driver.size() - offset
        if rest <= 0 or length == 0:
            await driver.close()
            why = "the range is empty" if length == 0 else f"it starts at byte {offset}"
            raise ImageError(
                f"{src}: nothing to copy: {why}, and the image is {rest + offset} bytes"
            )
        driver = WindowFilter(driver, offset, rest if length is None else min(length, rest))
    source = Backend(driver, read_only=True)
    try:
        # Creating the destination truncates it: it must not be a file being read.
        if os.path.exists(dst) and any(os.path.samefile(dst, p) for p in _chain_paths(driver)):
            raise ImageError(
                f"{dst} is the source image or one of its backing files; "
                "converting onto it would destroy the data being read"
            )
        size = source.size
        if out_fmt in ("nbd", "rbd") or not create:
            # Not a new local file: its own open takes its lock (RBD has its own
            # exclusive lock, an NBD export none here).
            if out_fmt == "rbd" and create:
                from formats.rbd.driver import create_blocking

                await asyncio.to_thread(create_blocking, dst, size)
            pace.begin(size)
            # The source's -F is not the target's; the rest of the admin's rules are.
            mine = replace(rules, backing_format=None)
            target = Backend(await open_for_cache(dst, tuning.cache, fmt=out_fmt, rules=mine))
            # An existing image may hold data: its zero runs must be written too.
            stats = await _copy_into(
                target,
                source,
                size,
                pace,
                zero=(out_fmt == "nbd" or not create) and not target_is_zero,
                tuning=tuning,
            )
        else:
            # The destination's lock is held from before it is truncated until the copy
            # is flushed: an image in use is refused untouched (formats.locks).
            with locked_target(dst, share=rules.share) as fd:
                pace.begin(size)
                if out_fmt == "raw":
                    create_raw(dst, size, target_fd=fd)
                elif out_fmt == "qcow2":
                    from formats.qcow2.create import Qcow2Options, create_qcow2

                    await create_qcow2(
                        dst,
                        size,
                        backing=backing,
                        backing_fmt=backing_format,
                        cluster_size=cluster_size,
                        options=qcow2 or Qcow2Options(),
                        target_fd=fd,
                        rules=rules,
                    )
                elif out_fmt == "vhd":
                    from formats.vhd.create import create_vhd

                    await create_vhd(dst, size, block_size=cluster_size, target_fd=fd)
                elif backing is not None:  # an overlay is never allocation-optimised
                    from formats.qcow.create import create_qcow

                    await create_qcow(
                        dst,
                        size,
                        backing=backing,
                        backing_format=backing_format or "auto",
                        optimise=False,
                        cluster_size=cluster_size,
                        target_fd=fd,
                        rules=rules,
                    )
                else:
                    from formats.qcow.create import create_qcow

                    await create_qcow(
                        dst, size, optimise=optimise, cluster_size=cluster_size, target_fd=fd
                    )
                # Our fd holds the lock; the target's own open must not ask for it again.
                # (QCOW v1 does not record its backing file's format: -F names it.) Its
                # header names -B because the admin did: followed as the admin's name.
                mine = replace(
                    rules, share=True, backing_format=backing_format, given_backing=backing
                )
                opened = await open_for_cache(dst, tuning.cache, fmt=out_fmt, rules=mine)
                stats = await _copy_into(
                    Backend(opened),
                    source,
                    size,
                    pace,
                    compress=compress,
                    diff=bool(backing),
                    tuning=tuning,
                )
    finally:
        await source.close()
    return stats


async def _copy_into(
    target: Backend,
    source: Backend,
    size: int,
    pace: Pace,
    *,
    zero: bool = False,
    compress: bool = False,
    diff: bool = False,
    tuning: CopyTuning = CopyTuning(),
) -> ConvertStats:
    """Copy into an opened target, flush it and close it."""
    try:
        if target.size < size:
            raise ImageError(f"target is {target.size} bytes, too small for {size} bytes")
        stats = await _copy(
            source,
            target,
            size,
            pace,
            zero_target=zero,
            compress=compress,
            diff=diff,
            tuning=tuning,
        )
        await target.flush()
    finally:
        await target.close()
    return stats


#: copy_file_range's ways of saying "not between these two files": copy the usual way.
_NO_OFFLOAD = frozenset(
    {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}
)


def _plain_fds(source: Backend, target: Backend) -> tuple[int, int] | None:
    """The two regular files' descriptors, if both ends are the raw driver itself."""
    src, dst = source.driver, target.driver
    if type(src) is RawDriver and type(dst) is RawDriver and not (src.is_block or dst.is_block):
        return src.fd, dst.fd
    return None


def _copy_range(src: int, dst: int, pos: int, n: int) -> None:
    """[pos, pos + n) of ``src`` to the same place in ``dst``, in the kernel."""
    while n:
        moved = os.copy_file_range(src, dst, n, pos, pos)
        if moved <= 0:  # the source ends early: it was sized when opened
            raise OSError(errno.EIO, f"copy_file_range stopped at offset {pos}")
        pos += moved
        n -= moved


async def _open_all(srcs: list[str], fmt: str, rules: OpenRules) -> Driver:
    """Each source opened (``fmt`` applies to all, as qemu-img -f), back to back."""
    from formats import open_image
    from formats.filters.concat import ConcatDriver

    parts: list[Driver] = []
    try:
        for s in srcs:
            parts.append(await open_image(s, fmt=fmt, read_only=True, rules=rules))
    except BaseException:
        await ConcatDriver(parts).close()
        raise
    return ConcatDriver(parts)


def _chain_paths(driver: Driver) -> list[str]:
    """The files of an opened image and of its backing chain (of each part's, for
    several sources)."""
    parts = getattr(driver, "parts", None)
    if isinstance(parts, list):
        return [p for part in parts for p in _chain_paths(part)]
    paths: list[str] = []
    d: object = driver
    while d is not None:
        path = getattr(d, "path", None)
        if isinstance(path, str) and path and os.path.exists(path):
            paths.append(path)
        d = getattr(d, "backing", None)
    return paths


async def _copy(
    source: Backend,
    target: Backend,
    size: int,
    pace: Pace,
    *,
    zero_target: bool = False,
    compress: bool = False,
    diff: bool = False,
    tuning: CopyTuning = CopyTuning(),
) -> ConvertStats:
    """``diff`` (an overlay's copy, -B): every range is compared with what the target
    reads now, its backing file, and only the blocks that differ are written.
    ``tuning.sparse_size`` 0: every byte is written as data, the source's zeros too."""
    stats = ConvertStats(size=size)
    sparse_size = tuning.sparse_size
    slots = asyncio.Semaphore(tuning.depth)
    # The zero-detection block; with -S 0 one block is the whole chunk, never zeros.
    zb = sparse_size or CHUNK
    # Blocks are compared with a bytearray: it compares with any buffer by memcmp, which
    # stops at the first byte that differs and copies nothing, where a memoryview on the
    # left compares byte by byte and ``tobytes`` copies the block first.
    zeroes = bytearray(zb if sparse_size else 0)
    scratch = bytearray(zb)

    def is_zero(block: memoryview) -> bool:
        if len(block) == zb:
            return zeroes == block
        return block.tobytes() == bytes(len(block))  # a chunk's short tail

    def same(block: memoryview, other: memoryview) -> bool:
        if len(block) != zb:
            return block.tobytes() == other.tobytes()
        memoryview(scratch)[:] = block
        return scratch == other

    tasks: set[asyncio.Task[None]] = set()
    failure: list[BaseException] = []
    # In order (no -W): a chunk's position -> the chunk before it, once that is done.
    # A chunk is done only after the one before it, so the chain holds end to end.
    before: dict[int, asyncio.Future[None]] = {}
    last: asyncio.Future[None] | None = None

    async def my_turn(pos: int) -> None:
        """Wait until the chunks before the one at ``pos`` have written (no -W)."""
        prev = before.pop(pos, None)
        if prev is not None:
            await prev

    # -C: both ends plain files (not a format, not a filter), and the chunks whole.
    fds = _plain_fds(source, target) if tuning.offload and not (diff or compress) else None

    def done(n: int, written: int) -> None:
        stats.written += written
        stats.skipped += n - written
        pace.advance(n)

    async def write(pos: int, data: memoryview) -> None:
        if not compress:
            await target.pwrite(pos, data)
            return
        # qcow2 -c: whole clusters go compressed, the ragged edges the normal way.
        from formats.qcow2.driver import Qcow2Driver

        driver = target.driver
        assert isinstance(driver, Qcow2Driver)
        cs = driver.cluster_size
        o = 0
        while o < len(data):
            p = pos + o
            m = min(len(data) - o, cs - p % cs)
            if p % cs == 0 and (m == cs or p + m == size):
                await driver.write_compressed(p, data[o : o + m])
            else:
                await target.pwrite(p, data[o : o + m])
            o += m

    async def read(pos: int, n: int) -> memoryview:
        try:
            return memoryview(await source.pread(pos, n))
        except RequestError as e:
            if tuning.salvage is None:
                raise
            first = e
        # --salvage: what can be read is, in 64 KiB pieces, then the failing pieces
        # sector by sector (as qemu-img); a sector that fails reads as zeros.
        buf = bytearray(n)
        for o in range(0, n, SALVAGE_PIECE):
            k = min(SALVAGE_PIECE, n - o)
            try:
                buf[o : o + k] = await source.pread(pos + o, k)
                continue
            except RequestError:
                pass
            lost = 0
            for s in range(o, o + k, 512):
                m = min(512, o + k - s)
                try:
                    buf[s : s + m] = await source.pread(pos + s, m)
                except RequestError:
                    lost += m
            if lost:
                tuning.salvage(
                    f"error reading {pos + o}..{pos + o + k}: {first}; {lost} bytes of it "
                    "written as zeros"
                )
        return memoryview(buf)

    async def copy_chunk(pos: int, n: int) -> None:
        data = await read(pos, n)
        await my_turn(pos)
        written = 0
        # Write only the runs of blocks that are not all zeros.
        run_start = -1
        for o in range(0, n + zb, zb):
            block = data[o : o + zb]
            zero = not block or (sparse_size > 0 and is_zero(block))
            if not zero and run_start < 0:
                run_start = o
            elif zero and run_start >= 0:
                await write(pos + run_start, data[run_start:o])
                written += o - run_start
                run_start = -1
            if zero and zero_target and block:
                await target.zero(pos + o, len(block))
            if o >= n:
                break
        done(n, written)
        # The drivers kept no reference to it: the next chunk's read reuses it instead
        # of a fresh buffer's memset and page faults.
        buffers.give(data)

    async def diff_chunk(pos: int, n: int) -> None:
        data = await read(pos, n)
        under = memoryview(await target.pread(pos, n))
        await my_turn(pos)
        written, run_start, run_kind = 0, 0, "same"
        # Runs of blocks of one kind: as the target reads, zeros to zero, or data.
        for o in range(0, n + zb, zb):
            block = data[o : o + zb]
            if not block:
                kind = "end"
            elif same(block, under[o : o + zb]):
                kind = "same"
            else:
                kind = "zero" if sparse_size and is_zero(block) else "data"
            if kind != run_kind:
                if run_kind == "zero":
                    await target.zero(pos + run_start, o - run_start)
                elif run_kind == "data":
                    await target.pwrite(pos + run_start, data[run_start:o])
                if run_kind != "same":
                    written += o - run_start
                run_start, run_kind = o, kind
            if kind == "end":
                break
        done(n, written)

    async def offload_chunk(pos: int, n: int) -> None:
        nonlocal fds
        if fds is not None:
            await my_turn(pos)
        if fds is not None:  # (a chunk before may have found that the kernel will not)
            try:
                await asyncio.to_thread(_copy_range, *fds, pos, n)
            except OSError as e:
                if e.errno not in _NO_OFFLOAD:
                    raise
                fds = None  # the kernel will not: this chunk and the rest the usual way
            else:
                stats.offloaded += n
                done(n, n)
                return
        await copy_chunk(pos, n)

    def guarded(
        chunk: Callable[[int, int], Awaitable[None]],
    ) -> Callable[[int, int, asyncio.Future[None]], Coroutine[Any, Any, None]]:
        """``chunk``, its failure kept for the loop below, its slot given back and its
        future ``finished`` set."""

        async def run(pos: int, n: int, finished: asyncio.Future[None]) -> None:
            try:
                await chunk(pos, n)
            except BaseException as e:
                failure.append(e)
            finally:
                slots.release()
                # Done once the chunk before is (a chunk that wrote nothing may not
                # have waited for it).
                prev = before.pop(pos, None)
                if prev is None or prev.done():
                    finished.set_result(None)
                else:
                    prev.add_done_callback(lambda _f: finished.set_result(None))

        return run

    pos = 0
    chunk = guarded(diff_chunk if diff else offload_chunk if fds else copy_chunk)
    while pos < size and not failure:
        window = min(STATUS_WINDOW, size - pos)
        try:
            extents = await source.extents(pos, window)
        except RequestError:
            if tuning.salvage is None:
                raise
            extents = [Extent(pos, window)]  # --salvage: read it all, as data
        for ext in extents:
            if failure:
                break
            # With diff, zeros are compared too: the backing file may hold data there.
            if ext.flags & ExtentFlags.ZERO and not diff and sparse_size:
                if zero_target:
                    if last is not None and not tuning.out_of_order:
                        await last
                    await target.zero(ext.offset, ext.length)
                done(ext.length, 0)
                continue
            p, end = ext.offset, ext.offset + ext.length
            while p < end and not failure:
                n = min(CHUNK, end - p)
                await pace.admit(n)
                await slots.acquire()
                loop = asyncio.get_running_loop()
                mine = loop.create_future()
                if last is not None and not tuning.out_of_order:
                    before[p] = last
                last = mine
                task = loop.create_task(chunk(p, n, mine))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                p += n
        pos = ext.offset + ext.length
    if tasks:
        await asyncio.gather(*tasks)
    if failure:
        raise failure[0]
    return stats
