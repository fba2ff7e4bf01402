"""A throwaway qcow2 overlay over an open image (qemu-nbd's ``-s``/``--snapshot``).

Writes land in a temporary qcow2 file whose backing file is the image, opened
read-only, so the image itself never changes. The file is made in a private directory
(mode 0700) under ``$TMPDIR``, else ``/var/tmp`` as qemu's temporary files, and both are
unlinked as soon as the overlay is open: nothing is left behind however the server
ends, and no other local user can open it meanwhile.

The backing file is handed to the overlay as the driver already open, not recorded by
name in the overlay's header, so it works for every kind of image (``ram:``, ``rbd:``,
NBD URIs) and nothing is opened, or probed, twice.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

from tapnbd.driver import Driver
from tapnbd.errors import TapnbdError

if TYPE_CHECKING:
    from formats.qcow2.meta import Qcow2Meta


def overlay_dir() -> str:
    """Where the overlay goes: ``$TMPDIR``, else ``/var/tmp`` (it may grow as big as the
    image, too big for a ``/tmp`` in memory)."""
    return os.environ.get("TMPDIR") or "/var/tmp"


async def open_image_or_overlay(spec: str, *, throwaway: bool, **kw: Any) -> Driver:
    """``open_image(spec, **kw)``, or with ``throwaway`` (qemu-nbd's -s) the image opened
    read-only under a throwaway overlay that takes the writes."""
    from formats import open_image

    if not throwaway:
        return await open_image(spec, **kw)
    return await open_throwaway_overlay(await open_image(spec, **{**kw, "read_only": True}))


async def open_throwaway_overlay(base: Driver) -> Driver:
    """A writable qcow2 driver over ``base``, whose writes are lost when it closes.

    The overlay owns ``base`` from here on: closing it closes ``base``, and so does a
    failure to make it.
    """
    # Here, not at the top: every open goes through open_image_or_overlay, and only -s
    # needs qcow2.
    from formats.engine.image import open_format
    from formats.qcow2.create import create_qcow2
    from formats.qcow2.driver import Qcow2Driver
    from formats.qcow2.meta import check_features, read_meta

    where = overlay_dir()
    try:
        private = tempfile.mkdtemp(prefix="tapnbd-overlay-", dir=where)
    except BaseException as e:
        await base.close()
        if isinstance(e, OSError):
            raise TapnbdError(f"no room for the throwaway overlay in {where}: {e.strerror}") from e
        raise
    handed = False  # open_format closes the backing file it was given if it fails

    async def checked_meta(child: Driver) -> Qcow2Meta:
        meta = await read_meta(child)
        check_features(meta, False)
        return meta

    async def backing_of(_meta: Qcow2Meta) -> Driver:
        nonlocal handed
        handed = True
        return base

    try:
        path = os.path.join(private, "overlay.qcow2")
        await create_qcow2(path, base.size())
        driver = await open_format(path, False, checked_meta, backing_of, Qcow2Driver)
    except BaseException:
        if not handed:
            await base.close()
        raise
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return driver
