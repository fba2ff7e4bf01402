"""A header never sends tapnbd to a server, a socket or a Ceph image on its own.

The attack: a stranger hands over an image whose backing name is an NBD URI (a local
socket or port serving another VM's disk), an ``rbd:`` name (with options for
librados: ``conf=`` reads a host file, ``log_file=`` writes one) or ``ram:SIZE``. The
admin opens it with its format given (``--format qcow2``), so the probing rule does not
stop it. The upstream here is nbdkit holding a known pattern, with its log filter: a
refused open must neither show the pattern nor even connect. Only
``--allow-remote-backing`` follows an NBD URI (and an ``rbd:`` name without options);
names the admin gives on the command line are the admin's own and work as before.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.control.tap import Tapnbd
from tests.helpers import (
    need,
    qemu_io,
    read_ready_lines,
    run,
    start_server,
    stop_process,
    tapnbd_cmd,
)

MiB = 1 << 20
PATTERN = 0xA5
OPTION = "--allow-remote-backing"


@dataclass
class Upstream:
    """An nbdkit memory export holding PATTERN, and the log of its connections."""

    uri: str
    log: Path
    proc: subprocess.Popen[bytes]

    def connections(self) -> int:
        return self.log.read_text().count("Preconnect id=")


def start_nbdkit(tmp: Path, listen: list[str], uri: str) -> Upstream:
    need("nbdkit", "qemu-io", "qemu-img")
    log, pidfile = tmp / "nbdkit.log", tmp / "nbdkit.pid"
    proc = subprocess.Popen(
        [
            "nbdkit",
            "-f",
            "-P",
            str(pidfile),
            *listen,
            "--filter=log",
            "memory",
            "1M",
            f"logfile={log}",
        ]
    )
    deadline = time.monotonic() + 30
    while not pidfile.exists():  # nbdkit writes it once it listens
        assert proc.poll() is None and time.monotonic() < deadline, "nbdkit did not start"
        time.sleep(0.02)
    qemu_io(uri, f"write -P {PATTERN} 0 1M")
    return Upstream(uri, log, proc)


@pytest.fixture(params=["unix", "tcp"])
def upstream(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Upstream]:
    if request.param == "unix":
        sock = tmp_path / "victim.sock"
        up = start_nbdkit(tmp_path, ["-U", str(sock)], f"nbd+unix:///?socket={sock}")
    else:
        with socket.socket() as s:  # a free port, released for nbdkit to take
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        up = start_nbdkit(
            tmp_path, ["-i", "127.0.0.1", "-p", str(port)], f"nbd://127.0.0.1:{port}/"
        )
    try:
        yield up
    finally:
        up.proc.terminate()
        up.proc.wait(10)


def evil_qcow2(tmp: Path, backing: str, name: str = "evil.qcow2") -> Path:
    """What the stranger hands over, made with qemu-img (-u: it opens nothing)."""
    evil = tmp / name
    run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            backing,
            "-u",
            str(evil),
            "1M",
        ]
    )
    return evil


def assert_refused(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode != 0, proc.stdout
    for w in words:
        assert w in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def no_pattern(data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    assert bytes([PATTERN]) * 64 not in raw and b"a5 a5 a5 a5" not in raw


def serve_refused(args: list[str], log: Path) -> str:
    """``tapnbd serve ARGS`` must exit at open; should it serve, what it serves must not
    be the upstream's pattern (read through it with qemu-io), and the test fails."""
    with open(log, "w") as err:
        proc = subprocess.Popen(
            tapnbd_cmd("serve", *args, "--port", "0"), stdout=subprocess.PIPE, stderr=err, text=True
        )
    try:
        uri = read_ready_lines(proc, 1, log, 60, "server").split()[0]
    except AssertionError:
        assert proc.returncode not in (None, 0), log.read_text()  # exited: refused
        return log.read_text()
    try:
        out = run(["qemu-io", "-f", "raw", "-c", "read -v 0 4k", uri], check=False).stdout
        no_pattern(out)
    finally:
        stop_process(proc, 15, 30)
    pytest.fail(f"served an image with a remote backing file: {log.read_text()}")


