"""Exceptions. Three kinds, kept apart (QEMU nbd/server.c, h11):

- ProtocolError: the peer broke the NBD protocol; its connection is dropped.
- RequestError: one request failed; the client gets an error reply and carries on.
- ImageError: an image cannot be opened; the message names the field at fault.
"""

from __future__ import annotations

import errno


class TapnbdError(Exception):
    """Base of every error this project raises on purpose; the CLI prints its message."""


class ProtocolError(TapnbdError):
    """The byte stream broke the protocol; the connection cannot continue."""


class RequestError(TapnbdError):
    """A request failed with ``errno``; sent back to the client as an error reply."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(err, str(err)))
        self.errno = err


class RefusedIOError(OSError):
    """EIO for a request a driver refused before it touched the image (a damaged table
    entry, found when the table was read): nothing written before is lost by it, so it
    does not make later flushes fail (Backend.sync_failed)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


class ImageError(TapnbdError):
    """An image cannot be opened or created."""


class InvalidImageError(ImageError):
    """The image is corrupt or not of the claimed format."""


class MissingImageError(ImageError):
    """The image (or a backing file it names) does not exist."""


class UnsupportedImageError(ImageError):
    """The image is valid but uses a feature tapnbd refuses (encryption, qcow2)."""


class EncryptedImageError(UnsupportedImageError):
    """The image is encrypted: tapnbd holds no keys, so only ``info`` describes it."""


class UnsafePathError(TapnbdError):
    """A file or directory we were to trust is not ours alone (a symlink, another
    user's, writable by others); the message names the path and the reason."""
