"""The daemon's state on disk: what it records after every change, and restores on start."""

from __future__ import annotations

import logging

from tapnbd.control.exports import Exports
from tapnbd.control.messages import Attachment
from tapnbd.control.state import State, StateDir
from tapnbd.errors import TapnbdError

log = logging.getLogger("tapnbd.control")


def snapshot(exports: Exports, attachments: list[Attachment]) -> State:
    return State(exports=[exports.record(e) for e in exports], attachments=list(attachments))


def save(state_dir: StateDir, exports: Exports, attachments: list[Attachment]) -> None:
    state_dir.save(snapshot(exports, attachments))


async def restore_exports(previous: State, exports: Exports) -> list[str]:
    """Open again the exports ``export add`` made; notes for the user."""
    notes = []
    for entry in previous.exports:
        if entry.origin != "export":
            continue  # made by an attach that is gone now
        try:
            await exports.open(
                entry.image,
                entry.name,
                entry.read_only,
                entry.format,
                "export",
                entry.snapshot,
                entry.bitmaps,
                entry.allocation_depth,
                entry.discard,
                entry.detect_zeroes,
                cache=entry.cache,
                offset=entry.offset,
                share=entry.share,
                # A fresh overlay: the old one's writes went with the daemon that held it.
                throwaway=entry.throwaway,
                # Unrecorded (an older state file): guarded, as if probed. Only the
                # admin's --format raw lifts the guard, and nothing says it was given.
                probed_raw=entry.probed_raw is not False,
                trust=entry.trust,
            )
        except (TapnbdError, OSError) as e:
            notes.append(f"could not restore export {entry.name!r} ({entry.image}): {e}")
        else:
            notes.append(f"restored export {entry.name!r} ({entry.image})")
    return notes
