"""The ring backend against a hostile frontend: its memory, its files, its xenstore.

The backend runs as the real ``tapnbd ring serve``; the attacks come from a frontend
in a child process (where it may crash itself) or from the test, which plays a
frontend that shares the vbd directory. Every test ends with the backend alive and a
well-behaved frontend doing I/O through it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tapnbd.xen.blkif import PROTOCOL
from tapnbd.xen.evtchn import UnboundPort, bind_interdomain, port_address
from tapnbd.xen.frontend import BlkFront
from tapnbd.xen.xenstore import XenbusState, XenStore, frontend_dir
from tests.helpers import ROOT, run, stop_process, tapnbd_cmd
from tests.xen.ringproc import RingFactory, RingServer

#: A frontend whose memory is a memfd without seals (as a plain file would be): once
#: connected, it queues writes, cuts its memory back to the ring page (so the data
#: pages are past the end of the file) and only then publishes the requests.
_SHRINKER = """
import os, sys
from tapnbd.xen.frontend import BlkFront, BlkFrontError
from tapnbd.xen.grant import GrantTable

class Unsealed(BlkFront):
    def _create_memory(self, nr_frames):
        return GrantTable.create(domid=self.domid, nr_frames=nr_frames, seals=0)

front = Unsealed(sys.argv[1], timeout=10)
try:
    front.connect()
except BlkFrontError as e:
    print("refused:", e, flush=True)
    sys.exit(0)
