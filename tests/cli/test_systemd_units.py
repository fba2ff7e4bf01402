"""contrib/systemd: the units' ExecStart lines, run as systemd would run them (there is
no systemd here): the serve unit under systemd-socket-activate, or under a wrapper
that passes a bound socket as fd 3 with LISTEN_FDS/LISTEN_PID, then nbdinfo; the daemon
unit in the foreground until SIGTERM."""

from __future__ import annotations

import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import need, run, stop_process

UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"

#: Binds the unix socket argv[1], makes it fd 3 and execs argv[2:] with LISTEN_FDS=1 and
#: LISTEN_PID=its own pid (exec keeps the pid), as systemd does for Accept=no.
ACTIVATE = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen()
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
print("Listening on", sys.argv[1], file=sys.stderr, flush=True)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def unit(name: str) -> dict[str, list[str]]:
    """``Section.Key`` -> values, in order (keys repeat in units)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def exec_line(line: str, instance: str, env: dict[str, str]) -> list[str]:
    """An ExecStart line as systemd expands it: %i, "$VAR" split at whitespace,
    "${VAR}" as one word; /usr/bin/tapnbd is this checkout's."""
    words: list[str] = []
    for word in shlex.split(line.replace("%i", instance)):
        if word.startswith("${") and word.endswith("}"):
            words.append(env.get(word[2:-1], ""))
        elif word.startswith("$"):
            words += env.get(word[1:], "").split()
        else:
            words.append(word)
    assert words[0] == "/usr/bin/tapnbd", words
    return [sys.executable, "-m", "tapnbd", *words[1:]]


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def wait_stderr_line(proc: subprocess.Popen[str], text: str, timeout: float = 30) -> None:
    assert proc.stderr is not None
    fd, buf, deadline = proc.stderr.fileno(), b"", time.monotonic() + timeout
    while text.encode() not in buf:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], buf
        chunk = os.read(fd, 4096)
        assert chunk, f"exited {proc.wait()}: {buf!r}"
        buf += chunk


@pytest.mark.parametrize("activator", ["systemd-socket-activate", "wrapper"])
def test_serve_unit_socket_activated(tmp_path: Path, activator: str) -> None:
    need("nbdinfo")
    socket_unit, service = unit("tapnbd-serve@.socket"), unit("tapnbd-serve@.service")
    assert service["Unit.Requires"] == ["tapnbd-serve@%i.socket"]
    assert socket_unit["Socket.Accept"] == ["no"]
    (listen,) = socket_unit["Socket.ListenStream"]
    assert listen == "/run/tapnbd-serve/%i.sock"
    sock = tmp_path / "vm1.sock"  # the same path, under a directory of the test's
    (conf,) = service["Service.EnvironmentFile"]
    assert conf == "/etc/tapnbd/serve/%i.env"
    env = tmp_path / "vm1.env"
    env.write_text("IMAGES=vm1=ram:2M scratch=ram:1M\nOPTIONS=--read-only\n")
    (line,) = service["Service.ExecStart"]
    cmd = exec_line(line, "vm1", env_file(env))
    if activator == "wrapper":
        wrapped = [sys.executable, "-c", ACTIVATE, str(sock), *cmd]
    else:
        need("systemd-socket-activate")
        wrapped = [shutil.which("systemd-socket-activate") or "", "-l", str(sock), *cmd]
    proc = subprocess.Popen(wrapped, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        wait_stderr_line(proc, "Listening on")
        info = json.loads(
            run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}"], timeout=30).stdout
        )
        got = sorted(
            (e["export-name"], e["export-size"], e["is_read_only"]) for e in info["exports"]
        )
        assert got == [("scratch", 1 << 20, True), ("vm1", 2 << 20, True)]
        # systemd stops it with KillSignal: every image flushed, exit 0.
        assert service["Service.KillSignal"] == ["SIGTERM"]
        assert stop_process(proc, signal.SIGTERM, 30) == 0
        assert proc.stdout is not None and proc.stdout.read() == ""  # no URI lines
    finally:
        stop_process(proc, signal.SIGKILL, 30)


def test_daemon_unit_runs_in_the_foreground(tmp_path: Path) -> None:
    service = unit("tapnbd-daemon.service")
    # Attached devices' data paths must outlive a stop or restart of the daemon.
    assert service["Service.KillMode"] == ["process"]
    assert service["Service.RuntimeDirectoryMode"] == ["0700"]
    (line,) = service["Service.ExecStart"]
    state = tmp_path / "st"  # stands for /run/tapnbd, made as RuntimeDirectory= would
    state.mkdir(mode=0o700)
    cmd = [a.replace("/run/tapnbd", str(state)) for a in exec_line(line, "", {})]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        log, deadline = state / "tapnbd.log", time.monotonic() + 60
        while "daemon ready" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "no 'daemon ready' in its log"
            time.sleep(0.02)
        status = run([sys.executable, "-m", "tapnbd", "daemon", "status", "--json",
                      "--state-dir", str(state)]).stdout  # fmt: skip
        assert json.loads(status)["pid"] == proc.pid
        assert stop_process(proc, signal.SIGTERM, 30) == 0
    finally:
        stop_process(proc, signal.SIGKILL, 30)
