"""The tests' CLI fork server (tests/clifork.py) gives what a fresh ``python -m tapnbd`` gives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import clifork


def both(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    fresh = subprocess.run(
        [sys.executable, "-m", "tapnbd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )
    forked = clifork.SERVER.run(list(args), cwd, env, 60)
    assert forked is not None
    return fresh, forked


@pytest.mark.parametrize(
    "args",
    [
        ("--version",),
        ("no-such-command",),
        ("info", "/nonexistent/image"),
        ("create", "--help"),
        ("info", "--json", "img.raw"),
        ("check", "img.raw"),
    ],
    ids=lambda a: "-".join(a),
)
def test_same_status_and_output_as_a_fresh_process(args: tuple[str, ...], tmp_path: Path) -> None:
    (tmp_path / "img.raw").write_bytes(bytes(1 << 20))
    fresh, forked = both(*args, cwd=tmp_path)
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        fresh.returncode,
        fresh.stdout,
        fresh.stderr,
    )


def test_the_callers_cwd_and_environment(tmp_path: Path) -> None:
    """A relative path is the caller's, and the environment is the call's, read after
    the fork by what the command imports then: here the daemon's state directory, and
    the daemon the CLI starts, which must not hold the call's output open."""
    forked = clifork.SERVER.run(["create", "new.qcow2", "--size", "1M"], tmp_path, None, 60)
    assert forked is not None and forked.returncode == 0, forked
    assert (tmp_path / "new.qcow2").stat().st_size > 0
    state = tmp_path / "state"
    env = {**os.environ, "TAPNBD_STATE_DIR": str(state)}
    forked = clifork.SERVER.run(["list"], None, env, 60)
    try:
        assert forked is not None and forked.returncode == 0, forked
        assert f"its log is {state / 'tapnbd.log'}" in forked.stderr
    finally:
        stopped = clifork.SERVER.run(["daemon", "stop"], None, env, 60)
    assert stopped is not None and "stopped the daemon" in stopped.stderr, stopped


def test_a_call_that_outlives_its_timeout_is_killed(tmp_path: Path) -> None:
    img = tmp_path / "img.raw"
    img.write_bytes(bytes(1 << 20))
    with pytest.raises(subprocess.TimeoutExpired):
        clifork.SERVER.run(["serve", str(img), "--socket", str(tmp_path / "s")], None, None, 1)
    # The server answers the next call: the killed child was reaped, the replies in step.
    forked = clifork.SERVER.run(["--version"], None, None, 60)
    assert forked is not None and forked.returncode == 0 and forked.stdout.startswith("tapnbd")


def test_the_server_holds_no_module_that_reads_the_environment() -> None:
    """Only the CLI's entry is imported before the fork: a module that reads the
    environment on import would give every child the server's values."""
    out = subprocess.run(
        [sys.executable, "-c", "import tapnbd.cli.app, tests.clifork as f; f.check_imports()"],
        capture_output=True,
        text=True,
        cwd=clifork.ROOT,
    )
    assert out.returncode == 0, out.stderr
