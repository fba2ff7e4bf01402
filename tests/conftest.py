"""Shared fixtures (helpers live in tests/helpers.py).

Randomised tests take the ``seed`` fixture: one run seed (``--seed N``, or
``TAPNBD_TEST_SEED=N``, else random) mixed with the test's id, so each test has its own
sequence and a failure can be replayed alone. The run seed is in pytest's header, and a
failing test's report shows the command that replays it.
"""

from __future__ import annotations

import os
import random
import zlib
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.helpers import Server, start_server

_seed_key = pytest.StashKey[int]()
_test_seed_key = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--seed",
        type=int,
        default=None,
        help="run seed of the randomised tests (default: $TAPNBD_TEST_SEED, else random)",
    )


def pytest_configure(config: pytest.Config) -> None:
    seed = config.getoption("--seed")
    if seed is None:
        env = os.environ.get("TAPNBD_TEST_SEED")
        seed = int(env) if env else random.randrange(1 << 31)
    config.stash[_seed_key] = seed
    # pytest-xdist's workers start after this, from this environment: one run seed.
    os.environ["TAPNBD_TEST_SEED"] = str(seed)


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """This test's seed: the run seed mixed with the test id (see the module docstring)."""
    run_seed = request.config.stash[_seed_key]
    value = (run_seed ^ zlib.crc32(request.node.nodeid.encode())) & 0x7FFFFFFF
    request.node.stash[_test_seed_key] = value
    print(f"seed {value} (run seed {run_seed})")
    return value


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _test_seed_key in item.stash:
        run_seed = item.config.stash[_seed_key]
        report.sections.append(
            (
                "tapnbd seed",
                f"test seed {item.stash[_test_seed_key]}; replay with: "
                f"pytest '{item.nodeid}' --seed {run_seed}",
            )
        )
    return report


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
