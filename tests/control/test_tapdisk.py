"""The data-path process on its own: started as the daemon starts it, served to a real
NBD client, recognised (or not) by pid, command line and token, hostile control lines
answered, and stopped with a flush. No root needed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import get_args

import msgspec
import pytest

from tapnbd.cli._server_opts import PollUsOpt
from tapnbd.control import tapctl, tapdisk
from tapnbd.control.attach import AttachError, cmdline, pid_alive
from tapnbd.control.messages import Attachment, Trust
from tapnbd.server.poll import POLL_US_MAX
from tests.helpers import need, qemu_io, run


@contextmanager
def spawned(poll_us: int = 0) -> Iterator[Attachment]:
    """A tapdisk on a 1 MiB raw image, started as the daemon starts one."""
    with spawned_proc(poll_us) as (a, _):
        yield a


@contextmanager
def spawned_proc(
    poll_us: int = 0, image: str = ""
) -> Iterator[tuple[Attachment, subprocess.Popen[bytes]]]:
    """``spawned``, with the process; on ``image`` if given."""
    base = Path(tempfile.mkdtemp(prefix="tnbd-tap-", dir="/tmp"))
    if not image:
        image = str(base / "disk.img")
        Path(image).write_bytes(bytes(1 << 20))
    a = Attachment(id="1", export="disk", image=image, via="fuse", read_only=False)
    (base / "tapdisk").mkdir()
    a.tapdisk_dir = str(base / "tapdisk" / "1")
    a.token = tapctl.new_token()
    proc, record = tapctl.spawn(
        a.tapdisk_dir,
        image=a.image,
        name=a.export,
        fmt="auto",
        read_only=False,
        stats=True,
        token=a.token,
        poll_us=poll_us,
    )
    a.tapdisk_pid = proc.pid
    a.format = record["format"]
    try:
        yield a, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for p in sorted(base.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() else p.rmdir()
        base.rmdir()


@pytest.fixture
def att() -> Iterator[Attachment]:
    with spawned() as a:
        yield a


def test_serves_records_and_stops(att: Attachment) -> None:
    need("qemu-io", "nbdinfo")
    assert att.format == "raw"  # detected, not "auto"
    record = json.loads((Path(att.tapdisk_dir) / "tapdisk.json").read_text())
    assert record["pid"] == att.tapdisk_pid and record["token"] == att.token
    assert record["image"] == att.image and record["socket"] == tapctl.nbd_socket(att)
    for name in ("nbd.sock", "ctl.sock", "tapdisk.json"):
        assert os.stat(Path(att.tapdisk_dir) / name).st_mode & 0o077 == 0, name

    uri = f"nbd+unix:///disk?socket={tapctl.nbd_socket(att)}"
    qemu_io(uri, "write -P 0x5c 64k 64k")
    info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    assert info["exports"][0]["export-size"] == 1 << 20
    assert att.image not in info["exports"][0].get("description", "")  # no paths leak

    att.device, att.mountdir = "/dev/loop9", "/somewhere"
    tapctl.tell_device(att)
    record = json.loads((Path(att.tapdisk_dir) / "tapdisk.json").read_text())
    assert (record["device"], record["mountdir"]) == ("/dev/loop9", "/somewhere")
    stats = tapctl.stats(att)
    assert stats["snapshot"]["ops"]["write"]["ops"] >= 1

    assert tapctl.why_not_ours(att) is None
    assert tapctl.stop(att, None, os.path.dirname(att.tapdisk_dir))  # flushed
    assert not pid_alive(att.tapdisk_pid)
    assert not os.path.exists(att.tapdisk_dir)
    with open(att.image, "rb") as f:
        f.seek(64 << 10)
        assert f.read(64 << 10) == b"\x5c" * (64 << 10)  # flushed to the file


def test_a_close_without_its_last_flush_is_reported_and_exits_1(tmp_path: Path) -> None:
    """A tapdisk whose image is an NBD upstream killed after a write cannot flush it:
    its "stop" says so (tapctl.stop is False) and it exits with status 1."""
    from tests.drivers.test_nbd_client import unix_uri, wait_for_socket

    need("nbdkit", "qemu-io")
    sock = tmp_path / "up.sock"
    up = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "memory", "16M"])
    try:
        wait_for_socket(sock, up)
        with spawned_proc(image=unix_uri(sock)) as (a, proc):
            qemu_io(f"nbd+unix:///disk?socket={tapctl.nbd_socket(a)}", "write -P 9 0 64k")
            up.kill()
            up.wait(10)
            assert not tapctl.stop(a, proc, os.path.dirname(a.tapdisk_dir))
            assert proc.returncode == 1
    finally:
        if up.poll() is None:
            up.kill()
        up.wait(10)


def test_only_our_tapdisk_is_recognised(att: Attachment) -> None:
    wrong_token = msgspec.structs.replace(att, token="0" * 32)
    assert "not the one recorded" in (tapctl.why_not_ours(wrong_token) or "")
    someone_else = msgspec.structs.replace(att, tapdisk_pid=os.getpid())
    assert "no longer its data path" in (tapctl.why_not_ours(someone_else) or "")
    other_dir = msgspec.structs.replace(att, tapdisk_dir=att.tapdisk_dir + "x")
    assert "no longer its data path" in (tapctl.why_not_ours(other_dir) or "")
    gone = msgspec.structs.replace(att, tapdisk_pid=0)
    assert tapctl.why_not_ours(gone) == "it has no data-path process"
    assert tapctl.why_not_ours(att) is None


def test_hostile_control_lines_get_errors(att: Attachment) -> None:
    def ask(line: bytes) -> dict[str, object]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(tapctl.control_socket(att))
            s.sendall(line)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        reply = json.loads(data)
        assert isinstance(reply, dict)
        return reply

    assert "error" in ask(b"[" * 3000 + b"\n")  # deep nesting: no RecursionError
    assert "error" in ask(b"x" * 10000 + b"\n")  # over-long
    assert "error" in ask(b'{"op": "format-disk"}\n')
    assert "error" in ask(b'{"op": "device", "device": 7}\n')
    assert "error" in ask(b'"status"\n')
    with pytest.raises(AttachError, match="unknown op"):
        tapctl.request(tapctl.control_socket(att), "nope")
    assert tapctl.why_not_ours(att) is None  # still serving


def test_poll_us_reaches_the_data_path_server() -> None:
    """``spawn(poll_us=...)`` puts --poll-us on the command line, and the tapdisk's
    NBD server takes it (its record reads it back from the server); it serves as ever."""
    need("qemu-io")
    with spawned(poll_us=50) as a:
        cmd = cmdline(a.tapdisk_pid)
        assert cmd[cmd.index("--poll-us") + 1] == "50", cmd
        record = json.loads((Path(a.tapdisk_dir) / "tapdisk.json").read_text())
        assert record["poll_us"] == 50
        uri = f"nbd+unix:///disk?socket={tapctl.nbd_socket(a)}"
        qemu_io(uri, "write -P 0xa7 0 256k", "flush")
        # One request at a time, each answered while the connection polls for the next.
        qemu_io(uri, *(f"read -P 0xa7 {i * 4}k 4k" for i in range(64)))
    # Off by default: no flag, and the server does not poll.
    with spawned() as a:
        assert "--poll-us" not in cmdline(a.tapdisk_pid)
        record = json.loads((Path(a.tapdisk_dir) / "tapdisk.json").read_text())
        assert record["poll_us"] == 0


@pytest.mark.parametrize("value", ["1001", "-1", "5us"])
def test_poll_us_out_of_range_is_refused(tmp_path: Path, value: str) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 16))
    cmd = [sys.executable, "-m", tapdisk.MODULE, str(tmp_path / "t"), "--image", str(image)]
    cmd += ["--name", "disk", "--token", "t", "--poll-us", value]
    proc = run(cmd, check=False, timeout=60)
    assert proc.returncode == 2, proc  # argparse's usage error, before anything opens
    assert "argument --poll-us:" in proc.stderr and value in proc.stderr, proc.stderr
    assert not (tmp_path / "t").exists()
    # The same bound as the CLI's (one constant, in tapnbd.server.poll).
    assert get_args(PollUsOpt)[1].max == POLL_US_MAX
    assert tapdisk.parse_args([*cmd[3:-1], "1000"]).poll_us == 1000


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("{bad", "JSON is malformed"),
        ('{"allow_probed_chain": 3}', "Expected `bool`, got `int` - at `$.allow_probed_chain`"),
        ('{"allow_everything": true}', "Object contains unknown field `allow_everything`"),
    ],
)
def test_a_bad_trust_word_is_refused(tmp_path: Path, value: str, error: str) -> None:
    """The daemon gives a tapdisk its trust options as one JSON word (messages.Trust):
    anything else is argparse's usage error, before the image opens."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 16))
    cmd = [sys.executable, "-m", tapdisk.MODULE, str(tmp_path / "t"), "--image", str(image)]
    cmd += ["--name", "disk", "--token", "t", "--trust", value]
    proc = run(cmd, check=False, timeout=60)
    assert proc.returncode == 2, proc
    assert f"argument --trust: {error}" in proc.stderr, proc.stderr
    assert not (tmp_path / "t").exists()
    trust = Trust(backing_format="qcow2", allow_remote_backing=True)
    argv = [*cmd[3:-2], *tapdisk.trust_argv(trust)]
    assert tapdisk.parse_args(argv).trust == trust
    assert tapdisk.trust_argv(Trust()) == []  # the defaults: the command line as it was
