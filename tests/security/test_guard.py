"""The probed-raw guard's own rules, below the NBD tests in test_probing.py."""

from __future__ import annotations

import asyncio
import errno
import threading
from pathlib import Path

import pytest

from formats import OpenRules, open_image, probe
from formats.filters import DelayFilter
from formats.guard import ProbedRawGuard
from formats.qcow.create import create_qcow
from formats.raw import RawDriver

MiB = 1 << 20


async def test_a_header_assembled_by_concurrent_writes_is_refused(tmp_path: Path) -> None:
    """ "QF" and "I\\xfb" are each harmless; together they are the QCOW magic. Writes over
    the first sector are checked one at a time, so the second sees the first."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(MiB)
    # The delay makes both checks wait on their read, so unserialised they would overlap.
    child = DelayFilter(RawDriver(str(path)), {"read": 0.01})
    guard = ProbedRawGuard(child, str(path))
    got = await asyncio.gather(
        guard.pwrite(0, b"QF"),
        guard.pwrite(2, b"I\xfb\x00\x00\x00\x01"),
        return_exceptions=True,
    )
    await guard.close()
    assert got[0] is None
    assert isinstance(got[1], OSError) and got[1].errno == errno.EPERM
    assert probe(str(path)) == "raw"


async def test_only_probed_writable_raw_images_are_guarded(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(MiB)
    for fmt, read_only, guarded in (
        ("auto", False, True),
        ("raw", False, False),
        ("auto", True, False),
    ):
        d = await open_image(str(path), fmt=fmt, read_only=read_only, rules=OpenRules(share=True))
        assert isinstance(d, ProbedRawGuard) == guarded and d.name == "raw"
        await d.close()


async def test_image_files_are_opened_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open(2), fstat and the probe read run in the pool, so a daemon serving other
    exports never waits on a slow open: every open_file call is off the loop's thread."""
    import formats.raw

    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(MiB)
    over = tmp_path / "over.qcow"
    await create_qcow(str(over), backing=str(base), backing_format="raw")
    threads: list[int] = []
    real = formats.raw.open_file

    def spy(path: str, **kw: bool) -> int:
        threads.append(threading.get_ident())
        return real(path, **kw)

    monkeypatch.setattr(formats.raw, "open_file", spy)
    for fmt in ("auto", "qcow"):
        d = await open_image(str(over), fmt=fmt, rules=OpenRules(allow_probed_backing=True))
        await d.close()
    # Probe + open of the image (the probe only in auto), probe + open of the backing.
    assert len(threads) == 4 + 3
    assert threading.get_ident() not in threads
