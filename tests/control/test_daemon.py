"""The daemon's life: start, status, stop, restore, crash recovery, its control socket,
statistics and the Prometheus endpoint. Through the real CLI, as a user runs it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tapnbd.control import tapctl
from tapnbd.control.messages import MAX_LINE, ErrorReply, StatusRequest, decode, encode
from tapnbd.control.state import StateDir
from tapnbd.errors import TapnbdError
from tests.control.tap import Tapnbd, tapdisk_pids
from tests.helpers import need, qemu_io, run

NOBODY = 65534


def unix_uri(uris: str) -> str:
    return next(u for u in uris.split() if u.startswith("nbd+unix://"))


def nbdfuse_pids(under: Path) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if (
            not zombie
            and cmd[0].endswith(b"nbdfuse")
            and any(str(under).encode() in a for a in cmd)
        ):
            out.append(int(entry))
    return out


def test_start_status_stop_and_restore(tap: Tapnbd) -> None:
    proc = tap.run("daemon", "status")
    assert proc.returncode == 3 and "not running" in proc.stderr
    assert json.loads(tap.run("daemon", "status", "--json").stdout) == {"running": False}

    started = tap.run("daemon", "start")
    assert started.returncode == 0, started.stderr
    assert (
        "started the daemon" in started.stderr and str(tap.state / "tapnbd.log") in started.stderr
    )
    status = tap.status()
    assert status["running"] and status["state_dir"] == str(tap.state)
    assert f"unix:{tap.state}/nbd.sock" in status["listen"]
    # No TCP unless asked for: NBD is the owner's unix socket only.
    assert status["listen"] == [f"unix:{tap.state}/nbd.sock"]
    assert "already running" in tap.run("daemon", "start").stderr

    image = tap.image("keep.img", size="16M")
    uris = tap.ok("export", "add", str(image), "--name", "keep")
    assert uris.split() == [f"nbd+unix:///keep?socket={tap.state}/nbd.sock"]
    tap.ok("export", "add", "ram:8M", "--name", "scratch", "--read-only")
    qemu_io(unix_uri(uris), "write -P 0x5a 1M 64k")

    stopped = tap.run("daemon", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "flushed and closed 'keep'" in stopped.stderr
    assert f"stopped the daemon (pid {status['pid']})" in stopped.stderr
    assert not StateDir(str(tap.state)).daemon_alive()
    assert not (tap.state / "control.sock").exists()
    with open(image, "rb") as f:
        f.seek(1 << 20)
        assert f.read(65536) == b"\x5a" * 65536  # on disk once stop returns
    assert tap.run("daemon", "status").returncode == 3
    assert "not running" in tap.run("daemon", "stop").stderr

    # Any command brings it back, with the exports it had.
    listed = tap.run("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "restored export 'keep'" in listed.stderr
    exports = {e["name"]: e for e in json.loads(listed.stdout)["exports"]}
    assert exports["keep"]["image"] == str(image) and not exports["keep"]["read_only"]
    assert exports["scratch"]["read_only"] and exports["scratch"]["format"] == "ram"
    assert tap.status()["pid"] != status["pid"]


def test_export_add_refusals(tap: Tapnbd) -> None:
    image = tap.image("dup.img", size="8M")
    assert "not running" in tap.fails("export", "remove", "x")
    tap.ok("export", "add", str(image))
    assert "is already exported as 'dup.img'" in tap.fails("export", "add", str(image))
    other = tap.image("sub.img", size="8M")
    err = tap.fails("export", "add", str(other), "--name", "dup.img")
    assert "an export named 'dup.img' already exists" in err
    assert "no such file" in tap.fails("export", "add", str(tap.base / "missing.img"))
    assert "cannot be empty" in tap.fails("export", "add", str(other), "--name", "")
    # A relative path is the caller's, not the daemon's.
    proc = subprocess.run(
        [sys.executable, "-m", "tapnbd", "export", "add", "sub.img"],
        capture_output=True,
        text=True,
        env=tap.env,
        cwd=tap.base,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert {e["image"] for e in tap.list()["exports"]} == {str(image), str(other)}
    tap.ok("export", "remove", "sub.img")
    assert [e["name"] for e in tap.list()["exports"]] == ["dup.img"]


def test_kill9_is_reported_readopted_and_restarted(devtap: Tapnbd) -> None:
    tap = devtap
    keep = tap.image("keep.img", size="32M")
    tap.ok("export", "add", str(keep), "--name", "keep")
    device = tap.ok("attach", str(tap.image("tmp.img", size="32M"))).strip()
    old_pid = tap.status()["pid"]
    fuse_before = nbdfuse_pids(tap.state)
    taps_before = tapdisk_pids(tap.state)
    assert fuse_before and len(taps_before) == 1
    os.kill(old_pid, signal.SIGKILL)
    while StateDir(str(tap.state)).daemon_alive():
        time.sleep(0.01)

    proc = tap.run("list", "--json")
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert f"the daemon (pid {old_pid}) is not running: it died" in err
    assert "left 1 attached device as it is, for the next daemon to re-adopt" in err
    assert "removed stale control.sock" in err
    assert "started the daemon" in err
    assert f"re-adopted {device}" in err and f"(pid {taps_before[0]}) kept running" in err
    assert "restored export 'keep'" in err
    listed = json.loads(proc.stdout)
    assert sorted(e["name"] for e in listed["exports"]) == ["keep", "tmp.img"]
    assert [a["device"] for a in listed["attachments"]] == [device]
    # The same processes serve it: nothing was restarted under the device.
    assert nbdfuse_pids(tap.state) == fuse_before
    assert tapdisk_pids(tap.state) == taps_before
    assert tap.stats("tmp.img")["format"] == "raw"
    assert tap.status()["pid"] != old_pid

    # Again, but found by `daemon status`, which reports without restarting.
    pid = tap.status()["pid"]
    os.kill(pid, signal.SIGKILL)
    while StateDir(str(tap.state)).daemon_alive():
        time.sleep(0.01)
    proc = tap.run("daemon", "status")
    assert proc.returncode == 3
    assert f"(pid {pid}) is not running: it died" in proc.stderr
    assert not (tap.state / "control.sock").exists()
    assert tap.run("daemon", "status").stderr.count("died") == 0  # nothing left to clean
    assert tapdisk_pids(tap.state) == taps_before
    assert sorted(e["name"] for e in tap.list()["exports"]) == ["keep", "tmp.img"]

    # A data path that died too: the next daemon undoes what nothing uses.
    pid = tap.status()["pid"]
    os.kill(pid, signal.SIGKILL)
    os.kill(taps_before[0], signal.SIGKILL)
    while StateDir(str(tap.state)).daemon_alive():
        time.sleep(0.01)
    proc = tap.run("list", "--json")
    assert proc.returncode == 0, proc.stderr
    assert f"detached {device}" in proc.stderr and "stopped nbdfuse" in proc.stderr
    listed = json.loads(proc.stdout)
    assert [e["name"] for e in listed["exports"]] == ["keep"]
    assert listed["attachments"] == []
    assert nbdfuse_pids(tap.state) == [] and tapdisk_pids(tap.state) == []
    losetup = subprocess.run(["losetup", "-l", "-n"], capture_output=True, text=True).stdout
    assert str(tap.state) not in losetup


def _as_nobody(path: str) -> str:
    """Connect to ``path`` as uid 65534 in a forked child; what happened, as text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        result = "?"
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect(path)
            except OSError as e:
                result = f"connect: {e.strerror}"
            else:
                s.sendall(encode(StatusRequest()))
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                reply = decode(data) if data else None
                result = (
                    f"reply: {reply.message}"
                    if isinstance(reply, ErrorReply)
                    else f"reply: {reply}"
                )
        except BaseException as e:
            result = f"error: {e!r}"
        finally:
            os.write(w, result.encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


def test_control_socket_is_owner_only(tap: Tapnbd) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    tap.ok("daemon", "start")
    control = str(tap.state / "control.sock")
    assert stat.S_IMODE(os.stat(control).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tap.state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tap.state / "state.json").st_mode) == 0o600

    assert _as_nobody(control) == "connect: Permission denied"
    # Even with the file opened up, SO_PEERCRED keeps other users out.
    os.chmod(tap.base, 0o711)
    os.chmod(tap.state, 0o711)
    os.chmod(control, 0o666)
    try:
        assert (
            _as_nobody(control)
            == f"reply: permission denied: uid {NOBODY} does not own this daemon"
        )
    finally:
        os.chmod(control, 0o600)
        os.chmod(tap.state, 0o700)
        os.chmod(tap.base, 0o700)
    assert "refused control connection" in tap.log_tail()
    assert tap.status()["running"]  # and the owner still gets in