def test_nbd_backing_name_is_refused_and_never_connected(
    upstream: Upstream, tmp_path: Path
) -> None:
    evil = evil_qcow2(tmp_path, upstream.uri)
    before = upstream.connections()
    words = (str(evil), upstream.uri, OPTION)
    for cmd in (["info", "-f", "qcow2"], ["info", "--json", "-f", "qcow2"], ["map", "-f", "qcow2"]):
        proc = run(tapnbd_cmd(*cmd, str(evil)), check=False, timeout=60)
        assert_refused(proc, *words)
        no_pattern(proc.stdout)
    out = tmp_path / "out.raw"
    proc = run(
        tapnbd_cmd("convert", "-q", "-f", "qcow2", "-O", "raw", str(evil), str(out)), check=False
    )
    assert_refused(proc, *words)
    if out.exists():
        no_pattern(out.read_bytes())
    log = serve_refused(["--format", "qcow2", str(evil)], tmp_path / "serve.log")
    assert all(w in log for w in words), log
    assert upstream.connections() == before  # not even a connection

    # The admin trusts the header: the export is followed, and reads through.
    info = run(tapnbd_cmd("info", "-f", "qcow2", OPTION, str(evil))).stdout
    assert upstream.uri in info
    server = start_server(["--format", "qcow2", OPTION, str(evil)], tmp_path / "ok.log")
    try:
        qemu_io(server.uri, f"read -P {PATTERN} 0 1M")
    finally:
        server.stop()
    assert upstream.connections() > before


def test_nbd_backing_name_through_the_daemon(upstream: Upstream, tap: Tapnbd) -> None:
    """``export add`` and ``attach`` refuse the header's NBD URI as the tools do, and
    take the admin's --allow-remote-backing as the tools do. The option is kept with
    the export: a restarted daemon restores it by the same rules, and a device's data
    path (its own process) opens the chain by them, whether it is attached to the
    export or to the image anew."""
    evil = evil_qcow2(tap.base, upstream.uri)
    before = upstream.connections()
    for cmd in (["export", "add"], ["attach", "--via", "socket"]):
        err = tap.fails(*cmd, "-f", "qcow2", str(evil))
        assert upstream.uri in err and OPTION in err, err
    assert upstream.connections() == before
    assert tap.list()["exports"] == [] and tap.list()["attachments"] == []

    # A device of its own: its data path follows the URI because the admin said so.
    tap.ok("attach", "--via", "socket", "-f", "qcow2", OPTION, str(evil))
    (att,) = tap.list()["attachments"]
    qemu_io(f"nbd+unix:///{att['export']}?socket={att['device']}", f"read -P {PATTERN} 0 1M")
    tap.ok("detach", str(evil))

    out = tap.ok("export", "add", "-r", "-f", "qcow2", OPTION, str(evil), "--name", "evil")
    uri = next(u for u in out.split() if u.startswith("nbd+unix"))
    qemu_io(uri, f"read -P {PATTERN} 0 1M", read_only=True)
    (rec,) = json.loads((tap.state / "state.json").read_text())["exports"]
    assert rec["trust"]["allow_remote_backing"], rec
    (listed,) = tap.list()["exports"]
    assert listed["trust"] == rec["trust"], listed
    assert tap.run("daemon", "stop").returncode == 0
    assert "restored export 'evil'" in tap.run("list").stderr, tap.log_tail()
    qemu_io(uri, f"read -P {PATTERN} 0 1M", read_only=True)
    # A device on the export opens the chain as the export does.
    tap.ok("attach", "evil", "--via", "socket")
    (att,) = tap.list()["attachments"]
    qemu_io(f"nbd+unix:///evil?socket={att['device']}", f"read -P {PATTERN} 0 1M", read_only=True)
    tap.ok("detach", "evil")


