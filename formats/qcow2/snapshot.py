"""Serving an internal snapshot: find it by id or name, and switch to its L1 table.

As qemu-nbd ``-l`` does (QEMU block/qcow2-snapshot.c ``qcow2_snapshot_load_tmp``): the
image is opened read-only and the active L1 table is replaced by the snapshot's, read
and checked like the active one. Everything else stays the image's: the virtual size
(a snapshot's L1 table shorter than the image maps nothing past its end, which reads
through to the backing file or as zeros), the backing file and the refcounts. Lookups
by id come first, then by name (QEMU ``bdrv_snapshot_load_tmp_by_id_or_name``), and
qemu-nbd's ``snapshot.id=ID,snapshot.name=NAME`` spelling is understood too.
"""

from __future__ import annotations

from array import array
from dataclasses import replace
from typing import TYPE_CHECKING

from formats.engine.tables import be_array
from formats.qcow2.layout import MAX_L1_BYTES, Snapshot
from formats.qcow2.meta import _check_area, _check_l1_entries, l1_entries_needed
from tapnbd.errors import ImageError, InvalidImageError

if TYPE_CHECKING:
    from formats.qcow2.meta import Qcow2Meta
    from tapnbd.driver import Driver

#: Snapshots named in the "not found" message, at most (an image may have 65536).
_LISTED = 20
#: Characters of a snapshot's name or id shown in a message (they may be 64 KiB long).
_SHOWN = 64


class SnapshotNotFoundError(ImageError):
    """No internal snapshot has the id or name asked for."""


def _shown(text: str) -> str:
    """A name from the image, quoted with its control characters escaped (it may hold
    terminal escapes) and cut short."""
    return repr(text[:_SHOWN]) + ("..." if len(text) > _SHOWN else "")


def shown(text: str) -> str:
    """A name or id as printed: as it is if it is printable and short, else quoted
    with its control characters escaped and cut short."""
    return text if text.isprintable() and len(text) <= _SHOWN else _shown(text)


def describe_snapshot(snap: Snapshot) -> str:
    ident = snap.id_str
    if not (ident.isprintable() and len(ident) <= _SHOWN and "'" not in ident):
        ident = _shown(ident)
    return f"{_shown(snap.name)} (id {ident})"


def _wanted(key: str) -> list[tuple[str | None, str | None]]:
    """The (id, name) pairs ``key`` asks for, in the order they are tried.

    qemu-nbd's ``-l`` spellings: ``ID_OR_NAME`` (an id first, then a name), or
    ``snapshot.id=ID``, ``snapshot.name=NAME`` or both, comma-separated (both must match).
    """
    if not key.startswith("snapshot."):
        return [(key, None), (None, key)]
    opts: dict[str, str] = {}
    for part in key.split(","):
        opt, eq, value = part.partition("=")
        if opt not in ("snapshot.id", "snapshot.name") or not eq or opt in opts:
            raise ImageError(
                f"snapshot {key!r}: expected an id or a name, or snapshot.id=ID and/or "
                "snapshot.name=NAME separated by a comma"
            )
        opts[opt] = value
    return [(opts.get("snapshot.id"), opts.get("snapshot.name"))]


def find_snapshot(snapshots: list[Snapshot], key: str, path: str) -> Snapshot:
    """The snapshot ``key`` names (see ``_wanted``): by id, else by name."""
    for want_id, want_name in _wanted(key):
        for snap in snapshots:
            if want_id in (None, snap.id_str) and want_name in (None, snap.name):
                return snap
    if not snapshots:
        raise SnapshotNotFoundError(
            f"{path}: no snapshot {_shown(key)}: the image has no snapshots"
        )
    shown = ", ".join(describe_snapshot(s) for s in snapshots[:_LISTED])
    more = f" and {len(snapshots) - _LISTED} more" if len(snapshots) > _LISTED else ""
    raise SnapshotNotFoundError(
        f"{path}: no snapshot with id or name {_shown(key)}; the image has {shown}{more}"
    )


async def at_snapshot(child: Driver, meta: Qcow2Meta, key: str | None, path: str) -> Qcow2Meta:
    """``meta`` as it was at the snapshot ``key`` names; as it is when ``key`` is None."""
    if key is None:
        return meta
    return await snapshot_meta(child, meta, find_snapshot(meta.snapshots, key, path))


async def snapshot_meta(child: Driver, meta: Qcow2Meta, snap: Snapshot) -> Qcow2Meta:
    """``meta`` with the snapshot's L1 table in place of the active one.

    The snapshot table entry is as hostile as the header: its L1 table must lie inside
    the file, within qemu's size limit, and its entries pass the checks the active
    table's do; every refusal names the snapshot and the field.
    """
    h, cs = meta.header, meta.cluster_size
    where = f"snapshot {describe_snapshot(snap)}"
    if snap.l1_size * 8 > MAX_L1_BYTES:
        raise InvalidImageError(
            f"{where}: l1_size {snap.l1_size} is too large (at most {MAX_L1_BYTES // 8} entries)"
        )
    try:
        _check_area(
            "l1_table_offset", snap.l1_table_offset, snap.l1_size * 8, cs, meta.file_size,
            allow_empty=True,
        )  # fmt: skip
    except InvalidImageError as e:
        raise InvalidImageError(f"{where}: {e}") from None
    l1 = array("Q")
    if snap.l1_size:
        l1 = be_array(await child.pread(snap.l1_table_offset, snap.l1_size * 8))
    # Entries past the snapshot's table map nothing (qemu: "l1_index >= s->l1_size").
    need = l1_entries_needed(h.size, h.cluster_bits)
    if len(l1) < need:
        l1.extend([0] * (need - len(l1)))
    header = replace(h, l1_table_offset=snap.l1_table_offset, l1_size=snap.l1_size)
    out = replace(meta, header=header, l1=l1)
    try:
        _check_l1_entries(out)
    except InvalidImageError as e:
        raise InvalidImageError(f"{where}: {e}") from None
    return out