def test_bad_requests_get_error_replies(tap: Tapnbd) -> None:
    tap.ok("daemon", "start")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(tap.state / "control.sock"))
    f = s.makefile("rwb")
    for line, error in (
        (b"hello\n", "bad request: not a JSON message"),
        (b'{"type":"export_add"}\n', "bad request: Object missing required field `image`"),
        # Deep nesting is refused where the schema expects a string, not recursed into.
        (
            b'{"type":"stats","name":' + b"[" * 200_000 + b"]" * 200_000 + b"}\n",
            "bad request: Expected `str | null`, got `array` - at `$.name`",
        ),
        (b"[" * 200_000 + b"]" * 200_000 + b"\n", "bad request: Expected `object`"),
        (b'{"type":"stats","x":' + b"[" * 200_000 + b"]" * 200_000 + b"}\n", "unknown field"),
        (b'{"type":"list_reply","exports":[],"attachments":[]}\n', "'list_reply' is not a request"),
        (b'{"type":"export_add","image":"rel.img"}\n', "must be absolute"),
    ):
        f.write(line)
        f.flush()
        reply = decode(f.readline())
        assert isinstance(reply, ErrorReply) and error in reply.message, reply
    f.write(encode(StatusRequest()))  # the connection carries on after errors
    f.flush()
    assert json.loads(f.readline())["type"] == "status_reply"
    s.close()

    # An over-long line is refused before it is parsed, and ends that connection only.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(tap.state / "control.sock"))
    f = s.makefile("rwb")
    f.write(b'{"type":"stats","name":"' + b"x" * (MAX_LINE + 10) + b'"}\n')
    f.flush()
    reply = decode(f.readline())
    assert isinstance(reply, ErrorReply) and reply.message == "message too long", reply
    s.close()
    assert tap.status()["running"]


