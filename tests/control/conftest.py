"""Fixtures for the control-plane tests (helpers in tap.py)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.control.tap import Tapnbd, need_devices


@pytest.fixture
def tap() -> Iterator[Tapnbd]:
    base = Path(tempfile.mkdtemp(prefix="tnbd-", dir="/tmp"))
    t = Tapnbd(base)
    try:
        yield t
    finally:
        t.cleanup()


@pytest.fixture
def devtap(tap: Tapnbd) -> Tapnbd:
    """``tap``, for tests that attach devices (root, FUSE and loop, or skip)."""
    need_devices()
    return tap