@pytest.mark.parametrize(
    ("backing", "without", "with_option"),
    [
        ("rbd:pool/img:conf=/etc/passwd", OPTION, "with options (conf=)"),
        ("rbd:pool/img:id=admin", OPTION, "with options (id=)"),
        ("rbd:pool/img:log_file=LOG", OPTION, "with options (log_file=)"),
        ("ram:1G", "never followed", "never followed"),
    ],
)
def test_rbd_options_and_ram_from_a_header_are_refused(
    tmp_path: Path, backing: str, without: str, with_option: str
) -> None:
    """rbd: options are never taken from a header, even with the option; ram: never."""
    need("qemu-img")
    written = tmp_path / "librados.log"
    backing = backing.replace("LOG", str(written))
    evil = evil_qcow2(tmp_path, backing)
    for extra, word in (([], without), ([OPTION], with_option)):
        for cmd in (["info", "-f", "qcow2"], ["convert", "-q", "-f", "qcow2", "-O", "raw"]):
            args = [*cmd, *extra, str(evil)] + (
                [str(tmp_path / "o.raw")] if "convert" in cmd else []
            )
            assert_refused(
                run(tapnbd_cmd(*args), check=False, timeout=60), str(evil), backing, word
            )
        log = serve_refused(["--format", "qcow2", *extra, str(evil)], tmp_path / "serve.log")
        assert backing in log and word in log, log
    assert not written.exists()  # librados never saw log_file=


def test_ram_backing_is_refused_for_an_image_in_the_working_directory(tmp_path: Path) -> None:
    """A relative image path leaves a relative backing name as it is: ``ram:1G`` must not
    turn into a RAM disk there (nor into a file elsewhere)."""
    need("qemu-img")
    evil_qcow2(tmp_path, "ram:1G")
    proc = run(tapnbd_cmd("info", "-f", "qcow2", OPTION, "evil.qcow2"), check=False, cwd=tmp_path)
    assert_refused(proc, "'ram:1G'", "never followed")


async def vhd_with_parent(tmp: Path, name: str) -> Path:
    """A differencing VHD whose MacX locator (blktap's, the first tried) and parent name
    say ``name``: a real child of a real parent, then its locator rewritten as a
    stranger could (qemu-img makes no differencing VHDs)."""
    from formats.raw import RawDriver
    from formats.vhd.create import _locator_data
    from formats.vhd.layout import PLAT_MACX, PLAT_NONE, SECTOR
    from formats.vhd.meta import read_meta

    parent, child = tmp / "parent.vhd", tmp / "child.vhd"
    run(tapnbd_cmd("create", "-f", "vhd", str(parent), "1M"))
    run(tapnbd_cmd("create", "-f", "vhd", "-b", str(parent), str(child)))
    drv = RawDriver(str(child), read_only=True)
    try:
        meta = await read_meta(drv, str(child))
    finally:
        await drv.close()
    assert meta.header is not None
    macx = dict(_locator_data(str(child), name))[PLAT_MACX]
    locators = []
    fd = os.open(child, os.O_RDWR)
    try:
        for loc in meta.header.locators:
            if loc.code == PLAT_MACX:
                assert len(macx) <= loc.space * SECTOR
                os.pwrite(fd, macx.ljust(loc.space * SECTOR, b"\0"), loc.offset)
                locators.append(replace(loc, length=len(macx)))
            else:
                locators.append(replace(loc, code=PLAT_NONE, length=0))
        header = replace(
            meta.header,
            parent_name_raw=name.encode("utf-16-be").ljust(512, b"\0"),
            locators=tuple(locators),
        )
        os.pwrite(fd, header.build(), meta.footer.data_offset)
    finally:
        os.close(fd)
    return child


