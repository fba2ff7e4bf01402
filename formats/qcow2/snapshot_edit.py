"""``tapnbd snapshot -c|-d|-a``: create, delete and apply internal qcow2 snapshots in an
image no one has open (qemu-img snapshot), under the image's lock.

Every change builds the new state beside the old one and switches to it with one
sector write (``formats.qcow2.rebuild``); bitmaps are kept as they are.

References: QEMU docs/interop/qcow2.txt "Snapshots"; block/qcow2-snapshot.c.
"""

from __future__ import annotations

import struct
import time
from array import array
from typing import TYPE_CHECKING

from formats.qcow2.layout import (
    MAX_SNAPSHOTS,
    OFLAG_COPIED,
    SNAPSHOT,
    Snapshot,
)
from formats.qcow2.meta import Qcow2Meta, l1_entries_needed, read_meta
from formats.qcow2.offline import rewritable
from formats.qcow2.rebuild import NewState, kept_snapshots, switch
from formats.qcow2.snapshot import describe_snapshot, find_snapshot, snapshot_meta
from formats.raw import RawDriver
from tapnbd.errors import ImageError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from tapnbd.driver import Driver

    Change = Callable[["Driver", Qcow2Meta], Awaitable[tuple["NewState", str]]]

#: What qemu writes as a snapshot's extra data: vm_state_size_large, disk_size, icount.
EXTRA = struct.Struct(">QQq")


async def list_snapshots(path: str) -> list[Snapshot]:
    child = RawDriver(path, read_only=True)
    try:
        return (await read_meta(child)).snapshots
    finally:
        await child.close()


async def create_snapshot(path: str, name: str, *, share: bool = False) -> str:
    """Take a snapshot named ``name`` of the image's current state; returns its id."""
    if not name:
        raise ImageError("a snapshot needs a name")

    async def change(child: Driver, meta: Qcow2Meta) -> tuple[NewState, str]:
        if any(s.name == name for s in meta.snapshots):
            raise ImageError(f"{path}: a snapshot named {name!r} already exists")
        if len(meta.snapshots) >= MAX_SNAPSHOTS:
            raise ImageError(f"{path}: the image has {MAX_SNAPSHOTS} snapshots, qemu's limit")
        ids = [int(s.id_str) for s in meta.snapshots if s.id_str.isdigit()]
        new_id = str(max(ids, default=0) + 1)  # as qemu's find_new_snapshot_id
        state = NewState(array("Q", meta.l1), meta.header.size)
        state.snapshots = await kept_snapshots(child, meta)
        now = time.time_ns()
        extra = EXTRA.pack(0, meta.header.size, 0)  # icount 0, as qemu-img writes it
        entry = _entry(0, len(meta.l1), new_id, name, now, extra)
        state.snapshots.append((entry, array("Q", (e & ~OFLAG_COPIED for e in meta.l1)), None))
        return state, new_id

    return await _edit(path, share, change)


async def delete_snapshot(path: str, key: str, *, share: bool = False) -> str:
    """Delete the snapshot ``key`` names (an id, else a name); returns its description."""

    async def change(child: Driver, meta: Qcow2Meta) -> tuple[NewState, str]:
        gone = find_snapshot(meta.snapshots, key, path)
        state = NewState(array("Q", meta.l1), meta.header.size)
        state.snapshots = await kept_snapshots(child, meta, drop=gone)
        return state, describe_snapshot(gone)

    return await _edit(path, share, change)


async def apply_snapshot(path: str, key: str, *, share: bool = False) -> str:
    """Make the image read as the snapshot ``key`` names (its size too, as qemu does);
    the current state is lost. Returns the snapshot's description."""

    async def change(child: Driver, meta: Qcow2Meta) -> tuple[NewState, str]:
        snap = find_snapshot(meta.snapshots, key, path)
        if any(b.enabled for b in meta.bitmaps):  # as qemu-img: they would not see it
            raise ImageError(
                f"{path}: could not apply snapshot {key!r}: the image has enabled dirty "
                "bitmaps (disable them first: tapnbd bitmap --disable)"
            )
        size = snap.disk_size if snap.disk_size is not None else meta.header.size
        at = await snapshot_meta(child, meta, snap)
        l1 = array("Q", at.l1[: snap.l1_size])
        need = l1_entries_needed(size, meta.cluster_bits)
        l1.extend([0] * (need - len(l1)))
        state = NewState(l1, size)
        state.snapshots = await kept_snapshots(child, meta)
        return state, describe_snapshot(snap)

    return await _edit(path, share, change)


def _entry(l1_offset: int, l1_size: int, ident: str, name: str, ns: int, extra: bytes) -> bytes:
    """A snapshot table entry, padded to 8 bytes."""
    i, n = ident.encode(), name.encode()
    out = SNAPSHOT.pack(
        l1_offset, l1_size, len(i), len(n), ns // 10**9, ns % 10**9, 0, 0, len(extra)
    )
    out += extra + i + n
    return out + bytes(-len(out) % 8)


async def _edit(path: str, share: bool, change: Change) -> str:
    async with rewritable(path, share=share) as (child, meta):
        state, said = await change(child, meta)
        await switch(child, meta, state, path)
        return said
