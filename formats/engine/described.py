"""An image opened to be described, never read: an encrypted one (``tapnbd info``).

tapnbd holds no keys, so an encrypted image's clusters are ciphertext. Its format
driver is opened over the metadata (which is not encrypted) and wrapped here: ``info``
gets its description and backing chain, and a read fails instead of handing out
ciphertext as if it were the guest's data.
"""

from __future__ import annotations

import errno
from typing import ClassVar

from tapnbd.driver import Driver
from tapnbd.errors import RequestError


class DescribedOnly(Driver):
    name: ClassVar[str] = "described-only"

    def __init__(self, inner: Driver) -> None:
        self._inner = inner
        self.backing: Driver | None = getattr(inner, "backing", None)
        self.path: str = getattr(inner, "path", "")

    def size(self) -> int:
        return self._inner.size()

    async def pread(self, offset: int, length: int) -> bytes:
        raise RequestError(errno.EACCES, f"{self.path}: encrypted, and tapnbd holds no keys")

    def describe(self) -> dict[str, object]:
        return self._inner.describe()

    async def close(self) -> None:
        await self._inner.close()
