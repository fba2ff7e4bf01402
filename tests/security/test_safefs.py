"""tapnbd.safefs: planted symlinks, other users' and world-writable directories, FIFOs,
hard links and stale pidfiles are each refused or handled, and decoys never change."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tapnbd.safefs import (
    UnsafePathError,
    atomic_write,
    check_private_path,
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


def theirs_symlink(link: Path, target: Path) -> Path:
    """``link`` -> ``target``, the symlink itself owned by nobody (as if they made it)."""
    link.symlink_to(target)
    os.chown(link, NOBODY, NOBODY, follow_symlinks=False)
    return link


def sticky_dir(path: Path) -> Path:
    """A /tmp-like directory: root's, mode 1777."""
    path.mkdir()
    path.chmod(0o1777)
    return path


@pytest.mark.parametrize("points_to", ["sticky", "ours", "missing"])
def test_private_dir_refuses_another_users_symlink_on_the_way(
    tmp_path: Path, points_to: str
) -> None:
    """The audit's case: nobody's /tmp/vm1 -> /tmp, so realpath(/tmp/vm1/vbd) is /tmp/vbd,
    whose parents are all fine; nobody can later point vm1 at a directory of theirs."""
    need_root()
    if points_to == "sticky":
        target = sticky_dir(tmp_path / "tmp")
        link = theirs_symlink(target / "vm1", target)
    elif points_to == "ours":
        target = tmp_path / "real"
        target.mkdir(mode=0o700)
        link = theirs_symlink(tmp_path / "vm1", target)
    else:
        target = tmp_path / "real"
        link = theirs_symlink(tmp_path / "vm1", target)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(
        UnsafePathError,
        match=f"its parent {re.escape(str(link))} is a symlink belonging to uid {NOBODY}",
    ):
        ensure_private_dir(str(link / "vbd"))
    # Nothing made, here or through the symlink, and not for missing parents either.
    with pytest.raises(UnsafePathError, match=f"{re.escape(str(link))} is a symlink"):
        ensure_private_dir(str(link / "a" / "b" / "vbd"))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    # A client checking an existing directory through it is refused the same way.
    if points_to == "ours":
        (target / "vbd").mkdir(mode=0o700)
        with pytest.raises(UnsafePathError, match=f"uid {NOBODY}"):
            check_private_path(str(link / "vbd"))
        assert check_private_path(str(target / "vbd"))


def test_private_dir_through_a_root_symlink(tmp_path: Path) -> None:
    """A symlink of root's (or ours) to a good directory is fine, as /var/run -> /run;
    relative targets and chains of them too."""
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    var = tmp_path / "var"
    var.mkdir(mode=0o755)
    (var / "run").symlink_to("../run")
    (tmp_path / "alias").symlink_to(var / "run")
    for given in (var / "run" / "tapnbd", tmp_path / "alias" / "tapnbd"):
        ensure_private_dir(str(given))
        assert check_private_path(str(given))
    st = (run / "tapnbd").lstat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o700, os.geteuid())
    # Missing parents behind it are made 0700, ours.
    ensure_private_dir(str(tmp_path / "alias" / "a" / "b" / "state"))
    for made in (run / "a", run / "a" / "b", run / "a" / "b" / "state"):
        st = made.lstat()
        assert (stat.S_ISDIR(st.st_mode), st.st_mode & 0o777, st.st_uid) == (
            True,
            0o700,
            os.geteuid(),
        )
    assert not check_private_path(str(tmp_path / "alias" / "nothing" / "here"))


def test_private_dir_checks_a_root_symlinks_target_chain(tmp_path: Path) -> None:
    """A symlink of ours is followed, and where it leads is checked as strictly: through
    a directory of nobody's, or nobody's symlink further on, it is refused."""
    need_root()
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    (theirs / "run").mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    (tmp_path / "via").symlink_to(theirs / "run")
    with pytest.raises(
        UnsafePathError, match=f"its parent {re.escape(str(theirs))} belongs to uid"
    ):
        ensure_private_dir(str(tmp_path / "via" / "x" / "state"))
    assert os.listdir(theirs / "run") == []

    good = tmp_path / "good"
    good.mkdir(mode=0o755)
    hop = theirs_symlink(good / "hop", good)
    (tmp_path / "chain").symlink_to(hop)
    with pytest.raises(UnsafePathError, match=f"{re.escape(str(hop))} is a symlink belonging"):
        ensure_private_dir(str(tmp_path / "chain" / "state"))
    assert sorted(os.listdir(good)) == ["hop"]


def test_private_dir_refuses_writable_parent_without_sticky(tmp_path: Path) -> None:
    """A directory anyone may write to is refused on the way, even behind a symlink of
    ours; a sticky one (as /tmp) is not."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (tmp_path / "link").symlink_to(shared)
    with pytest.raises(UnsafePathError, match=r"its parent .*shared is writable by others"):
        ensure_private_dir(str(tmp_path / "link" / "state"))
    assert os.listdir(shared) == []
    sticky = sticky_dir(tmp_path / "sticky")
    ensure_private_dir(str(sticky / "state"))


def test_private_dir_refuses_symlink_loops(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(UnsafePathError, match="too many levels of symlinks"):
        ensure_private_dir(str(tmp_path / "a" / "state"))


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
