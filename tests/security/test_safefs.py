"""tapnbd.safefs: planted symlinks, other users' and world-writable directories, FIFOs,
hard links and stale pidfiles are each refused or handled, and decoys never change."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tapnbd.safefs import (
    UnsafePathError,
    atomic_write,
    ensure_private_dir,
    open_private,
    read_capped,
    remove_pidfile,
    write_pidfile,
)

NOBODY = 65534


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown files to another uid")


@pytest.fixture
def decoy(tmp_path: Path) -> Path:
    """A file an attacker would like us to overwrite; its digest must never change."""
    path = tmp_path / "decoy"
    path.write_bytes(b"precious\n")
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ensure_private_dir


def test_private_dir_is_made_0700(tmp_path: Path) -> None:
    d = tmp_path / "state"
    ensure_private_dir(str(d))
    st = d.lstat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o700, os.geteuid())
    ensure_private_dir(str(d))  # an existing one of ours is fine


def test_private_dir_refuses_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "state").symlink_to(target)
    with pytest.raises(UnsafePathError, match="state: is a symlink"):
        ensure_private_dir(str(tmp_path / "state"))


def test_private_dir_refuses_world_writable(tmp_path: Path) -> None:
    d = tmp_path / "state"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(UnsafePathError, match=r"writable by others \(mode 0777\)"):
        ensure_private_dir(str(d))


def test_private_dir_refuses_foreign_owner(tmp_path: Path) -> None:
    need_root()
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match=f"belongs to uid {NOBODY}"):
        ensure_private_dir(str(d))


def test_private_dir_refuses_swappable_parent(tmp_path: Path) -> None:
    need_root()
    parent = tmp_path / "theirs"
    parent.mkdir(mode=0o755)
    os.chown(parent, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match=r"its parent .*theirs belongs to uid"):
        ensure_private_dir(str(parent / "state"))
    assert not (parent / "state").exists()


def test_private_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    with pytest.raises(UnsafePathError, match="not a directory"):
        ensure_private_dir(str(tmp_path / "state"))


# open_private


def test_open_private_refuses_symlink(tmp_path: Path, decoy: Path) -> None:
    before = digest(decoy)
    (tmp_path / "log").symlink_to(decoy)
    with pytest.raises(UnsafePathError, match="log: is a symlink"):
        open_private(str(tmp_path / "log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    assert digest(decoy) == before


def test_open_private_refuses_dangling_symlink(tmp_path: Path) -> None:
    (tmp_path / "log").symlink_to(tmp_path / "created-by-root")
    with pytest.raises(UnsafePathError, match="is a symlink"):
        open_private(str(tmp_path / "log"), os.O_WRONLY | os.O_CREAT)
    assert not (tmp_path / "created-by-root").exists()


def test_open_private_refuses_fifo_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "log")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        open_private(str(tmp_path / "log"), os.O_RDONLY)
    with pytest.raises(UnsafePathError, match="not a regular file"):
        open_private(str(tmp_path / "log"), os.O_WRONLY)


def test_open_private_refuses_hard_link(tmp_path: Path, decoy: Path) -> None:
    os.link(decoy, tmp_path / "log")
    with pytest.raises(UnsafePathError, match="2 hard links"):
        open_private(str(tmp_path / "log"), os.O_WRONLY | os.O_APPEND)


def test_open_private_refuses_foreign_file(tmp_path: Path) -> None:
    need_root()
    (tmp_path / "log").write_text("theirs\n")
    os.chown(tmp_path / "log", NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match=f"belongs to uid {NOBODY}"):
        open_private(str(tmp_path / "log"), os.O_WRONLY | os.O_APPEND)


def test_open_private_gives_a_blocking_cloexec_fd(tmp_path: Path) -> None:
    import fcntl

    fd = open_private(str(tmp_path / "log"), os.O_WRONLY | os.O_CREAT)
    try:
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.fstat(fd).st_mode & 0o777 == 0o600
    finally:
        os.close(fd)


# read_capped


def test_read_capped(tmp_path: Path, decoy: Path) -> None:
    f = tmp_path / "state.json"
    f.write_bytes(b"x" * 100)
    assert read_capped(str(f), 100) == b"x" * 100
    with pytest.raises(UnsafePathError, match="larger than 99 bytes"):
        read_capped(str(f), 99)
    f.unlink()
    f.symlink_to(decoy)
    with pytest.raises(UnsafePathError, match="is a symlink"):
        read_capped(str(f), 100)


# atomic_write


def test_atomic_write_replaces_a_symlink_not_its_target(tmp_path: Path, decoy: Path) -> None:
    before = digest(decoy)
    target = tmp_path / "state.json"
    target.symlink_to(decoy)
    atomic_write(str(target), b"{}\n")
    assert not target.is_symlink()
    assert target.read_bytes() == b"{}\n"
    assert target.stat().st_mode & 0o777 == 0o600
    assert digest(decoy) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_atomic_write_temp_names_are_unpredictable(tmp_path: Path, decoy: Path) -> None:
    """The old name (state.json.PID.tmp) could be planted in advance; ours cannot."""
    before = digest(decoy)
    (tmp_path / f"state.json.{os.getpid()}.tmp").symlink_to(decoy)
    atomic_write(str(tmp_path / "state.json"), b"new\n")
    assert digest(decoy) == before


# pidfiles


def test_pidfile_created_and_removed(tmp_path: Path) -> None:
    pidfile = tmp_path / "serve.pid"
    write_pidfile(str(pidfile))
    assert pidfile.read_text() == f"{os.getpid()}\n"
    assert remove_pidfile(str(pidfile))
    assert not pidfile.exists()


def test_pidfile_refuses_symlink(tmp_path: Path, decoy: Path) -> None:
    before = digest(decoy)
    (tmp_path / "serve.pid").symlink_to(decoy)
    with pytest.raises(UnsafePathError, match="is a symlink"):
        write_pidfile(str(tmp_path / "serve.pid"))
    assert not remove_pidfile(str(tmp_path / "serve.pid"))
    assert digest(decoy) == before
    assert (tmp_path / "serve.pid").is_symlink()


def test_pidfile_refuses_live_pid_and_garbage(tmp_path: Path) -> None:
    pidfile = tmp_path / "serve.pid"
    pidfile.write_text("1\n")  # init is alive
    with pytest.raises(UnsafePathError, match="pid 1 is running"):
        write_pidfile(str(pidfile))
    pidfile.write_text("not a pid\n")
    with pytest.raises(UnsafePathError, match="holds no pid"):
        write_pidfile(str(pidfile))
    assert pidfile.read_text() == "not a pid\n"
    assert not remove_pidfile(str(pidfile))  # not our pid: left alone
    assert pidfile.exists()


def test_pidfile_replaces_stale_pid_of_ours(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pidfile = tmp_path / "serve.pid"
    pidfile.write_text(dead.stdout)
    write_pidfile(str(pidfile))
    assert pidfile.read_text() == f"{os.getpid()}\n"


def test_pidfile_refuses_stale_pid_of_another_user(tmp_path: Path) -> None:
    need_root()
    pidfile = tmp_path / "serve.pid"
    pidfile.write_text("4000000\n")
    os.chown(pidfile, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match=f"belongs to uid {NOBODY}"):
        write_pidfile(str(pidfile))
