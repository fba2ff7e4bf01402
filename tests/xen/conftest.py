"""Fixtures of the ring tests: backends as real ``tapnbd ring serve`` processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.xen.ringproc import RingFactory, RingServer, start_ring


@pytest.fixture
def ring(tmp_path: Path) -> Iterator[RingFactory]:
    """``ring(image, *args)`` starts a backend in tmp_path/vbd; all stop after the test."""
    servers: list[RingServer] = []

    def start(image: str, *args: str) -> RingServer:
        n = len(servers)
        server = start_ring(image, tmp_path / f"vbd{n}", tmp_path / f"ring{n}.log", *args)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
