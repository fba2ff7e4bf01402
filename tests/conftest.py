"""Shared fixtures (helpers live in tests/helpers.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import Server, start_server


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``serve(*args, exports=1)`` starts a server; all are stopped after the test."""
    servers: list[Server] = []

    def start(*args: str, exports: int = 1) -> Server:
        server = start_server(list(args), tmp_path / f"server{len(servers)}.log", exports)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def raw_image(tmp_path: Path) -> Path:
    """A 64 MiB sparse raw image."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    return path
