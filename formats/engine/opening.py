"""Opening an image file under a format: the sequence every format with a backing chain
shares (QCOW v1, qcow2 and VHD).

``image_file`` refuses a loop or an over-deep chain (one chain for all formats, so a
loop through images of different formats is caught too), opens the file off the event
loop under the trust rules (formats.OpenRules: the lock unless shared, block devices
only where allowed), puts the file filter in front of it (fault injection), and marks
the image as being opened while the format reads its header and opens its backing file.
On an error it closes the file and names the image in the message.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar

from formats.raw import RawDriver
from tapnbd.driver import Driver
from tapnbd.errors import ImageError, InvalidImageError

#: Backing chains deeper than this are refused (QEMU stops at a similar depth).
MAX_CHAIN = 16
#: Real paths of the images being opened in this chain, to catch loops.
_chain: ContextVar[tuple[str, ...]] = ContextVar("image_chain", default=())
#: Wraps each image file's driver before the format uses it (fault injection:
#: formats.filters.at_file_layer, ``tapnbd serve --inject-at file``).
file_filter: ContextVar[Callable[[Driver], Driver] | None] = ContextVar(
    "image_file_filter", default=None
)


def resolve_backing(image_path: str, name: str) -> str:
    """A backing name as stored is relative to the image's directory (as in QEMU).

    Joined to the image path as given, not made absolute: QEMU's path_combine does the
    same, so ``full-backing-filename`` in ``tapnbd info`` matches ``qemu-img info``.
    A name that is not a local file (``rbd:``, ``ram:``, an NBD URI) is kept as it is,
    whatever the image's directory, so the trust rules see it as what it names.
    """
    from formats import is_local_path

    if os.path.isabs(name) or not is_local_path(name) or "://" in name:
        return name
    return os.path.join(os.path.dirname(image_path), name)


@asynccontextmanager
async def image_file(
    path: str, read_only: bool, *, link: str = "backing file", chain_name: str = "backing chain"
) -> AsyncIterator[Driver]:
    """The file under the image at ``path``, for the format to read; see the module."""
    chain = _chain.get()
    real = os.path.realpath(path)
    if real in chain:
        raise InvalidImageError(f"{path}: {link} loop ({' -> '.join((*chain, real))})")
    if len(chain) >= MAX_CHAIN:
        raise InvalidImageError(f"{path}: {chain_name} deeper than {MAX_CHAIN} images")
    from formats import open_rules

    rules = open_rules()
    child: Driver = await RawDriver.open(
        path,
        read_only=read_only,
        lock=True,
        share=rules.share,
        block_devices=rules.block_devices,
    )
    wrap = file_filter.get()
    if wrap is not None:
        child = wrap(child)
    token = _chain.set((*chain, real))
    try:
        yield child
    except BaseException as e:
        await child.close()
        if isinstance(e, ImageError) and not str(e).startswith(path):
            raise type(e)(f"{path}: {e}") from None
        raise
    finally:
        _chain.reset(token)


def check_unsafe_backing(size: int | None, backing_format: str | None) -> None:
    """``create -u`` records a backing file without opening it (qemu-img create -u), so
    it can neither probe it nor take its size: both must be given."""
    if size is None:
        raise ImageError("-u does not open the backing file: give the size")
    if backing_format is None or backing_format == "auto":
        raise ImageError("-u does not open the backing file: give its format (-F)")
