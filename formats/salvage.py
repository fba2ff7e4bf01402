"""Opening a damaged image far enough to describe it (``tapnbd info``).

qemu-img info shows the header of an overlay whose backing file is missing (it opens
the image alone) and of a QCOW v1 image with a bad L1 entry (its open does not look at
the entries), and exits 0. Here a normal open comes first; when it fails, the image is
opened again without its backing chain, and a QCOW v1 image whose own metadata is bad
is read the way ``check`` reads it, leaving the bad L1 entries out. Either way the
driver is read-only and comes with warnings that say what was left out and why.

Only a missing file and corrupt metadata count as damage. A backing file the trust
rules refuse (a name read from a probed header, a FIFO, a block device not allowed) is
not: that refusal stands, and info fails as every other open does (README, "Security
model").
"""

from __future__ import annotations

import os
from dataclasses import replace

from formats import OpenRules, open_image, probe
from tapnbd.driver import Driver
from tapnbd.errors import EncryptedImageError, ImageError, InvalidImageError, MissingImageError


async def open_for_info(
    path: str, fmt: str = "auto", rules: OpenRules | None = None
) -> tuple[Driver, list[str]]:
    """A read-only driver of ``path`` and the warnings about what it leaves out."""
    rules = rules or OpenRules()
    try:
        return await open_image(path, fmt=fmt, read_only=True, rules=rules), []
    except EncryptedImageError:
        # Described, as qemu-img info does without the key; never read.
        return await open_image(path, fmt=fmt, read_only=True, rules=rules, encrypted=True), []
    except (MissingImageError, InvalidImageError) as first:
        problem: ImageError = first
    if not os.path.lexists(path):
        raise problem
    try:
        alone = await open_image(
            path, fmt=fmt, read_only=True, rules=replace(rules, no_backing=True)
        )
        return alone, [f"{problem}; the backing chain is not shown"]
    except InvalidImageError:
        kind = fmt if fmt != "auto" else probe(path)
        if kind == "qcow2":
            return await _qcow2_leaving_out_bad_entries(path, problem)
        if kind != "qcow":
            raise problem from None
    return await _qcow_leaving_out_bad_entries(path, problem)


async def _qcow_leaving_out_bad_entries(path: str, problem: ImageError) -> tuple[Driver, list[str]]:
    from formats.qcow.driver import QcowDriver
    from formats.qcow.meta import Problems, read_meta
    from formats.raw import RawDriver

    child = RawDriver(path, read_only=True)
    try:
        found = Problems()
        meta = await read_meta(child, found)  # a bad header still fails here
    except BaseException:
        await child.close()
        raise problem from None
    if not found:
        await child.close()
        raise problem from None
    driver = QcowDriver(child, None, meta, read_only=True, path=path)
    await driver.prepare()
    # One line, however many entries are bad (a crafted table may hold millions).
    warnings = [f"{found.summary()}; bad L1 entries are left out (they read as holes)"]
    if meta.backing_name:
        warnings.append("the backing chain is not shown")
    return driver, warnings


async def _qcow2_leaving_out_bad_entries(
    path: str, problem: ImageError
) -> tuple[Driver, list[str]]:
    from formats.qcow2.driver import Qcow2Driver
    from formats.qcow2.meta import check_features, read_meta
    from formats.raw import RawDriver

    child = RawDriver(path, read_only=True)
    try:
        bad: list[str] = []
        meta = await read_meta(child, bad)  # a bad header or table still fails here
        check_features(meta, True)
        if not bad:
            raise problem
        driver = Qcow2Driver(child, None, meta, read_only=True, path=path)
    except BaseException:
        await child.close()
        raise problem from None
    await driver.prepare()
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    warnings = [f"{bad[0]}{more}; bad L1 entries are left out (they read as holes)"]
    if meta.backing_name:
        warnings.append("the backing chain is not shown")
    return driver, warnings
