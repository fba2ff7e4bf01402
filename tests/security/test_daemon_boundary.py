"""The daemon's boundary against other local users, on the real path.

Another uid (made here with ``useradd``) tries what issue 12 found possible: reach an
export with qemu-io and nbdinfo over the daemon's unix socket and over TCP, and read
the metrics. The daemon's files are attacked by planting symlinks at every name it
opens, and by handing it a state directory someone else made or anyone can write.
Every attempt must be refused, and a decoy file outside the state directory must keep
its checksum (no file outside it changes).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.control.tap import Tapnbd
from tests.helpers import need, run, start_server, tapnbd_cmd

DECOY = b"the attacker wants this file overwritten\n"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def other() -> Iterator[tuple[int, int]]:
    """(uid, gid) of a user made for this module with useradd, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create another user and run commands as it")
    need("useradd", "userdel")
    name = f"tnbd{os.getpid()}"
    run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
    entry = pwd.getpwnam(name)
    try:
        yield entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)


def as_user(ids: tuple[int, int], *cmd: str) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` as the other user (no supplementary groups, no inherited env)."""
    uid, gid = ids
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp", "LANG": "C"}
    return subprocess.run(
        list(cmd),
        user=uid,
        group=gid,
        extra_groups=[],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def tap() -> Iterator[Tapnbd]:
    base = Path(tempfile.mkdtemp(prefix="tnbd-", dir="/tmp"))
    t = Tapnbd(base)
    try:
        yield t
    finally:
        os.chmod(base, 0o700)
        if t.state.is_symlink():
            t.state.unlink()
        elif t.state.is_dir():
            os.chmod(t.state, 0o700)
            for entry in t.state.iterdir():  # what a test planted
                if entry.is_symlink() or (entry.is_file() and entry.name.startswith("planted")):
                    entry.unlink()
        t.cleanup()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def decoy(tap: Tapnbd) -> Path:
    path = tap.base / "decoy"
    path.write_bytes(DECOY)
    return path


def unix_uri(tap: Tapnbd, name: str) -> str:
    return f"nbd+unix:///{name}?socket={tap.state}/nbd.sock"


# Other users cannot reach exports.


def test_other_user_cannot_reach_exports_by_unix_socket(
    tap: Tapnbd, other: tuple[int, int]
) -> None:
    need("qemu-io", "nbdinfo")
    image = tap.image("vm1.img", size="4M")
    before = sha(image)
    tap.ok("export", "add", str(image), "--name", "vm1")
    uri = unix_uri(tap, "vm1")
    # The owner gets in, and sees no image path in the description.
    listing = run(["nbdinfo", "--list", uri]).stdout
    assert "vm1" in listing and str(image) not in listing, listing

    assert (tap.state / "nbd.sock").stat().st_mode & 0o777 == 0o600
    write = ("qemu-io", "-f", "raw", "-c", "write -P 0x41 0 4k", uri)
    # The state directory is 0700: the other user cannot even reach the socket.
    assert as_user(other, "nbdinfo", "--list", uri).returncode != 0
    assert as_user(other, *write).returncode != 0
    # Opened up (directories 0711, socket 0666), SO_PEERCRED still refuses the peer.
    os.chmod(tap.base, 0o711)
    os.chmod(tap.state, 0o711)
    os.chmod(tap.state / "nbd.sock", 0o666)
    try:
        listed = as_user(other, "nbdinfo", "--list", uri)
        assert listed.returncode != 0 and "vm1" not in listed.stdout, listed
        wrote = as_user(other, *write)
        assert wrote.returncode != 0 or "failed" in wrote.stdout + wrote.stderr, wrote
    finally:
        os.chmod(tap.state / "nbd.sock", 0o600)
        os.chmod(tap.state, 0o700)
        os.chmod(tap.base, 0o700)
    assert "refused NBD connection from pid" in tap.log_tail()
    assert f", uid {other[0]}" in tap.log_tail()
    assert sha(image) == before
    run(["nbdinfo", "--list", uri])  # the owner still gets in


def test_paths_only_when_configured(tap: Tapnbd) -> None:
    need("nbdinfo")
    tap.ok("daemon", "start", "--expose-paths")
    image = tap.image("shown.img", size="1M")
    tap.ok("export", "add", str(image), "--name", "shown")
    assert str(image) in run(["nbdinfo", "--list", unix_uri(tap, "shown")]).stdout


def test_no_tcp_unless_asked(tap: Tapnbd, other: tuple[int, int]) -> None:
    need("nbdinfo")
    # TCP without TLS is refused up front, and names the way out.
    refused = tap.run("daemon", "start", "--tcp", "127.0.0.1:0")
    assert refused.returncode != 0
    assert "--tls-cert and --tls-key" in refused.stderr and "--insecure-tcp" in refused.stderr
    # attach's and list's autostart never listens on TCP.
    tap.ok("list")
    assert [ep for ep in tap.status()["listen"] if not ep.startswith("unix:")] == []
    tap.ok("daemon", "stop")
    # The explicit flag opens TCP to every local user, as its name says.
    tap.ok("daemon", "start", "--tcp", "127.0.0.1:0", "--insecure-tcp")
    tcp = [ep for ep in tap.status()["listen"] if ep.startswith("tcp:")]
    assert len(tcp) == 1, tcp
    tap.ok("export", "add", "ram:1M", "--name", "open")
    got = as_user(other, "nbdinfo", "--size", f"nbd://{tcp[0][4:]}/open")
    assert got.returncode == 0 and got.stdout.strip() == str(1 << 20), got
    assert "without TLS (--insecure-tcp)" in tap.log_tail()


def test_tcp_with_tls_keeps_other_users_out(tap: Tapnbd, other: tuple[int, int]) -> None:
    need("nbdinfo", "openssl")
    cert, key = tap.base / "cert.pem", tap.base / "key.pem"
    run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=localhost", "-keyout", str(key), "-out", str(cert)]
    )  # fmt: skip
    tap.ok(
        "daemon", "start", "--tcp", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key)
    )
    tcp = [ep for ep in tap.status()["listen"] if ep.startswith("tcp:")]
    uris = tap.ok("export", "add", "ram:1M", "--name", "sealed").split()
    assert uris and all(u.startswith("nbds") for u in uris), uris
    got = as_user(other, "nbdinfo", "--size", f"nbd://{tcp[0][4:]}/sealed")
    assert got.returncode != 0 and got.stdout.strip() != str(1 << 20), got


def test_metrics_are_private_and_pathless(tap: Tapnbd, other: tuple[int, int]) -> None:
    refused = tap.run("daemon", "start", "--metrics", "0.0.0.0:0")
    assert refused.returncode != 0 and "loopback" in refused.stderr
    sock_path = tap.base / "metrics.sock"
    tap.ok("daemon", "start", "--metrics", f"unix:{sock_path}")
    image = tap.image("secret-name.img", size="1M")
    tap.ok("export", "add", str(image), "--name", "m")
    assert sock_path.stat().st_mode & 0o777 == 0o600

    def scrape() -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(sock_path))
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.decode()

    text = scrape()
    assert 'tapnbd_connections{export="m"}' in text and str(image) not in text
    os.chmod(tap.base, 0o711)
    try:
        probe = (
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
            "s.sendall(b'GET /metrics HTTP/1.0\\r\\n\\r\\n'); print(s.recv(65536).decode())"
        )
        got = as_user(other, "/usr/bin/python3", "-c", probe, str(sock_path))
    finally:
        os.chmod(tap.base, 0o700)
    assert got.returncode != 0 and "Permission denied" in got.stderr, got


# The daemon's files cannot be hijacked.


def assert_refused(tap: Tapnbd, *, match: str) -> None:
    """Neither ``daemon start`` nor a command that autostarts gets a daemon going."""
    for args in (("daemon", "start"), ("list",)):
        proc = tap.run(*args)
        assert proc.returncode != 0, (args, proc.stdout, proc.stderr)
        assert re.search(match, proc.stderr), (args, proc.stderr)


@pytest.mark.parametrize("kind", ["foreign", "world-writable", "symlink"])
def test_unsafe_state_directory_refused(
    tap: Tapnbd, decoy: Path, other: tuple[int, int], kind: str
) -> None:
    before = sha(decoy)
    if kind == "symlink":
        target = tap.base / "theirs"
        target.mkdir(mode=0o700)
        tap.state.symlink_to(target)
        match = "is a symlink"
    else:
        tap.state.mkdir(mode=0o700)
        if kind == "foreign":
            os.chown(tap.state, *other)
            match = f"belongs to uid {other[0]}"
        else:
            os.chmod(tap.state, 0o777)
            match = r"is writable by others \(mode 0777\)"
    victim = tap.state / "tapnbd.log"
    if kind != "symlink":  # what the other user left in their directory
        victim.symlink_to(decoy)
    assert_refused(tap, match=f"{re.escape(str(tap.state))}: {match}")
    assert sha(decoy) == before
    assert not (tap.state / "control.sock").exists()
    if kind == "foreign":
        os.chown(tap.state, 0, 0)


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
@pytest.mark.parametrize("how", ["--state-dir", "TAPNBD_STATE_DIR"])
def test_state_directory_behind_another_users_symlink_refused(
    tap: Tapnbd, other: tuple[int, int], how: str, existing: bool
) -> None:
    """The audit's case: the other user's symlink vm1 -> our base (realpath base/st is
    fine), which they could later point at a directory of theirs. Refused by name
    before anything is made, through it or beside it; and a directory of ours already
    there is not cleaned up through it (its stale socket stays)."""
    link = tap.base / "vm1"
    link.symlink_to(tap.base)
    os.chown(link, *other, follow_symlinks=False)
    given = link / "st"
    if existing:
        (tap.base / "st").mkdir(mode=0o700)
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(str(tap.base / "st" / "control.sock"))
    match = re.escape(f"{given}: its parent {link} is a symlink belonging to uid {other[0]}")
    if how == "TAPNBD_STATE_DIR":
        tap.env["TAPNBD_STATE_DIR"] = str(given)
        assert_refused(tap, match=match)
    else:
        proc = tap.run("daemon", "start", "--state-dir", str(given))
        assert proc.returncode != 0, (proc.stdout, proc.stderr)
        assert re.search(match, proc.stderr), proc.stderr
    if existing:
        assert sorted(os.listdir(tap.base)) == ["st", "vm1"]
        assert os.listdir(tap.base / "st") == ["control.sock"]
    else:
        assert sorted(os.listdir(tap.base)) == ["vm1"]


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("tapnbd.pid", "tapnbd.pid: is a symlink"),
        ("tapnbd.log", "tapnbd.log: is a symlink"),
        ("state.json", "state.json: is a symlink"),
        ("attach.sock", "attach.sock: is a symlink"),
        ("nbd.sock", "nbd.sock: is a symlink"),
        ("control.sock", "control.sock: is a symlink"),
        ("attach", "attach: is a symlink"),
    ],
)
@pytest.mark.parametrize("dangling", [False, True], ids=["to-decoy", "dangling"])
def test_planted_symlink_refused(
    tap: Tapnbd, decoy: Path, name: str, match: str, dangling: bool
) -> None:
    tap.state.mkdir(mode=0o700)
    before = sha(decoy)
    target = tap.base / "would-be-created" if dangling else decoy
    (tap.state / name).symlink_to(target)
    assert_refused(tap, match=re.escape(match))
    assert sha(decoy) == before
    assert not (tap.base / "would-be-created").exists()
    assert (tap.state / name).is_symlink()  # left for the admin to see


def test_other_user_cannot_reach_a_data_path(tap: Tapnbd, other: tuple[int, int]) -> None:
    """An attachment's tapdisk serves its image on a socket of its own: 0600 and
    SO_PEERCRED checked, like the daemon's."""
    from tests.control.tap import need_devices

    need_devices()
    need("nbdinfo")
    device = tap.ok("attach", "ram:16M", "--via", "fuse").strip()
    assert device.startswith("/dev/")
    (tapdir,) = (tap.state / "tapdisk").iterdir()
    sock = tapdir / "nbd.sock"
    assert sock.stat().st_mode & 0o777 == 0o600
    uri = f"nbd+unix:///?socket={sock}"
    for d in (tap.base, tap.state, tap.state / "tapdisk", tapdir):
        os.chmod(d, 0o711)
    os.chmod(sock, 0o666)
    try:
        got = as_user(other, "nbdinfo", "--size", uri)
    finally:
        os.chmod(sock, 0o600)
        for d in (tapdir, tap.state / "tapdisk", tap.state, tap.base):
            os.chmod(d, 0o700)
    assert got.returncode != 0 and got.stdout.strip() != str(16 << 20), got
    assert run(["nbdinfo", "--size", uri]).stdout.strip() == str(16 << 20)
    assert "refused NBD connection from pid" in (tapdir / "tapdisk.log").read_text()
    tap.ok("detach", device)


def test_predictable_temp_names_are_not_used(tap: Tapnbd, decoy: Path) -> None:
    """state.json used to be written through state.json.PID.tmp; planting that name (for
    every pid the daemon could get) must not redirect the write."""
    tap.state.mkdir(mode=0o700)
    before = sha(decoy)
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(300, min(pid_max, 300 + 2000)):
        (tap.state / f"state.json.{pid}.tmp").symlink_to(decoy)
    (tap.state / "state.json.tmp").symlink_to(decoy)
    tap.ok("export", "add", "ram:1M", "--name", "t")
    assert sha(decoy) == before
    assert b'"name": "t"' in (tap.state / "state.json").read_bytes()
    assert not (tap.state / "state.json").is_symlink()


# serve --pidfile.


def test_serve_pidfile_refuses_what_it_did_not_make(tap: Tapnbd, decoy: Path) -> None:
    before = sha(decoy)
    pidfile = tap.base / "serve.pid"
    sock = tap.base / "s.sock"

    def serve() -> subprocess.CompletedProcess[str]:
        cmd = tapnbd_cmd("serve", "ram:1M", "--socket", str(sock), "--pidfile", str(pidfile))
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)

    pidfile.symlink_to(decoy)
    proc = serve()
    assert proc.returncode != 0 and "serve.pid: is a symlink" in proc.stderr, proc.stderr
    assert sha(decoy) == before and pidfile.is_symlink()
    pidfile.unlink()

    pidfile.write_text("1\n")  # a live process's: not ours to replace or delete
    proc = serve()
    assert proc.returncode != 0 and "pid 1 is running" in proc.stderr, proc.stderr
    assert pidfile.read_text() == "1\n"

    # A stale pidfile of ours is replaced, and removed on exit.
    pidfile.write_text("4000000\n")  # above any pid_max: no such process
    server = start_server(
        ["ram:1M", "--socket", str(sock), "--pidfile", str(pidfile)], tap.base / "serve.log"
    )
    try:
        assert pidfile.read_text() == f"{server.proc.pid}\n"
    finally:
        assert server.stop() == 0
    assert not pidfile.exists()


async def test_listener_never_removes_what_is_not_a_socket(tmp_path: Path) -> None:
    """Connecting to a regular file is refused just as to a dead socket; the listener
    must not take that for a stale socket and unlink the file."""
    from tapnbd.server.exports import ExportRegistry
    from tapnbd.server.listener import NBDServer

    victim = tmp_path / "precious"
    victim.write_bytes(DECOY)
    link = tmp_path / "link.sock"
    link.symlink_to(victim)
    server = NBDServer(ExportRegistry())
    for path in (victim, link):
        with pytest.raises(OSError, match="not a socket"):
            await server.listen_unix(str(path), mode=0o600)
    assert victim.read_bytes() == DECOY and link.is_symlink()
    await server.shutdown()


IMPOSTOR = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(4)
print("ready", flush=True)
got = b""
s.settimeout(30)
try:
    while True:
        c, _ = s.accept()
        c.settimeout(2)
        try:
            # Answer as a daemon would, then report what the client sent.
            c.sendall(b'{"type":"list_reply","exports":[],"attachments":[]}\n')
            got += c.recv(65536)
        except OSError:
            pass
        c.close()
        print(repr(got), flush=True)
except OSError:
    pass
"""


def test_client_refuses_a_daemon_of_another_user(tap: Tapnbd, other: tuple[int, int]) -> None:
    """A control socket swapped for another user's: the client checks the daemon's
    SO_PEERCRED before it sends anything, so root's CLI never talks to the impostor."""
    theirs = tap.base / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, *other)
    os.chmod(tap.base, 0o711)
    uid, gid = other
    impostor = subprocess.Popen(
        ["/usr/bin/python3", "-c", IMPOSTOR, str(theirs / "control.sock")],
        user=uid,
        group=gid,
        extra_groups=[],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert impostor.stdout is not None
        assert impostor.stdout.readline().strip() == "ready"
        tap.state.mkdir(mode=0o700)
        # The same socket, now at the daemon's name in our own directory.
        os.rename(theirs / "control.sock", tap.state / "control.sock")
        proc = tap.run("list")
        assert proc.returncode != 0
        assert f"control.sock belongs to uid {uid}, not to us or root" in proc.stderr
        got = impostor.stdout.readline().strip()
        assert got == "b''", f"the impostor was sent {got}"
    finally:
        impostor.kill()
        impostor.wait()
        (tap.state / "control.sock").unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (
            b'{"version":1,"exports":[{"name":"x","image":"/x","format":"raw","read_only":"no"}]}',
            r"Expected `bool`, got `str` - at `\$.exports\[0\].read_only`",
        ),
        (b'{"version":1,"exports":[],"attachments":[],"extra":1}', "unknown field `extra`"),
        (b'{"version":1,"exports":' + b"[" * 100_000, "malformed state file"),
        (None, "larger than 16777216 bytes"),
    ],
    ids=["wrong-type", "unknown-field", "deep", "huge"],
)
def test_corrupt_state_file_named(tap: Tapnbd, content: bytes | None, match: str) -> None:
    """A state file that is not ours to trust stops the daemon with the field at fault."""
    tap.state.mkdir(mode=0o700)
    path = tap.state / "state.json"
    if content is None:
        with open(path, "wb") as f:
            f.truncate((16 << 20) + 1)  # sparse: costs no disk
    else:
        path.write_bytes(content)
    proc = tap.run("daemon", "start")
    assert proc.returncode != 0
    assert re.search(match, proc.stderr + tap.log_tail()), proc.stderr + tap.log_tail()
