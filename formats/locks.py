"""Image locks for the tools that write an image (create, convert; later resize, rebase).

A server holds an exclusive ``flock`` on every image it has open for writing
(formats.raw.lock_image, as qemu's file locking does). A tool that rewrites an image
takes the same lock *before* it changes a byte, so that ``create`` or ``convert`` onto
an image in use fails and leaves it byte-for-byte as it was, instead of truncating it
under its server. ``share`` (the tools' ``--force-share``) skips the lock.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from formats.raw import lock_image
from tapnbd.errors import ImageError


@contextmanager
def locked_target(path: str, *, share: bool = False) -> Iterator[int]:
    """An fd of ``path`` (created if missing, never truncated) with its write lock held.

    The caller truncates or rewrites through the fd once it has it; the lock goes with
    the fd when the block ends. Only a regular file is a target: O_NONBLOCK keeps a
    FIFO from holding us up until fstat refuses it.
    """
    try:
        fd = os.open(
            path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK, 0o644
        )
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageError(f"{path}: not a regular file; images are created as files")
        os.set_blocking(fd, True)
        if not share:
            lock_image(fd, path)
        yield fd
    finally:
        os.close(fd)
