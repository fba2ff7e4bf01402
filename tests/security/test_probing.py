"""Probing never follows guest data (issue 11; qemu's CVE-2008-2004 class).

The attack: a guest writes a QCOW header naming a host file as its backing file into
sector 0 of its raw disk. Online, the write is refused (EPERM) while the image was
probed as raw; offline (the bytes planted by another tool, or written while the admin
served it with --format raw), no later open without a format reads the host file.
The host file here is a temp file holding a known secret.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from formats.qcow.create import create_qcow
from tests.control.tap import Tapnbd, need_devices
from tests.helpers import nbdsh_script, qemu_io, run, start_server, tapnbd_cmd

MiB = 1 << 20
SECRET = b"TOPSECRET-host-bytes-7f3a9c"

#: libnbd: write argv[2]'s bytes at offset argv[3]; print "ok" or the errno's name.
PWRITE = """
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
data = open(sys.argv[2], "rb").read()
try:
    h.pwrite(data, int(sys.argv[3]))
    err = "ok"
except nbd.Error as e:
    err = e.errno  # libnbd gives the name, e.g. "EPERM"
h.shutdown()
print(json.dumps(err))
"""


async def evil_sector(tmp: Path) -> bytes:
    """The first sector of a QCOW image whose backing file is the secret (a raw file)."""
    secret = tmp / "secret"
    secret.write_bytes(SECRET * 100)
    evil = tmp / "evil.qcow"
    await create_qcow(str(evil), 1 * MiB, backing=str(secret), backing_format="raw")
    head = evil.read_bytes()[:512]
    assert str(secret).encode() in head  # the backing name sits in sector 0
    return head


def raw_disk(tmp: Path, head: bytes = b"") -> Path:
    disk = tmp / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(4 * MiB)
        f.write(head)
    return disk


def guest_write(uri: str, tmp: Path, data: bytes, offset: int) -> str:
    payload = tmp / f"payload-{offset}-{len(data)}"
    payload.write_bytes(data)
    result = nbdsh_script(PWRITE, uri, str(payload), str(offset))
    assert isinstance(result, str)
    return result


async def test_guest_cannot_turn_probed_raw_into_qcow(tmp_path: Path) -> None:
    """A write of a QCOW header into sector 0 of a probed raw disk gets EPERM."""
    head = await evil_sector(tmp_path)
    disk = raw_disk(tmp_path)
    server = start_server([str(disk)], tmp_path / "serve.log")
    try:
        # Harmless writes to sector 0 still work, and the header is fine elsewhere.
        assert guest_write(server.uri, tmp_path, b"\xeb\x63\x90" + bytes(509), 0) == "ok"
        assert guest_write(server.uri, tmp_path, head, 1 * MiB) == "ok"
        assert guest_write(server.uri, tmp_path, head, 0) == "EPERM"
        # In pieces: the version first is harmless, then the magic would complete it.
        assert guest_write(server.uri, tmp_path, head[4:], 4) == "ok"
        assert guest_write(server.uri, tmp_path, head[:4], 0) == "EPERM"
        # Unaligned, inside the sector.
        assert guest_write(server.uri, tmp_path, head[:8], 0) == "EPERM"
        # WRITEs of the size the server splices (tests/server/test_splice.py): checked
        # when they touch the sector, and written when they start just past it.
        assert guest_write(server.uri, tmp_path, head + bytes(MiB - 512), 0) == "EPERM"
        assert guest_write(server.uri, tmp_path, bytes(MiB // 4), 512) == "ok"
        qemu_io(server.uri, "write -z 0 4k")  # zeroing sector 0 leaves it raw: allowed
    finally:
        server.stop()
    log = server.stderr()
    assert "probed as raw" in log and "would probe as qcow" in log, log
    data = disk.read_bytes()
    assert data[:4096] == bytes(4096)
    assert data[1 * MiB : 1 * MiB + 512] == head
    assert run(tapnbd_cmd("info", "--json", str(disk))).stdout.count('"format": "raw"') == 1


async def test_explicit_raw_lifts_the_guard(tmp_path: Path) -> None:
    head = await evil_sector(tmp_path)
    disk = raw_disk(tmp_path)
    server = start_server([str(disk), "--format", "raw"], tmp_path / "serve.log")
    try:
        assert guest_write(server.uri, tmp_path, head, 0) == "ok"
    finally:
        server.stop()
    assert disk.read_bytes()[:512] == head


def secret_absent(*texts: str | bytes) -> None:
    for t in texts:
        raw = t.encode() if isinstance(t, str) else t
        assert SECRET not in raw and SECRET[:12] not in raw


REFUSED = "was probed, not given"


@pytest.mark.parametrize("path", ["serve", "info", "info-json", "convert", "ring-serve"])
async def test_planted_header_never_reads_the_host_file(tmp_path: Path, path: str) -> None:
    """The header planted offline: every open without a format refuses its backing file."""
    disk = raw_disk(tmp_path, await evil_sector(tmp_path))
    out = tmp_path / "out.raw"
    cmd = {
        "serve": ["serve", str(disk), "--port", "0"],
        "info": ["info", str(disk)],
        "info-json": ["info", "--json", str(disk)],
        "convert": ["convert", "-q", "-O", "raw", str(disk), str(out)],
        "ring-serve": ["ring", "serve", str(disk), "--path", str(tmp_path / "vbd")],
    }[path]
    # A timeout only against hangs: each of these must fail at open.
    proc = run(tapnbd_cmd(*cmd), check=False, timeout=60)
    assert proc.returncode != 0, proc.stdout
    assert REFUSED in proc.stderr and "backing file" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    secret_absent(proc.stdout, proc.stderr)
    if out.exists():
        secret_absent(out.read_bytes())


async def test_planted_header_through_the_daemon(tap: Tapnbd) -> None:
    """``export add`` in auto mode refuses the planted image; a clean raw one is stored
    as "raw" in the state (never "auto", so a restore does not probe again), and its
    guest still cannot write the header."""
    head = await evil_sector(tap.base)
    planted = raw_disk(tap.base, head)
    err = tap.fails("export", "add", str(planted))
    assert REFUSED in err, err
    secret_absent(err, tap.log_tail())

    clean = tap.base / "clean.img"
    with open(clean, "wb") as f:
        f.truncate(4 * MiB)
    uris = tap.ok("export", "add", str(clean))
    state = json.loads((tap.state / "state.json").read_text())
    (entry,) = state["exports"]
    assert entry["format"] == "raw", entry
    uri = next(u for u in uris.split() if u.startswith("nbd"))
    assert guest_write(uri, tap.base, head, 0) == "EPERM"
    assert clean.read_bytes()[:512] == bytes(512)
    assert "would probe as qcow" in tap.log_tail()

    # A FIFO as a backing file: refused at once, and the daemon keeps serving.
    fifo = tap.base / "fifo"
    os.mkfifo(fifo)
    over = make_overlay(tap.base, fifo)
    err = tap.fails("export", "add", "-f", "qcow", str(over))
    assert "is a FIFO" in err, err
    qemu_io(uri, "read -P 0 0 4k")


async def test_probed_raw_stays_guarded_after_a_restart_and_in_a_device(tap: Tapnbd) -> None:
    """The daemon records a probed raw export as "raw" so that it never probes the
    guest's bytes again; the record also says it was probed, so neither the export a
    restart restores nor a device's data path attached to it (which both open it as
    "raw") lets the guest write the header. (Both took it as the admin's --format raw.)"""
    head = await evil_sector(tap.base)
    clean = tap.base / "clean.img"
    with open(clean, "wb") as f:
        f.truncate(4 * MiB)
    uri = next(u for u in tap.ok("export", "add", str(clean)).split() if u.startswith("nbd"))
    given = tap.base / "given.img"
    with open(given, "wb") as f:
        f.truncate(4 * MiB)
    tap.ok("export", "add", "-f", "raw", str(given))
    state = json.loads((tap.state / "state.json").read_text())
    by_image = {e["image"]: e for e in state["exports"]}
    assert by_image[str(clean)]["format"] == "raw" and by_image[str(clean)]["probed_raw"]
    assert not by_image[str(given)]["probed_raw"]
    assert tap.run("daemon", "stop").returncode == 0
    assert "restored export" in tap.run("list").stderr
    assert guest_write(uri, tap.base, head, 0) == "EPERM"
    tap.ok("attach", "clean.img", "--via", "socket")
    (att,) = tap.list()["attachments"]
    assert (
        guest_write(f"nbd+unix:///clean.img?socket={att['device']}", tap.base, head, 0) == "EPERM"
    )
    assert clean.read_bytes()[:512] == bytes(512)
    assert "would probe as qcow" in tap.log_tail()
    tap.ok("detach", "clean.img")
    # The admin's --format raw is no guess: the guard stays off after a restart.
    given_uri = f"nbd+unix:///given.img?socket={tap.state / 'nbd.sock'}"
    assert guest_write(given_uri, tap.base, head, 0) == "ok"


async def test_a_state_file_that_does_not_say_restores_raw_guarded(tap: Tapnbd) -> None:
    """A state file written before the daemon recorded ``probed_raw`` cannot tell a
    probed raw export from one the admin gave as raw: it is restored guarded, so a
    guest of a probed one cannot write a header into sector 0 after the upgrade."""
    head = await evil_sector(tap.base)
    disk = tap.base / "old.img"
    with open(disk, "wb") as f:
        f.truncate(4 * MiB)
    uri = next(u for u in tap.ok("export", "add", str(disk)).split() if u.startswith("nbd"))
    assert tap.run("daemon", "stop").returncode == 0
    path = tap.state / "state.json"
    state = json.loads(path.read_text())
    for entry in state["exports"]:
        del entry["probed_raw"]  # as the daemon of session 31 wrote it
    path.write_text(json.dumps(state))
    assert "restored export" in tap.run("list").stderr
    assert guest_write(uri, tap.base, head, 0) == "EPERM"
    assert disk.read_bytes()[:512] == bytes(512)


async def test_planted_header_through_attach(tap: Tapnbd) -> None:
    """``attach`` makes its export through the same open: refused, no device made."""
    need_devices()
    planted = raw_disk(tap.base, await evil_sector(tap.base))
    err = tap.fails("attach", str(planted))
    assert REFUSED in err, err
    secret_absent(err, tap.log_tail())
    assert tap.list()["attachments"] == []


async def test_probed_backing_may_not_name_a_backing_file(tmp_path: Path) -> None:
    """base.raw <- mid.qcow <- top.qcow: mid is probed unless --backing-format says."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"B" * MiB)
    mid, top = tmp_path / "mid.qcow", tmp_path / "top.qcow"
    await create_qcow(str(mid), backing=str(base), backing_format="raw")
    await create_qcow(str(top), backing=str(mid), backing_format="qcow")
    # top probed: its backing name is not followed at all.
    proc = run(tapnbd_cmd("info", str(top)), check=False)
    assert proc.returncode == 1 and REFUSED in proc.stderr, proc.stderr
    # top given: mid is probed, and a probed backing file may not name one.
    proc = run(tapnbd_cmd("info", "-f", "qcow", str(top)), check=False)
    assert proc.returncode == 1, proc.stdout
    assert f"the format of {mid} was probed" in proc.stderr, proc.stderr
    # The admin names the formats, or vouches for the chain: both open it.
    for extra in (["-f", "qcow", "-F", "qcow"], ["--allow-probed-backing-chain"]):
        info = json.loads(run(tapnbd_cmd("info", "--json", *extra, str(top))).stdout)
        assert info["backing-image"]["backing-image"]["format"] == "raw"
    server = start_server(
        [str(top), "-f", "qcow", "--backing-format", "qcow"],
        tmp_path / "s.log",
    )
    try:
        qemu_io(server.uri, "read -P 0x42 0 1M")
    finally:
        server.stop()


async def test_the_daemon_takes_the_chain_options(tap: Tapnbd) -> None:
    """``export add`` and ``attach`` refuse the probed chain as the tools do, and take
    the admin's -F and --allow-probed-backing-chain as the tools do; a device's data
    path on the export opens the chain by the export's options."""
    base = tap.base / "base.raw"
    base.write_bytes(b"B" * MiB)
    mid, top = tap.base / "mid.qcow", tap.base / "top.qcow"
    await create_qcow(str(mid), backing=str(base), backing_format="raw")
    await create_qcow(str(top), backing=str(mid), backing_format="qcow")
    for cmd in (["export", "add"], ["attach", "--via", "socket"]):
        err = tap.fails(*cmd, "-f", "qcow", str(top))
        assert f"the format of {mid} was probed" in err, err
    assert tap.list()["exports"] == [] and tap.list()["attachments"] == []
    for extra in (["-F", "qcow"], ["--allow-probed-backing-chain"]):
        out = tap.ok("export", "add", "-r", "-f", "qcow", *extra, str(top))
        uri = next(u for u in out.split() if u.startswith("nbd+unix"))
        qemu_io(uri, "read -P 0x42 0 1M", read_only=True)
        tap.ok("attach", "top.qcow", "--via", "socket")
        (att,) = tap.list()["attachments"]
        qemu_io(f"nbd+unix:///top.qcow?socket={att['device']}", "read -P 0x42 0 1M", read_only=True)
        tap.ok("detach", "top.qcow")
        tap.ok("export", "remove", "top.qcow")


def make_overlay(tmp: Path, backing: Path) -> Path:
    """An overlay whose backing file is a regular file now, replaced by ``backing`` after."""
    stand_in = tmp / "stand-in.raw"
    with open(stand_in, "wb") as f:
        f.truncate(1 * MiB)
    over = tmp / "over.qcow"
    run(tapnbd_cmd("create", "-f", "qcow", "-b", str(stand_in), "-F", "raw", str(over)))
    os.unlink(stand_in)
    os.symlink(backing, stand_in)
    return over


@pytest.mark.parametrize("kind", ["fifo", "chardev", "directory"])
def test_backing_file_must_be_a_regular_file(tmp_path: Path, kind: str) -> None:
    """A FIFO, a character device or a directory as a backing file: refused at once by
    ``info`` and ``serve`` (a FIFO used to hang ``info`` waiting for a writer)."""
    target = tmp_path / "target"
    if kind == "fifo":
        os.mkfifo(target)
        what = "is a FIFO"
    elif kind == "chardev":
        target = Path("/dev/zero")
        what = "is a character device"
    else:
        target.mkdir()
        what = "is a directory"
    over = make_overlay(tmp_path, target)
    for cmd in (
        ["info", "-f", "qcow", "-F", "raw", str(over)],
        ["serve", "-f", "qcow", "-F", "raw", str(over), "--port", "0"],
    ):
        # The timeout only guards against the old hang.
        proc = run(tapnbd_cmd(*cmd), check=False, timeout=60)
        assert proc.returncode == 1, proc.stdout
        assert what in proc.stderr and "backing file" in proc.stderr, proc.stderr


def test_backing_block_device_needs_an_option(tmp_path: Path) -> None:
    """A block device as a backing file is refused unless --allow-block-devices; a block
    device the admin names as the image itself still works."""
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root and loop devices")
    base = tmp_path / "base.raw"
    base.write_bytes(b"L" * MiB)
    dev = run(["losetup", "-f", "--show", str(base)]).stdout.strip()
    try:
        over = make_overlay(tmp_path, Path(dev))
        proc = run(tapnbd_cmd("info", "-f", "qcow", "-F", "raw", str(over)), check=False)
        assert proc.returncode == 1 and "is a block device" in proc.stderr, proc.stderr
        assert "--allow-block-devices" in proc.stderr
        info = run(
            tapnbd_cmd(
                "info", "--json", "-f", "qcow", "-F", "raw", "--allow-block-devices", str(over)
            )
        )
        assert json.loads(info.stdout)["backing-image"]["format"] == "raw"
        assert json.loads(run(tapnbd_cmd("info", "--json", dev)).stdout)["format"] == "raw"
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.parametrize("cmd", ["info", "check", "serve", "convert"])
def test_fifo_named_as_the_image_fails_fast(tmp_path: Path, cmd: str) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = {
        "info": ["info", str(fifo)],
        "check": ["check", str(fifo)],
        "serve": ["serve", str(fifo), "--port", "0"],
        "convert": ["convert", "-q", str(fifo), str(tmp_path / "out.qcow")],
    }[cmd]
    proc = run(tapnbd_cmd(*args), check=False, timeout=60)  # the timeout: hangs only
    assert proc.returncode == 1 and "is a FIFO" in proc.stderr, proc.stderr