print("connected", flush=True)
front.write(0, b"x" * 4096)
ios = [front.submit_write(i * 65536, b"y" * 65536) for i in range(16)]
# Header, grant entries and the ring (frame 0) stay; every data page goes.
os.ftruncate(front.grants.fd, front.grants.frame_offset(1))
front.push()
print("truncated", flush=True)
front.wait(ios)
print("answered", [io.status for io in ios], flush=True)
"""


def pattern(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


def still_serves(backend: RingServer) -> None:
    """The backend process is alive, and a well-behaved frontend gets its data through."""
    assert backend.proc.poll() is None, backend.stderr()
    with BlkFront(backend.path) as front:
        front.write(8192, pattern(0x5A, 4096))
        assert front.read(8192, 4096) == pattern(0x5A, 4096)
    assert backend.proc.poll() is None, backend.stderr()


def test_frontend_memory_that_can_shrink_is_refused(ring: RingFactory) -> None:
    """Truncating the mapped memory must not kill the backend with SIGBUS.

    The backend takes only memory sealed against shrinking, so the frontend is refused
    at connect; had it been mapped, the truncation during I/O would be the crash.
    """
    backend = ring("ram:16M")
    child = subprocess.run(
        [sys.executable, "-c", _SHRINKER, str(backend.path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    rc = backend.proc.poll()
    assert rc is None, f"backend died ({rc}) after the child said {child.stdout!r}"
    assert child.stdout.startswith("refused:"), (child.stdout, child.stderr, backend.stderr())
    assert "not a memfd sealed with F_SEAL_SHRINK" in backend.stderr()
    backend.wait_state(XenbusState.CLOSED, XenbusState.INIT_WAIT)
    still_serves(backend)


# The vbd directory and xenstore.json.


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plant(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` at once, as a frontend rewriting the store would."""
    tmp = path.with_name(path.name + ".attack")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def refused_to_serve(path: Path, log: Path) -> str:
    """Run ``ring serve`` on ``path``, which must exit non-zero before it is ready."""
    with open(log, "w") as err:
        proc = subprocess.Popen(
            tapnbd_cmd("ring", "serve", "ram:1M", "--path", str(path), "--verbose"),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    assert proc.stdout is not None
    ready = proc.stdout.readline()  # the ready line, or "" when it exits
    if ready:
        stop_process(proc, signal.SIGTERM, 20)
    assert not ready, f"ring serve accepted {path}: {log.read_text()}"
    assert proc.wait(20) != 0
    return log.read_text()


def test_garbage_and_endless_xenstore_are_rejected(ring: RingFactory) -> None:
    """Each bad store is logged once and the backend goes on; memory stays bounded."""
    backend = ring("ram:16M")
    store = backend.path / "xenstore.json"
    good = store.read_bytes()
    status = tapnbd_cmd("ring", "status", "--path", str(backend.path))
    assert "backend /local/domain/0/backend/tap/1/51712: INIT_WAIT" in run(status).stdout
    attacks: list[tuple[str, bytes, str]] = [
        ("not JSON", b'{"/local/domain/1/x": ', "not JSON"),
        ("nested arrays", b"[" * 200_000, "not JSON"),
        ("nested objects", b'{"/a":' * 100_000, "not JSON"),
        ("a list", b'["/local/domain/1/device/vbd/51712/state", "3"]', "a JSON list"),
        ("a number value", b'{"/local/domain/1/device/vbd/51712/state": 3}', "value is a int"),
        ("a relative key", b'{"state": "3"}', "not an absolute path"),
        ("a huge value", json.dumps({"/local/x": "v" * 5000}).encode(), "longer than 4096"),
        (
            "too many keys",
            json.dumps({f"/k/{i}": "" for i in range(5000)}).encode(),
            "5000 keys",
        ),
    ]
    for n, (name, data, why) in enumerate(attacks, 1):
        plant(store, data)
        backend.wait_log("rejected", n)
        assert why in backend.stderr().splitlines()[-1], name
    # `ring status` says what is wrong rather than showing the last valid copy.
    shown = run(status, check=False)
    assert shown.returncode != 0 and "5000 keys, more than 4096" in shown.stderr, shown
    # Endless: a 256 MiB (sparse) file is never read to its end.
    with open(store.with_name("endless"), "wb") as f:
        f.truncate(256 << 20)
    os.replace(store.with_name("endless"), store)
    backend.wait_log("rejected", len(attacks) + 1)
    assert backend.peak_rss() < 128 << 20, backend.peak_rss()
    # A FIFO, which an open for reading would wait on forever.
    os.mkfifo(store.with_name("fifo"), 0o600)
    os.replace(store.with_name("fifo"), store)
    backend.wait_log("rejected", len(attacks) + 2)
    assert "is not a regular file" in backend.stderr().splitlines()[-1]
    plant(store, good)  # the vandal goes; a good frontend connects
    still_serves(backend)


def test_symlinked_store_at_closing_is_neither_read_nor_written_through(
    ring: RingFactory, tmp_path: Path
) -> None:
    """xenstore.json swapped for a symlink to a private file while the frontend closes.

    Following it would copy the private file's keys into the new store, and writing
    through it would change the private file.
    """
    backend = ring("ram:16M")
    store = backend.path / "xenstore.json"
    secret = tmp_path / "secret.json"
    front = BlkFront(backend.path).connect()
    front.write(0, pattern(1, 4096))
    keys = json.loads(store.read_bytes())
    keys[f"{front.fe}/state"] = str(int(XenbusState.CLOSING))
    keys["/local/domain/0/secret"] = "root-only"
    secret.write_text(json.dumps(keys))
    secret.chmod(0o600)
    before = sha256(secret)
    link = backend.path / "swap"
    link.symlink_to(secret)
    os.replace(link, store)
    # The frontend dies with the store swapped: the backend goes Closing and Closed.
    front.evtchn.close()
    front.grants.close()
    backend.wait_state(XenbusState.CLOSED)
    assert not store.is_symlink()
    assert store.stat().st_mode & 0o777 == 0o600
    assert "secret" not in store.read_text()
    assert sha256(secret) == before
    still_serves(backend)


def test_symlinks_at_temp_names_are_not_written_through(ring: RingFactory, tmp_path: Path) -> None:
    """The old temp name was DIR/xenstore.json.PID.tmp: a symlink there must not be used."""
    backend = ring("ram:16M")
    decoy = tmp_path / "decoy"
    decoy.write_bytes(b"precious\n")
    before = sha256(decoy)
    for name in (f"xenstore.json.{backend.proc.pid}.tmp", "xenstore.json.tmp"):
        (backend.path / name).symlink_to(decoy)
    still_serves(backend)  # the backend writes its states a few times
    backend.wait_state(XenbusState.CLOSED)
    assert sha256(decoy) == before
    assert not (backend.path / "xenstore.json").is_symlink()


def test_symlink_at_the_lock_is_refused(tmp_path: Path) -> None:
    """A dangling symlink at xenstore.lock must not make ``ring serve`` create its target."""
    vbd = tmp_path / "vbd"
    vbd.mkdir(mode=0o700)
    target = tmp_path / "created-by-the-backend"
    (vbd / "xenstore.lock").symlink_to(target)
    err = refused_to_serve(vbd, tmp_path / "ring.log")
    assert "xenstore.lock" in err
    assert not target.exists()


def test_vbd_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    vbd = tmp_path / "vbd"
    vbd.mkdir()
    vbd.chmod(0o777)
    err = refused_to_serve(vbd, tmp_path / "ring.log")
    assert str(vbd) in err
    assert os.listdir(vbd) == []


def test_vbd_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory away")
    vbd = tmp_path / "vbd"
    vbd.mkdir(mode=0o700)
    os.chown(vbd, 65534, 65534)  # nobody
    err = refused_to_serve(vbd, tmp_path / "ring.log")
    assert str(vbd) in err
    assert os.listdir(vbd) == []


def test_vbd_directory_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    vbd = tmp_path / "vbd"
    vbd.symlink_to(elsewhere)
    err = refused_to_serve(vbd, tmp_path / "ring.log")
    assert str(vbd) in err
    assert os.listdir(elsewhere) == []


def test_vbd_directory_is_made_private(ring: RingFactory) -> None:
    backend = ring("ram:1M")
    st = backend.path.stat()
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.geteuid()
    assert (backend.path / "xenstore.json").stat().st_mode & 0o777 == 0o600


# The event channel's abstract socket names are open to every local user.

#: Runs as another user: binds the name of a frontend's event channel port before the
#: frontend does, and waits for the backend to connect.
_SQUATTER = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1].encode("latin-1").replace(b"@", b"\\0", 1))
s.listen(1)
print("listening", flush=True)
conn, _ = s.accept()
print("bound by the backend", flush=True)
sys.stdin.read()
"""


def test_event_channel_bound_by_another_user_is_refused(ring: RingFactory) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    backend = ring("ram:16M")
    port = 4000
    address = port_address(backend.path, 1, port).replace("\0", "@", 1)
    squatter = subprocess.Popen(
        ["/usr/bin/python3", "-c", _SQUATTER, address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        user=65534,
        cwd="/",
    )
    try:
        assert squatter.stdout is not None
        assert squatter.stdout.readline() == "listening\n"
        # A frontend (of ours) names that port; the backend finds a stranger behind it.
        fe = frontend_dir(1, 51712)
        XenStore(backend.path).write_many(
            {
                f"{fe}/ring-ref": 8,
                f"{fe}/event-channel": port,
                f"{fe}/protocol": PROTOCOL,
                f"{fe}/state": int(XenbusState.INITIALISED),
            }
        )
        backend.wait_state(XenbusState.CLOSED)
        assert "event channel 4000 is bound by uid 65534, not ours" in backend.stderr()
    finally:
        assert squatter.stdin is not None
        squatter.stdin.close()
        squatter.wait(10)
    still_serves(backend)


def test_a_held_xenstore_lock_does_not_stall_the_backend(ring: RingFactory) -> None:
    """The lock is shared with the frontend, which may take it and never let go."""
    backend = ring("ram:16M")
    front = BlkFront(backend.path).connect()
    lock = os.open(backend.path / "xenstore.lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # The frontend dies while its lock is held: the backend's Closing must wait.
        front.evtchn.close()
        front.grants.close()
        backend.wait_log("frontend lost")
        backend.wait_log("xenstore write refused")
        assert "xenstore.lock held by another writer" in backend.stderr()
        assert backend.proc.poll() is None
    finally:
        os.close(lock)
    backend.wait_state(XenbusState.CLOSED)
    still_serves(backend)


_INTRUDER = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1].encode("latin-1").replace(b"@", b"\\0", 1))
print("connected", flush=True)
print("got", s.recv(1, socket.MSG_WAITALL), flush=True)
"""


def test_frontend_hands_its_memory_only_to_the_backend(tmp_path: Path) -> None:
    """Another user who connects to the frontend's port first gets nothing."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    vbd = tmp_path / "vbd"
    vbd.mkdir(mode=0o700)
    front = BlkFront(vbd, timeout=10)
    port = UnboundPort(vbd, 1, 0)
    address = port_address(vbd, 1, port.port).replace("\0", "@", 1)
    intruder = subprocess.Popen(
        ["/usr/bin/python3", "-c", _INTRUDER, address],
        stdout=subprocess.PIPE,
        text=True,
        user=65534,
        cwd="/",
    )
    backend = None
    try:
        assert intruder.stdout is not None
        assert intruder.stdout.readline() == "connected\n"
        backend = bind_interdomain(vbd, 1, port.port)  # the real backend, after it
        channel = front._accept_bind(port)
        assert channel.peer_uid == os.geteuid()
        channel.close()
        # The intruder's connection was closed without a byte (or a descriptor).
        assert intruder.stdout.readline() == "got b''\n"
    finally:
        port.close()
        if backend is not None:
            backend.close()
        intruder.wait(10)
