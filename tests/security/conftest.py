"""Fixtures for the trust-rule tests."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.control.tap import Tapnbd


@pytest.fixture
def tap() -> Iterator[Tapnbd]:
    """The daemon's CLI on a private state directory (as tests/control's ``tap``)."""
    t = Tapnbd(Path(tempfile.mkdtemp(prefix="tnbd-sec-", dir="/tmp")))
    try:
        yield t
    finally:
        t.cleanup()
