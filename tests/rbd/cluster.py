"""A throwaway single-node Ceph cluster on loopback: one monitor, one bluestore OSD.

Used by the rbd tests (a session fixture) and by ``python -m bench fio --only rbd``.
No manager runs, so readiness is probed with a real object write (``ceph pg stat``
would wait for a manager forever). Auth is off: the cluster listens on 127.0.0.1 only
and lives for one test session.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

BINARIES = ("ceph-mon", "ceph-osd", "ceph", "rados", "rbd", "monmaptool")
POOL = "rbd"


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


MON_BUSY = "problem getting command descriptions from mon"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _conf(d: Path, fsid: str, port: int) -> str:
    return f"""[global]
fsid = {fsid}
mon host = v1:127.0.0.1:{port}
mon initial members = a
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
mon data avail warn = 2
mon data avail crit = 1
[client]
admin socket = {d}/run/$name.$pid.$cctid.asok
[mon]
mon data = {d}/mon.$id
[osd]
osd data = {d}/osd.$id
osd objectstore = bluestore
bluestore block path = {d}/osd.$id.block
bluestore block create = true
bluestore block size = 10737418240
bluestore fsck on mkfs = false
bluestore fsck on mount = false
osd memory target = 1073741824
osd max object name len = 460
osd max object namespace len = 64
osd class update on start = false
osd crush update on start = false
"""


@dataclass
class Cluster:
    """A running cluster; ``conf`` is its ceph.conf (export it as CEPH_CONF)."""

    dir: Path
    conf: Path
    osd_id: str

    def env(self) -> dict[str, str]:
        return {**os.environ, "CEPH_CONF": str(self.conf)}

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.run(
                list(args), env=self.env(), capture_output=True, text=True, timeout=timeout
            )
            # On a loaded machine the monitor now and then answers a `ceph` command with
            # "EPERM: problem getting command descriptions from mon" (it is re-electing
            # itself). That reply comes before the command is sent, so it is sent again.
            if MON_BUSY not in proc.stderr or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # the monitor gives no event to wait on
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def rbd(self, *args: str, timeout: float = 60) -> str:
        return self.run("rbd", *args, timeout=timeout)

    def pidfile(self, name: str) -> Path:
        return self.dir / "run" / f"{name}.pid"

    def pid(self, name: str) -> int | None:
        try:
            return int(self.pidfile(name).read_text().strip())
        except (OSError, ValueError):
            return None

    def kill_osd(self) -> None:
        """SIGKILL the OSD, as a crashed storage host."""
        pid = self.pid(f"osd.{self.osd_id}")
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)
            self.pidfile(f"osd.{self.osd_id}").unlink(missing_ok=True)

    def start_osd(self) -> None:
        self.run("ceph-osd", "-i", self.osd_id, timeout=120)
        self.wait_writable()

    def new_osd(self, timeout: float = 120) -> tuple[str, str]:
        """(id, uuid) of a new OSD, once the monitor answers (it says EPERM while it is
        still starting).

        On a loaded machine ``mon stat`` can answer while the OSD map's commands still
        say "EPERM: problem getting command descriptions from mon", so the wait is on
        ``osd new`` itself (the same uuid gives the same id: a retry is harmless)."""
        osd_uuid = str(uuid.uuid4())
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.run("ceph", "osd", "new", osd_uuid, timeout=30).strip(), osd_uuid
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # polling a monitor that has no readiness event

    def wait_writable(self, timeout: float = 180) -> None:
        """Until a real object write to the pool succeeds (the cluster is serving)."""
        deadline = time.monotonic() + timeout
        probe = self.dir / "probe"
        probe.write_bytes(b"probe")
        while True:
            try:
                self.run("rados", "-p", POOL, "put", "probe", str(probe), timeout=10)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # polling a cluster that has no readiness event

    def stop(self) -> None:
        for pidfile in (self.dir / "run").glob("*.pid"):
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid)
            except (OSError, ValueError):
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def start(d: Path) -> Cluster:
    """Bring up a mon and a bluestore OSD in ``d`` and create the pool; 10-60 s."""
    if d.exists():
        shutil.rmtree(d)
    for sub in ("run", "log", "mon.a", "osd.0"):
        (d / sub).mkdir(parents=True)
    fsid, port = str(uuid.uuid4()), _free_port()
    conf = d / "ceph.conf"
    conf.write_text(_conf(d, fsid, port))
    cluster = Cluster(d, conf, "0")
    try:
        cluster.run(
            "monmaptool", "--create", "--clobber", "--fsid", fsid,
            "--addv", "a", f"[v1:127.0.0.1:{port}]", str(d / "monmap"),
        )  # fmt: skip
        cluster.run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(d / "monmap"))
        cluster.run("ceph-mon", "-i", "a")
        cluster.osd_id, osd_uuid = cluster.new_osd()
        cluster.run("ceph-osd", "-i", cluster.osd_id, "--mkfs", "--osd-uuid", osd_uuid, timeout=180)
        cluster.run("ceph", "osd", "crush", "add", f"osd.{cluster.osd_id}", "1.0", "root=default")
        cluster.run("ceph-osd", "-i", cluster.osd_id, timeout=120)
        cluster.run("ceph", "osd", "pool", "create", POOL, "8", "8")
        cluster.run("ceph", "osd", "pool", "application", "enable", POOL, "rbd")
        cluster.wait_writable()
        cluster.run("rbd", "pool", "init", POOL)
    except BaseException:
        cluster.stop()
        raise
    return cluster
