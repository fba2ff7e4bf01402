"""The daemon's CLI as a Unix tool: `list` and `stats` count the same clients, `stats
--watch` writes a document per interval into a pipe, `daemon start` refuses options
a running daemon would ignore, and its --poll-us reaches its server and every tapdisk."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tapnbd.cli.stats import WATCH_HEADER
from tapnbd.control.attach import cmdline
from tests.control.tap import Tapnbd, tapdisk_pids
from tests.helpers import SYSTEM_PYTHON, need, qemu_io, read_ready_lines, run, tapnbd_cmd

#: Holds N libnbd connections to a URI open until stdin closes; "ready" once all are up.
HOLD = """
import sys, nbd
handles = []
for _ in range(int(sys.argv[2])):
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    handles.append(h)
print("ready", flush=True)
sys.stdin.read()
for h in handles:
    h.shutdown()
"""


@contextmanager
def clients(tap: Tapnbd, uri: str, n: int) -> Iterator[None]:
    need(SYSTEM_PYTHON)
    proc = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", HOLD, uri, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(tap.base / "hold.log", "w"),  # noqa: SIM115
        text=True,
    )
    try:
        read_ready_lines(proc, 1, tap.base / "hold.log", 60, "libnbd clients")
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=60)


def counts(tap: Tapnbd, name: str) -> tuple[int, int]:
    """(clients in `list`, connections in `stats`) of export ``name``."""
    (listed,) = [e for e in tap.list()["exports"] if e["name"] == name]
    return listed["clients"], tap.stats(name)["connections"]


def test_list_and_stats_count_the_same_clients(tap: Tapnbd) -> None:
    # A data path's export (attach --via socket: no device, no root needed)...
    sock = tap.ok("attach", "--via", "socket", "ram:8M").strip()
    with clients(tap, f"nbd+unix:///ram?socket={sock}", 3):
        assert counts(tap, "ram") == (3, 3)
    # ... and one of the daemon's own exports.
    image = tap.image("c.img", size="8M")
    tap.ok("export", "add", str(image), "--name", "c")
    uri = f"nbd+unix:///c?socket={tap.state / 'nbd.sock'}"
    with clients(tap, uri, 2):
        assert counts(tap, "c") == (2, 2)
    assert counts(tap, "c") == (0, 0)


def test_list_shows_what_an_export_was_added_with(tap: Tapnbd) -> None:
    """`list`'s table names each export's options that are not the defaults, trust
    options included, as `export add` reported them; JSON was the only place before."""
    tap.ok("export", "add", str(tap.image("p.img", size="8M")), "--name", "plain")
    added = tap.run(
        "export", "add", str(tap.image("t.img", size="8M")), "--name", "tuned",
        "--detect-zeroes", "on", "--cache", "writethrough", "--share",
        "-F", "raw", "--allow-block-devices", "--allow-remote-backing",
    )  # fmt: skip
    words = (
        "detect-zeroes on, cache writethrough, shared, backing format raw, "
        "block devices allowed, remote backing allowed"
    )
    assert added.returncode == 0 and f"read-write, {words})" in added.stderr, added.stderr
    wide = {**tap.env, "COLUMNS": "500"}  # rich wraps cells to the terminal's width
    table = run(tapnbd_cmd("list"), check=True, env=wide).stdout.splitlines()
    assert table[0].split()[-1] == "OPTIONS", table
    rows = {line.split()[0]: line.rstrip() for line in table[1:]}
    assert rows["tuned"].endswith(f" {words}"), rows
    assert rows["plain"].endswith(" -"), rows


def test_watch_into_a_pipe_writes_a_document_per_interval(tap: Tapnbd) -> None:
    image = tap.image("w.img", size="8M")
    tap.ok("export", "add", str(image), "--name", "w")
    watch = subprocess.Popen(
        [sys.executable, "-m", "tapnbd", "stats", "w", "--watch", "--interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=tap.env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    tap.procs.append(watch)
    assert watch.stdout is not None
    docs: list[list[str]] = []
    while len(docs) < 3:  # the third header closes the second document
        line = watch.stdout.readline()
        assert line, f"--watch ended: {watch.stderr.read() if watch.stderr else ''}"
        if line.startswith(WATCH_HEADER):
            docs.append([])
        else:
            assert docs, f"output before the first header: {line!r}"
            docs[-1].append(line)
    watch.send_signal(signal.SIGINT)
    _, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    for doc in docs[:2]:
        text = "".join(doc)
        assert "w.img" in text and "read" in text and "OPS/S" in text, text


def test_daemon_start_refuses_options_it_would_ignore(tap: Tapnbd) -> None:
    tap.ok("daemon", "start")
    pid = tap.status()["pid"]
    err = tap.fails("daemon", "start", "--metrics", "127.0.0.1:0", "--no-stats")
    assert "already running" in err and "--metrics, --stats" in err and "ignored" in err
    assert tap.status()["pid"] == pid and tap.status()["metrics"] is None
    # Nothing asked of it: the running daemon is what was wanted.
    assert "already running" in tap.run("daemon", "start").stderr
    # From the environment (a unit's or a shell's), not typed: no refusal either.
    tap.env["TAPNBD_METRICS"] = "127.0.0.1:0"
    assert tap.run("daemon", "start").returncode == 0
    json.dumps(tap.status())


def test_poll_us_reaches_the_daemon_and_every_data_path(tap: Tapnbd) -> None:
    tap.ok("daemon", "start", "--poll-us", "50", "--verbose")
    assert tap.status()["poll_us"] == 50
    assert "polling    up to 50 us" in tap.ok("daemon", "status")
    # The daemon's own server: a connection that polled says so (at DEBUG) as it ends.
    uri = f"nbd+unix:///r?socket={tap.state / 'nbd.sock'}"
    tap.ok("export", "add", "ram:4M", "--name", "r")
    qemu_io(uri, "write -P 0x3c 0 64k", *(f"read -P 0x3c {i * 4}k 4k" for i in range(16)))
    deadline = time.monotonic() + 30
    while "requests came while polling" not in (tap.state / "tapnbd.log").read_text():
        assert time.monotonic() < deadline, f"no connection polled: {tap.log_tail()}"
        time.sleep(0.05)
    # A data path (attach --via socket: a tapdisk, no device, no root needed) gets the
    # flag on its command line, and its server takes it (its record reads it back).
    sock = tap.ok("attach", "--via", "socket", "ram:8M").strip()
    (pid,) = tapdisk_pids(tap.state)
    cmd = cmdline(pid)
    assert cmd[cmd.index("--poll-us") + 1] == "50", cmd
    record = json.loads((Path(sock).parent / "tapdisk.json").read_text())
    assert record["poll_us"] == 50 and record["socket"] == sock
    qemu_io(f"nbd+unix:///ram?socket={sock}", "write -P 0x5a 0 64k", "read -P 0x5a 0 64k")
    # Given to the running daemon, it would be ignored: refused, as the other options.
    err = tap.fails("daemon", "start", "--poll-us", "50")
    assert "already running" in err and "--poll-us would be ignored" in err, err
    tap.ok("detach", sock)


def test_poll_us_is_off_unless_asked(tap: Tapnbd) -> None:
    tap.ok("daemon", "start")
    assert tap.status()["poll_us"] == 0
    assert "polling" not in tap.ok("daemon", "status")
    tap.ok("attach", "--via", "socket", "ram:8M")
    (pid,) = tapdisk_pids(tap.state)
    assert "--poll-us" not in cmdline(pid)
    assert "not in the range 0<=x<=1000" in tap.fails("daemon", "start", "--poll-us", "1001")


def test_list_and_stats_agree_on_an_nbdfuse_device(devtap: Tapnbd) -> None:
    """The issue's case: list said 0 clients where stats said 4 connections."""
    image = devtap.image("f.img", size="16M")
    device = devtap.ok("attach", "--via", "fuse", str(image)).strip()
    assert device.startswith("/dev/loop"), device
    listed, connections = counts(devtap, "f.img")
    assert listed == connections >= 1, (listed, connections)
    devtap.ok("detach", device)
