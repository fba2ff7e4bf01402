"""Image locks: qemu's file locking, so that tapnbd and QEMU see each other's use.

Two writers corrupt an image (two qcow drivers allocating the same clusters, two
servers under one guest file system), and a writer under a reader changes what the
reader has cached (a backing file under its overlay). QEMU stops both with byte-range
locks that name permissions (block/file-posix.c, "image locking"); tapnbd takes the
same ones, so that ``qemu-img``, ``qemu-nbd`` or a VM and ``tapnbd`` refuse each
other's conflicting opens both ways, as two QEMUs do.

Each open holds open-file-description (OFD) read locks, one byte per permission:

- byte 100 + i for each permission i it uses,
- byte 200 + i for each permission i it does not let others use,

and then tests, without taking them, whether a write lock could be had on the bytes
that show a conflict: 200 + i for the permissions it uses (someone forbids them), and
100 + i for the ones it forbids (someone uses them). Permissions, as QEMU numbers them:
consistent read (0), write (1), write unchanged (2), resize (3).

A reader uses consistent read and forbids write and resize; a writer also uses write
and resize. ``share`` (the tools' ``-U``, serve's ``--share``: the admin shares the
image on purpose) forbids nothing and tests nothing, but still shows its use. The locks
belong to the open file description and go with it when the fd is closed or we exit.

A tool that rewrites an image (create, convert) takes the writer's locks *before* it
changes a byte (``locked_target``), so that ``create`` or ``convert`` onto an image in
use fails and leaves it byte-for-byte as it was, instead of truncating it under its
server.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from tapnbd.errors import ImageError

log = logging.getLogger(__name__)

_USE_BASE = 100  # QEMU's RAW_LOCK_PERM_BASE
_FORBID_BASE = 200  # QEMU's RAW_LOCK_SHARED_BASE
CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE = 0, 1, 2, 3
#: QEMU's names, as its messages print them.
PERMISSION_NAMES = ("consistent read", "write", "write unchanged", "resize")
# struct flock on Linux (64-bit off_t): l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhqqi4x")


def _ofd(fd: int, cmd: int, kind: int, byte: int) -> int:
    """One OFD lock call on one byte; returns the l_type the kernel hands back."""
    arg = _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0)  # l_pid must be 0 for OFD locks
    return int(_FLOCK.unpack(fcntl.fcntl(fd, cmd, arg))[0])


def permissions(*, write: bool, share: bool) -> tuple[set[int], set[int]]:
    """What an open uses and what it forbids others."""
    used = {CONSISTENT_READ, WRITE, RESIZE} if write else {CONSISTENT_READ}
    return used, (set() if share else {WRITE, RESIZE})


def lock_image(fd: int, path: str, *, write: bool, share: bool = False) -> None:
    """Take the image's locks for a reader or a writer, or say who is in the way."""
    used, forbidden = permissions(write=write, share=share)
    try:
        for i in sorted(used):
            _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _USE_BASE + i)
        for i in sorted(forbidden):
            _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _FORBID_BASE + i)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            # Only a write lock on these bytes stops a read lock, and nobody takes one
            # for long (the test below takes none); a stranger holds it on purpose.
            raise ImageError(
                f"{path}: in use: its lock bytes are held by another program"
            ) from None
        # A file system without OFD locks (some network ones): QEMU's locking=auto
        # goes on without locking too.
        log.warning("%s: cannot lock the image (%s); opening it unlocked", path, e.strerror)
        return
    if share:
        return
    for i in sorted(used):
        if _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, _FORBID_BASE + i) != fcntl.F_UNLCK:
            raise _in_use(path, f'Failed to get "{PERMISSION_NAMES[i]}" lock')
    for i in sorted(forbidden):
        if _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, _USE_BASE + i) != fcntl.F_UNLCK:
            raise _in_use(path, f'Failed to get shared "{PERMISSION_NAMES[i]}" lock')


def _in_use(path: str, what: str) -> ImageError:
    # QEMU's words, so that a search for its message finds the cause.
    return ImageError(
        f"{path}: in use: {what} (a server, an export, a VM or qemu-img has it open in a "
        "way that conflicts; -U / --force-share, or --share of serve, export add and "
        "attach, shares it)"
    )


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
        lock_image(fd, path, write=True, share=share)
        yield fd
    finally:
        os.close(fd)
