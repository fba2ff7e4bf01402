"""SO_PEERCRED on the control socket, in a daemon proven to run the checkout under test
(issue 18: the daemon ran with cwd "/" and so imported whichever tapnbd was installed,
and a broken uid check went unnoticed)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tapnbd.control.messages import MAX_LINE, StatusRequest, encode
from tests.control.tap import ROOT, Tapnbd
from tests.control.test_daemon import NOBODY, _as_nobody


class DaemonProcess:
    """``tapnbd daemon start --foreground`` from the checkout, its stderr collected."""

    def __init__(self, tap: Tapnbd) -> None:
        env = {**tap.env, "PYTHONPATH": str(ROOT), "PYTHONVERBOSE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tapnbd", "daemon", "start", "--foreground"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        tap.procs.append(self.proc)
        self.lines: list[str] = []
        self.exited = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
        self.exited.set()

    def wait_ready(self, log: Path, timeout: float) -> None:
        """Until the daemon logs that it is ready (the guard only stops a hang)."""
        deadline = time.monotonic() + timeout
        while not log.exists() or "daemon ready" not in log.read_text():
            assert not self.exited.wait(0.05), f"the daemon exited: {self.text()[-3000:]}"
            assert time.monotonic() < deadline, "the daemon did not get ready"

    def text(self) -> str:
        return "".join(self.lines)


def test_peercred_refuses_other_users_in_the_checkout_under_test(tap: Tapnbd) -> None:
    """Also: the refused connection is closed, and an over-long line is answered."""
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    daemon = DaemonProcess(tap)
    daemon.wait_ready(tap.state / "tapnbd.log", 60)

    # PYTHONVERBOSE: the interpreter names the file each module was loaded from.
    loaded = re.findall(
        r"(?:matches|code object from) '?(\S+?tapnbd/control/daemon\S*)'?$", daemon.text(), re.M
    )
    assert loaded, "no import of tapnbd.control.daemon logged"
    for path in loaded:
        assert os.path.realpath(path).startswith(str(ROOT.resolve()) + os.sep), path

    control = str(tap.state / "control.sock")
    # Open the socket file to everyone: only SO_PEERCRED stands between uid 65534 and it.
    os.chmod(tap.base, 0o711)
    os.chmod(tap.state, 0o711)
    os.chmod(control, 0o666)
    try:
        got = _as_nobody(control)
        # The refusal is the last thing on that connection: the daemon closes it.
        assert _as_nobody_until_eof(control) == 1
    finally:
        os.chmod(control, 0o600)
        os.chmod(tap.state, 0o700)
        os.chmod(tap.base, 0o700)
    assert got == f"reply: permission denied: uid {NOBODY} does not own this daemon"
    assert tap.status()["pid"] == daemon.proc.pid  # the owner still gets in, to this daemon
    assert "refused control connection" in tap.log_tail()

    # The owner's over-long line gets a reply, not a silent hang-up.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(control)
        s.sendall(b"x" * (MAX_LINE + 2) + b"\n")
        reply = s.makefile("rb").readline()
    assert reply and "message too long" in json.loads(reply)["message"], reply


def _as_nobody_until_eof(path: str) -> int:
    """As uid 65534: send a request, read to the end; the number of reply lines, or -1
    if the daemon did not close the connection within 30 s."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        result = -2
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(30)
                s.connect(path)
                s.sendall(encode(StatusRequest()))
                data = b""
                try:
                    while chunk := s.recv(4096):
                        data += chunk
                    result = data.count(b"\n")
                except TimeoutError:
                    result = -1
        finally:
            os.write(w, str(result).encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return int(out)