async def test_vhd_parent_locator_naming_an_nbd_export(upstream: Upstream, tmp_path: Path) -> None:
    """A VHD's parent is a VHD file: a locator naming an export is refused with the
    option's name, and even with the option it is never connected to."""
    evil = await vhd_with_parent(tmp_path, upstream.uri)
    before = upstream.connections()
    proc = run(tapnbd_cmd("info", "-f", "vhd", str(evil)), check=False, timeout=60)
    assert_refused(proc, str(evil), upstream.uri, OPTION)
    log = serve_refused(["--format", "vhd", str(evil)], tmp_path / "serve.log")
    assert upstream.uri in log and OPTION in log, log
    proc = run(tapnbd_cmd("info", "-f", "vhd", OPTION, str(evil)), check=False, timeout=60)
    assert_refused(proc, upstream.uri)
    assert upstream.connections() == before


def test_names_the_admin_gives_are_the_admins(upstream: Upstream, tmp_path: Path) -> None:
    """``serve URI``, ``create -b URI`` (preallocated too: create reopens what it wrote)
    and ``convert -B URI`` open the admin's name without the option; the images they
    leave name it in their header, so a later open asks for the option."""
    served = start_server([upstream.uri], tmp_path / "up.log")
    try:
        qemu_io(served.uri, f"read -P {PATTERN} 0 1M")
    finally:
        served.stop()
    o1, o2 = tmp_path / "o.qcow", tmp_path / "o.qcow2"
    run(tapnbd_cmd("create", "-b", upstream.uri, str(o1)))
    run(
        [
            *tapnbd_cmd("create", "-f", "qcow2", "-F", "raw", "-b", upstream.uri),
            "--preallocation",
            "metadata",
            str(o2),
        ]
    )
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(bytes([PATTERN]) * (512 << 10) + b"\x5a" * 4096)  # one cluster differs
    dst = tmp_path / "diff.qcow2"
    run(
        [
            *tapnbd_cmd("convert", "-q", "-f", "raw", "-O", "qcow2", "-B", upstream.uri),
            "-F",
            "raw",
            str(src),
            str(dst),
        ]
    )
    # Without -F: an NBD export is never probed; it is raw over QEMU's nbd protocol,
    # which qemu-img then reads through.
    o3 = tmp_path / "no-f.qcow2"
    run(tapnbd_cmd("create", "-f", "qcow2", "-b", upstream.uri, str(o3)))
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(o3)]).stdout)
    assert info["backing-filename-format"] == "raw", info
    qemu_io(o3, f"read -P {PATTERN} 0 1M", fmt="qcow2")
    for image, fmt in ((o1, "qcow"), (o2, "qcow2"), (dst, "qcow2"), (o3, "qcow2")):
        assert_refused(run(tapnbd_cmd("info", "-f", fmt, str(image)), check=False), OPTION)
        run(tapnbd_cmd("info", "-f", fmt, OPTION, str(image)))
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(dst)])


def test_create_follows_its_backing_files_chain_by_the_admins_rules(tmp_path: Path) -> None:
    """``create -f qcow2 -b MID``: MID is the admin's name, but the NBD URI in MID's own
    header is not, so it is refused unless --allow-remote-backing (then it is tried,
    and fails here only because nothing listens there)."""
    need("qemu-img")
    mid = tmp_path / "mid.qcow2"
    uri = f"nbd+unix:///?socket={tmp_path / 'none.sock'}"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", uri, "-u", str(mid), "1M"])
    top = tmp_path / "top.qcow2"
    refused = run(tapnbd_cmd("create", "-f", "qcow2", "-b", str(mid), str(top)), check=False)
    assert refused.returncode == 1 and OPTION in refused.stderr, refused.stderr
    tried = run(tapnbd_cmd("create", "-f", "qcow2", OPTION, "-b", str(mid), str(top)), check=False)
    assert tried.returncode == 1 and "not opened" not in tried.stderr, tried.stderr
    assert "No such file or directory" in tried.stderr, tried.stderr