def test_stats_counters_move(tap: Tapnbd) -> None:
    image = tap.image("s.img", size="16M")
    uri = unix_uri(tap.ok("export", "add", str(image), "--name", "s"))
    before = tap.stats("s")
    assert before["ops"]["write"]["ops"] == 0 and before["enabled"]
    qemu_io(uri, "write -P 0xab 0 1M", "read -P 0xab 0 1M", "flush", "write -z 2M 64k")
    after = tap.stats("s")
    write, read, flush = (after["ops"][op] for op in ("write", "read", "flush"))
    assert write["ops"] >= 1 and write["bytes"] >= 1 << 20
    assert read["ops"] >= 1 and read["bytes"] >= 1 << 20
    assert flush["ops"] >= 1
    assert after["ops"]["zero"]["bytes"] + after["ops"]["trim"]["bytes"] >= 65536
    assert 0 < read["p50_us"] <= read["p99_us"] <= read["max_us"]
    assert after["in_flight"] == 0 and after["connections"] == 0
    assert after["errors_by_errno"] == {}

    table = tap.ok("stats")
    assert "s.img" in table and "read" in table and "P99" in table
    assert "no export named 'nope'" in tap.fails("stats", "nope")

    # --watch: a document per interval until interrupted. SIGINT goes back to its
    # default in the child: under nohup or `&` pytest inherits it ignored, and Python
    # then never raises KeyboardInterrupt.
    watch = subprocess.Popen(
        [sys.executable, "-m", "tapnbd", "stats", "s", "--watch", "--json", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=tap.env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    tap.procs.append(watch)
    assert watch.stdout is not None
    first = json.loads(watch.stdout.readline())  # up and printing
    qemu_io(uri, "read 0 4k")
    # Documents until one shows the read (the test's timeout guards against a hang).
    docs = [first]
    while docs[-1][0]["ops"]["read"]["ops"] <= first[0]["ops"]["read"]["ops"]:
        line = watch.stdout.readline()
        assert line, f"--watch ended: {watch.stderr.read() if watch.stderr else ''}"
        docs.append(json.loads(line))
    watch.send_signal(signal.SIGINT)
    _, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    assert len(docs) >= 2


def test_statistics_can_be_turned_off(tap: Tapnbd) -> None:
    tap.ok("daemon", "start", "--no-stats")
    assert tap.status()["stats_enabled"] is False
    uri = unix_uri(tap.ok("export", "add", "ram:4M", "--name", "r"))
    qemu_io(uri, "write 0 64k", "read 0 64k")
    stats = tap.stats("r")
    assert stats["enabled"] is False and stats["ops"]["read"]["ops"] == 0


def test_prometheus_endpoint(tap: Tapnbd) -> None:
    tap.env["TAPNBD_METRICS"] = "127.0.0.1:0"
    image = tap.image("p.img", size="8M")
    uri = unix_uri(tap.ok("export", "add", str(image), "--name", 'p"1'))
    qemu_io(uri, "write 0 8k", "read 0 8k", "read 0 4k")
    address = tap.status()["metrics"]
    assert address.startswith("127.0.0.1:")
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['tapnbd_requests_total{export="p\\"1",op="read"}'] >= 2
    assert samples['tapnbd_bytes_total{export="p\\"1",op="write"}'] >= 8192
    # Latency is a histogram: as many observations as reads, and time spent.
    reads = samples['tapnbd_requests_total{export="p\\"1",op="read"}']
    assert samples['tapnbd_request_duration_seconds_count{export="p\\"1",op="read"}'] == reads
    assert (
        samples['tapnbd_request_duration_seconds_bucket{export="p\\"1",op="read",le="+Inf"}']
        == reads
    )
    assert samples['tapnbd_request_duration_seconds_sum{export="p\\"1",op="read"}'] > 0
    assert "# TYPE tapnbd_request_duration_seconds histogram" in text
    assert samples["tapnbd_up"] == 1 and samples["tapnbd_exports"] == 1
    assert "# TYPE tapnbd_requests_total counter" in text
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"http://{address}/other", timeout=10)
    assert exc.value.code == 404


def test_socket_attachment_outlives_the_daemon_with_its_counters(tap: Tapnbd) -> None:
    """`attach --via socket` (a data path with no local device, as for a VM): list,
    stats and metrics see it, a kill -9 of the daemon loses none of its counters, and
    detach ends its process. No root needed."""
    tap.env["TAPNBD_METRICS"] = "127.0.0.1:0"
    sock = tap.ok("attach", "--via", "socket", "ram:8M").strip()
    assert sock == str(tap.state / "tapdisk" / "1" / "nbd.sock")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    qemu_io(f"nbd+unix:///ram?socket={sock}", "write -P 7 0 64k", "read -P 7 0 64k")
    (export,) = tap.list()["exports"]
    assert (export["name"], export["format"], export["devices"]) == ("ram", "ram", [sock])
    assert export["origin"] == "attach" and export["uris"] == []
    before = tap.stats("ram")["ops"]
    assert before["write"]["ops"] >= 1 and before["write"]["bytes"] == 65536
    with urllib.request.urlopen(f"http://{tap.status()['metrics']}/metrics", timeout=10) as r:
        assert 'tapnbd_bytes_total{export="ram",op="write"} 65536' in r.read().decode()

    (tapdisk,) = tapdisk_pids(tap.state)
    os.kill(tap.status()["pid"], signal.SIGKILL)
    while StateDir(str(tap.state)).daemon_alive():
        time.sleep(0.01)
    proc = tap.run("stats", "ram", "--json")
    assert proc.returncode == 0, proc.stderr
    assert f"re-adopted {sock}" in proc.stderr
    (after,) = json.loads(proc.stdout)
    assert after["ops"]["write"] == before["write"]  # the same process, its counters kept
    assert tapdisk_pids(tap.state) == [tapdisk]
    qemu_io(f"nbd+unix:///ram?socket={sock}", "read -P 7 0 64k")  # the RAM disk too

    done = tap.run("detach", sock)
    assert done.returncode == 0, done.stderr
    assert "closed export 'ram'" in done.stderr
    assert tapdisk_pids(tap.state) == [] and not os.path.exists(sock)
    assert tap.list()["exports"] == []


def test_a_data_path_nobody_recorded_is_stopped(tap: Tapnbd) -> None:
    """A daemon killed between starting a tapdisk and recording it leaves a stray; the
    next daemon stops it (it flushes on SIGTERM) rather than leaving it forever."""
    tap.ok("daemon", "start")
    tap.ok("daemon", "stop")
    stray = tap.state / "tapdisk" / "7"
    image = tap.image("stray.img", size="1M")
    stray.parent.mkdir(mode=0o700, exist_ok=True)
    proc, _ = tapctl.spawn(
        str(stray),
        image=str(image),
        name="stray",
        fmt="auto",
        read_only=False,
        stats=True,
        token=tapctl.new_token(),
    )
    tap.procs.append(proc)
    assert tapdisk_pids(tap.state) == [proc.pid]
    started = tap.run("daemon", "start")
    assert started.returncode == 0, started.stderr
    assert f"stopped a data path nobody recorded (pid {proc.pid}" in started.stderr
    assert proc.wait(timeout=30) == 0  # a clean exit: it flushed and closed
    assert not stray.exists()


def test_a_recorded_data_path_directory_outside_ours_is_never_deleted(tap: Tapnbd) -> None:
    """The state file names each tapdisk's directory; a record that points elsewhere
    (planted, or corrupt) must not make the daemon delete it."""
    tap.ok("daemon", "start")
    tap.ok("daemon", "stop")
    victim = tap.base / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine\n")
    sneaky = tap.state / "tapdisk" / ".." / ".." / "victim"
    state = json.loads((tap.state / "state.json").read_text())
    for i, where in enumerate((victim, sneaky), start=1):
        record: dict[str, object] = {"id": str(i), "export": f"x{i}", "image": "ram:1M"}
        record |= {"via": "socket", "read_only": False, "tapdisk_pid": 0}
        record["tapdisk_dir"] = str(where)
        state["attachments"].append(record)
    (tap.state / "state.json").write_text(json.dumps(state))
    started = tap.run("daemon", "start")
    assert started.returncode == 0, started.stderr
    assert started.stderr.count("ignored a recorded data-path directory") == 2
    assert (victim / "keep.txt").read_text() == "mine\n"


def restarted(tap: Tapnbd, name: str) -> dict[str, Any]:
    """Stop the daemon, let the next command start it from its state file, and return
    export ``name`` as it was restored."""
    stopped = tap.run("daemon", "stop")
    assert stopped.returncode == 0, stopped.stderr
    restored = tap.run("list", "--json")
    assert f"restored export '{name}'" in restored.stderr, restored.stderr
    entry: dict[str, Any] = next(
        e for e in json.loads(restored.stdout)["exports"] if e["name"] == name
    )
    return entry


def test_export_add_offers_a_bitmap_and_keeps_it_across_a_restart(tap: Tapnbd) -> None:
    """``export add -B NAME`` (qemu-nbd's -B): the daemon's export offers the bitmap,
    keeps it up to date while it writes, and offers it again once restored."""
    image = tap.base / "b.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b0"], check=True)
    err = tap.fails("export", "add", str(image), "-B", "nope")
    assert "no usable persistent bitmap named 'nope'" in err, err
    uri = unix_uri(tap.ok("export", "add", str(image), "--name", "b", "-B", "b0"))
    qemu_io(uri, "write 1M 4k")

    def dirty() -> list[str]:
        out = subprocess.run(
            ["nbdinfo", "--map=qemu:dirty-bitmap:b0", uri],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return [line.split()[3] for line in out.splitlines()]

    assert dirty() == ["clean", "dirty", "clean"]
    listed = json.loads(tap.ok("list", "--json"))
    assert next(e for e in listed["exports"] if e["name"] == "b")["bitmaps"] == ["b0"]
    restarted(tap, "b")
    assert dirty() == ["clean", "dirty", "clean"]  # stored at stop, read back at restore


def test_export_add_A_offers_the_allocation_depth_and_keeps_it_across_a_restart(
    tap: Tapnbd,
) -> None:
    """``export add -A`` (qemu-nbd's -A): the overlay's own run at depth 1, its backing
    file's at 2; restored with the context after a restart, and absent without -A."""
    base, image = tap.base / "d-base.raw", tap.base / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), "4M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(image)],
        check=True,
    )
    uri = unix_uri(tap.ok("export", "add", str(image), "-f", "qcow2", "--name", "d", "-A"))
    qemu_io(uri, "write 1M 64k")

    def depths(uri: str) -> list[str]:
        out = subprocess.run(
            ["nbdinfo", "--map=qemu:allocation-depth", uri],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return [line.split()[2] for line in out.splitlines()]

    assert depths(uri) == ["2", "1", "2"]
    listed = json.loads(tap.ok("list", "--json"))
    assert next(e for e in listed["exports"] if e["name"] == "d")["allocation_depth"] is True
    restarted(tap, "d")
    assert depths(uri) == ["2", "1", "2"]
    plain = unix_uri(tap.ok("export", "add", str(base), "-f", "raw", "--name", "p", "-r"))
    refused = subprocess.run(
        ["nbdinfo", "--map=qemu:allocation-depth", plain], capture_output=True, text=True
    )
    assert refused.returncode != 0, refused.stdout


def test_export_add_detects_zeroes_and_keeps_doing_so_across_a_restart(tap: Tapnbd) -> None:
    """``export add --detect-zeroes=unmap`` (qemu-nbd's): a WRITE of zeros over data
    leaves no data behind, and the restored export still filters; a combination
    qemu-nbd refuses is refused by name."""
    image = tap.base / "z.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"], check=True)
    err = tap.fails("export", "add", str(image), "--discard=ignore", "--detect-zeroes=unmap")
    assert "needs --discard=unmap" in err, err
    uri = unix_uri(tap.ok("export", "add", str(image), "-f", "qcow2", "--name", "z",
                          "--detect-zeroes=unmap"))  # fmt: skip

    def data() -> list[tuple[int, int]]:
        out = subprocess.run(
            ["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", str(image)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return [(e["start"], e["length"]) for e in json.loads(out) if e["data"]]

    qemu_io(uri, "write -P 1 0 1M", "write -P 0 0 512k", "flush")
    assert data() == [(512 << 10, 512 << 10)]
    listed = json.loads(tap.ok("list", "--json"))
    assert next(e for e in listed["exports"] if e["name"] == "z")["detect_zeroes"] == "unmap"
    restarted(tap, "z")
    qemu_io(uri, "write -P 0 512k 512k", "flush")
    assert data() == []


def test_export_add_offset_and_cache_are_kept_across_a_restart(tap: Tapnbd) -> None:
    """``export add -o 64K --cache=unsafe`` (qemu-nbd's): the export starts at byte 64K
    of the image, and the restored export still does; an unknown mode is refused."""
    image = tap.base / "o.raw"
    image.write_bytes(bytes(1 << 20))
    err = tap.fails("export", "add", str(image), "--cache=sometimes")
    assert "--cache 'sometimes': use writeback" in err, err
    uri = unix_uri(tap.ok("export", "add", str(image), "-f", "raw", "--name", "o",
                          "-o", "64K", "--cache=unsafe"))  # fmt: skip
    qemu_io(uri, "write -P 7 0 4k", "flush")
    assert image.read_bytes()[64 << 10 : 68 << 10] == b"\7" * 4096
    listed = json.loads(tap.ok("list", "--json"))
    entry = next(e for e in listed["exports"] if e["name"] == "o")
    assert (entry["offset"], entry["cache"], entry["size"]) == (64 << 10, "unsafe", 960 << 10)
    entry = restarted(tap, "o")
    qemu_io(uri, "write -P 8 4k 4k", "flush")
    assert image.read_bytes()[68 << 10 : 72 << 10] == b"\10" * 4096
    assert (entry["offset"], entry["cache"]) == (64 << 10, "unsafe")


def test_attach_n_opens_the_data_paths_image_with_o_direct(tap: Tapnbd) -> None:
    """``attach -n`` (qemu-nbd -c -n): the data path's descriptor on the image has
    O_DIRECT, and unaligned writes through its socket land as written."""
    from tests.server.test_cache_modes import image_fd_flags

    image = tap.base / "direct.raw"
    image.write_bytes(bytes(1 << 20))
    sock = tap.ok("attach", "--via", "socket", "-n", str(image)).strip()
    (tapdisk,) = tapdisk_pids(tap.state)
    flags = image_fd_flags(tapdisk, image)
    assert flags and all(f & os.O_DIRECT for f in flags), flags
    qemu_io(f"nbd+unix:///?socket={sock}", "write -P 5 1000 3000", "flush")
    assert image.read_bytes()[1000:4000] == b"\5" * 3000
    listed = json.loads(tap.ok("list", "--json"))
    assert [a["cache"] for a in listed["attachments"]] == ["none"]
    tap.ok("detach", sock)


def test_attach_s_l_writes_over_an_internal_snapshot(tap: Tapnbd) -> None:
    """``attach -s -l SNAPSHOT`` (qemu-nbd -s -l): the device reads the image as it was
    at the snapshot and takes writes into the data path's throwaway overlay; the image,
    its snapshot and its current state, are unchanged. qemu-img is the referee."""
    need("qemu-img", "qemu-io", "nbdinfo")
    image = tap.base / "snap.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 2M", str(image)])
    run(["qemu-img", "snapshot", "-c", "s1", str(image)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 2M", str(image)])

    def states() -> list[bytes]:
        """The image at s1 and now, as qemu-img reads them."""
        out = []
        for args in (["-l", "s1"], []):
            flat = tap.base / "flat.raw"
            run(["qemu-img", "convert", *args, "-O", "raw", str(image), str(flat)])
            out.append(flat.read_bytes())
        return out

    before = states()
    attached = tap.run("attach", "--via", "socket", "-s", "-l", "s1", str(image))
    assert attached.returncode == 0, attached.stderr
    dev = f"nbd+unix:///?socket={attached.stdout.strip()}"
    (shown,) = json.loads(run(["nbdinfo", "--json", dev]).stdout)["exports"]
    assert shown["description"].endswith("(qcow2 snapshot s1, writes to a throwaway overlay)")
    assert shown["is_read_only"] is False, shown
    qemu_io(dev, "read -P 1 0 2M", "read -P 0 2M 2M")  # the snapshot, not the image now
    qemu_io(dev, "write -P 7 1M 64k", "flush", "read -P 7 1M 64k", "read -P 1 0 1M")
    (att,) = tap.list()["attachments"]
    assert (att["throwaway"], att["read_only"], att["snapshot"]) == (True, False, "s1")
    tap.ok("detach", attached.stdout.strip())
    assert states() == before
    run(["qemu-img", "check", str(image)])


def overlay_fds(pid: int) -> list[str]:
    """The throwaway overlays (formats.overlay) process ``pid`` holds open: deleted files,
    so only its descriptors show them."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if "/tapnbd-overlay-" in target:
                out.append(target)
    return out


def reads_as(uri: str, byte: int, length: int) -> None:
    """The export's first ``length`` bytes are ``byte`` (qemu-io -r: read-only exports too)."""
    cmd = ["qemu-io", "-r", "-f", "raw", "-c", f"read -P {byte} 0 {length}", uri]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "Pattern verification failed" not in out and f"read {length}/{length}" in out, out


def test_export_add_and_attach_share_open_beside_a_writer_across_a_restart(tap: Tapnbd) -> None:
    """``--share`` (serve's): a read-only export, and a read-only device, of an image a
    qemu-nbd writer holds are refused without it (QEMU's locks) and work with it; the
    restarted daemon opens the export beside the writer again, and lists both as shared."""
    from tests.security.test_qemu_locks import qemu_nbd

    image = tap.image("w.qcow2", fmt="qcow2", size="4M")
    qemu_io(image, "write -P 0x3c 0 64k", fmt="qcow2")
    with qemu_nbd(image, "-f", "qcow2"):
        err = tap.fails("export", "add", "-r", "-f", "qcow2", "--name", "w", str(image))
        assert 'Failed to get shared "write" lock' in err, err
        added = tap.run("export", "add", "-r", "--share", "-f", "qcow2", "--name", "w",
                        str(image))  # fmt: skip
        assert added.returncode == 0 and "read-only, shared)" in added.stderr, added.stderr
        uri = unix_uri(added.stdout)
        reads_as(uri, 0x3C, 64 << 10)
        entry = next(e for e in tap.list()["exports"] if e["name"] == "w")
        assert (entry["share"], entry["read_only"]) == (True, True)
        entry = restarted(tap, "w")
        assert entry["share"] is True
        reads_as(uri, 0x3C, 64 << 10)
        tap.ok("export", "remove", "w")

        err = tap.fails("attach", "--via", "socket", "-r", "-f", "qcow2", str(image))
        assert 'Failed to get shared "write" lock' in err, err
        attached = tap.run("attach", "--via", "socket", "-r", "--share", "-f", "qcow2",
                           str(image))  # fmt: skip
        assert attached.returncode == 0, attached.stderr
        assert attached.stderr.rstrip().endswith(", read-only, shared"), attached.stderr
        sock = attached.stdout.strip()
        reads_as(f"nbd+unix:///?socket={sock}", 0x3C, 64 << 10)
        (att,) = tap.list()["attachments"]
        assert (att["share"], att["read_only"]) == (True, True)
        stopped = tap.run("daemon", "stop")
        assert stopped.returncode == 0, stopped.stderr
        (att,) = tap.list()["attachments"]  # re-adopted from the state file
        assert att["share"] is True
        tap.ok("detach", sock)


def test_export_add_s_writes_to_a_throwaway_overlay_gone_with_the_export(tap: Tapnbd) -> None:
    """``export add -s`` (serve -s, qemu-nbd -s): writes read back through NBD and never
    reach the image; the overlay is a deleted file in the daemon's $TMPDIR, which closes
    with the export. A restarted daemon opens it over a new, empty overlay."""
    scratch = tap.base / "scratch"
    scratch.mkdir()
    tap.env["TMPDIR"] = str(scratch)  # the daemon's, and so its overlays'
    image = tap.base / "t.raw"
    image.write_bytes(b"\3" * (1 << 20))
    added = tap.run("export", "add", "-s", "-f", "raw", "--name", "t", str(image))
    assert added.returncode == 0, added.stderr
    assert "read-write, writes to a throwaway overlay)" in added.stderr, added.stderr
    uri = unix_uri(added.stdout)
    qemu_io(uri, "write -P 9 0 64k", "flush")
    qemu_io(uri, "read -P 9 0 64k", "read -P 3 64k 960k")
    assert image.read_bytes() == b"\3" * (1 << 20)
    pid = tap.status()["pid"]
    (held,) = overlay_fds(pid)
    assert held.startswith(f"{scratch}/") and held.endswith(" (deleted)"), held
    assert os.listdir(scratch) == []
    entry = next(e for e in tap.list()["exports"] if e["name"] == "t")
    # The image's format, not the overlay's qcow2 (the state file reopens it as that).
    assert (entry["throwaway"], entry["format"], entry["read_only"]) == (True, "raw", False)

    entry = restarted(tap, "t")
    assert entry["throwaway"] is True
    qemu_io(uri, "read -P 3 0 1M")  # the old overlay's writes went with its daemon
    qemu_io(uri, "write -P 7 128k 4k", "flush", "read -P 7 128k 4k")
    assert image.read_bytes() == b"\3" * (1 << 20)
    pid = tap.status()["pid"]
    assert len(overlay_fds(pid)) == 1
    tap.ok("export", "remove", "t")
    assert overlay_fds(pid) == [] and os.listdir(scratch) == []
    assert image.read_bytes() == b"\3" * (1 << 20)


def test_attach_s_writes_to_a_throwaway_overlay_of_the_data_paths_own(tap: Tapnbd) -> None:
    """``attach -s``: the data path holds the overlay (the daemon none), so it outlives
    a daemon restart as the device does, and goes with the detach; the image is only
    read. An export cannot lend its image to a device with an overlay of its own."""
    scratch = tap.base / "scratch"
    scratch.mkdir()
    tap.env["TMPDIR"] = str(scratch)
    image = tap.base / "a.raw"
    image.write_bytes(b"\5" * (1 << 20))
    attached = tap.run("attach", "--via", "socket", "-s", str(image))
    assert attached.returncode == 0, attached.stderr
    assert attached.stderr.rstrip().endswith(", writes to a throwaway overlay"), attached.stderr
    sock = attached.stdout.strip()
    dev = f"nbd+unix:///?socket={sock}"
    (shown,) = json.loads(run(["nbdinfo", "--json", dev]).stdout)["exports"]
    assert shown["description"].endswith("(raw, writes to a throwaway overlay)"), shown
    qemu_io(dev, "write -P 6 4k 8k", "flush")
    qemu_io(dev, "read -P 5 0 4k", "read -P 6 4k 8k", "read -P 5 12k 1012k")
    assert image.read_bytes() == b"\5" * (1 << 20)
    (tapdisk,) = tapdisk_pids(tap.state)
    (held,) = overlay_fds(tapdisk)
    assert held.startswith(f"{scratch}/") and held.endswith(" (deleted)"), held
    assert overlay_fds(tap.status()["pid"]) == [] and os.listdir(scratch) == []
    listed = tap.list()
    (att,) = listed["attachments"]
    assert (att["throwaway"], att["read_only"], att["format"]) == (True, False, "raw")
    assert [e["throwaway"] for e in listed["exports"]] == [True]

    stopped = tap.run("daemon", "stop")
    assert stopped.returncode == 0, stopped.stderr
    (att,) = tap.list()["attachments"]  # re-adopted: the same data path, the same overlay
    assert att["throwaway"] is True and tapdisk_pids(tap.state) == [tapdisk]
    qemu_io(dev, "read -P 6 4k 8k")

    other = tap.base / "e.raw"
    other.write_bytes(bytes(1 << 20))
    tap.ok("export", "add", "-f", "raw", "--name", "e", str(other))
    err = tap.fails("attach", "--via", "socket", "-s", "e")
    assert "would not show what the export shows" in err, err
    tap.ok("export", "remove", "e")
    tap.ok("export", "add", "-s", "-f", "raw", "--name", "e", str(other))
    err = tap.fails("attach", "--via", "socket", "e")
    assert "writes to a throwaway overlay in the daemon" in err, err

    tap.ok("detach", sock)
    assert tapdisk_pids(tap.state) == [] and os.listdir(scratch) == []
    assert image.read_bytes() == b"\5" * (1 << 20)


def test_a_state_directory_too_deep_for_a_data_paths_socket_is_refused(tmp_path: Path) -> None:
    """The daemon's own sockets would fit, a tapdisk's (tapdisk/ID/ctl.sock) would not:
    refused at start, naming the limit, not at the first attach."""
    base = len(os.fsencode(str(tmp_path))) + 1
    deep = tmp_path / ("d" * (107 - base - len("/control.sock")))
    assert len(os.fsencode(str(deep / "control.sock"))) <= 107
    with pytest.raises(TapnbdError, match="too long for a unix socket path"):
        StateDir(str(deep)).create()
    assert not deep.exists()


def test_a_close_without_its_last_flush_fails_the_command(tap: Tapnbd) -> None:
    """``export remove``, ``detach`` and ``daemon stop`` each close an image with a last
    flush. Where that flush cannot land (the export's NBD upstream was killed after a
    write), the command says so and exits 1, rather than report a clean close."""
    from tests.drivers.test_nbd_client import wait_for_socket

    need("nbdkit", "qemu-io")
    ups: list[subprocess.Popen[bytes]] = []

    def upstream(name: str) -> str:
        sock = tap.base / f"{name}.sock"
        up = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "memory", "16M"])
        ups.append(up)
        wait_for_socket(sock, up)
        return f"nbd+unix:///?socket={sock}"

    def kill_last() -> None:
        ups[-1].kill()
        ups[-1].wait(10)

    def kill_all() -> None:
        for up in ups:
            if up.poll() is None:
                up.kill()
            up.wait(10)

    try:
        daemon_sock = tap.state / "nbd.sock"
        tap.ok("export", "add", upstream("a"), "--name", "a")
        qemu_io(f"nbd+unix:///a?socket={daemon_sock}", "write -P 1 0 64k")
        kill_last()
        err = tap.fails("export", "remove", "a")
        assert "export 'a': closed without a last flush" in err, err
        assert "a" not in [e["name"] for e in tap.list()["exports"]]  # removed all the same

        sock = tap.ok("attach", "--via", "socket", upstream("b")).strip()
        qemu_io(f"nbd+unix:///?socket={sock}", "write -P 2 0 64k")
        kill_last()
        err = tap.fails("detach", sock)
        assert "closed without a last flush" in err, err
        assert tap.list()["attachments"] == []

        # daemon stop --all: an export of the daemon's and an attachment's data path.
        tap.ok("export", "add", upstream("c"), "--name", "c")
        tap.ok("export", "add", "ram:1M", "--name", "fine")
        qemu_io(f"nbd+unix:///c?socket={daemon_sock}", "write -P 3 0 64k")
        sock = tap.ok("attach", "--via", "socket", upstream("d"), "--name", "d").strip()
        qemu_io(f"nbd+unix:///?socket={sock}", "write -P 4 0 64k")
        kill_all()
        proc = tap.run("daemon", "stop", "--all")
        assert proc.returncode == 1, proc
        assert "flushed and closed 'fine'" in proc.stdout + proc.stderr
        assert "'d', 'c': closed without a last flush" in proc.stderr, proc
        assert tap.run("daemon", "status").returncode == 3  # it stopped all the same
    finally:
        kill_all()
