#!/usr/bin/env python3
"""cpmn.py ROUNDS VARIANT...: session 17's cpm.py plus each cell's TcpExt counters
(/proc/net/netstat) that change, printed before the cell's line. Session 18 ran it with
rcvbuf.diff applied in a worktree (TAPDIR) to try SO_RCVBUF on accepted sockets.

cpm.py ROUNDS VARIANT...: fio seq write 1M QD8 over TCP, 4 s cells, servers rotated
each round; per cell MiB/s, client (fio) and server CPU ms per MiB, machine idle %.

VARIANT: ``nk`` (nbdkit file) or ``tap:K=V,K=V`` (tapnbd serve with that environment;
TAPDIR=DIR runs the tapnbd of another checkout). PIN=1 pins every server to CPU 1 and
fio to CPU 0 (pin1.txt, pin2.txt). IMG is the 1 GiB raw image (pages dropped first).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMG = os.environ.get("IMG", "/var/tmp/rw/b.raw")
PIN = bool(os.environ.get("PIN"))
HZ = os.sysconf("SC_CLK_TCK")
URI = "nbd://127.0.0.1:10899/"
Cell = tuple[float, float, float, float]


def cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / HZ  # utime + stime


def idle() -> tuple[int, int]:
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return v[3] + v[4], sum(v)


def ready() -> None:
    fd = os.open(IMG, os.O_RDWR)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


NET = (
    "TCPRcvCollapsed",
    "PruneCalled",
    "RcvPruned",
    "TCPRcvQDrop",
    "TCPBacklogCoalesce",
    "TCPRcvCoalesce",
    "TCPWantZeroWindowAdv",
    "TCPToZeroWindowAdv",
    "TCPFromZeroWindowAdv",
    "TCPOFOQueue",
    "TCPBacklogDrop",
)


def netstat() -> dict[str, int]:
    rows = Path("/proc/net/netstat").read_text().split("\n")
    k, v = rows[0].split()[1:], [int(x) for x in rows[1].split()[1:]]
    d = dict(zip(k, v, strict=True))
    return {n: d.get(n, 0) for n in NET}


def cell(variant: str) -> Cell:
    ready()
    env = dict(os.environ)
    server_pin = ["taskset", "-c", "1"] if PIN else []
    if variant == "nk":
        cmd = [*server_pin, "nbdkit", "-f", "-p", "10899", "-i", "127.0.0.1", "file", IMG]
    else:
        for kv in filter(None, variant.split(":", 1)[1].split(",")):
            k, v = kv.split("=")
            env[k] = v
        cmd = [*server_pin, "/work/main/.venv/bin/python", "-m", "tapnbd", "serve", IMG]
        cmd += ["--format", "raw", "--bind", "127.0.0.1", "--port", "10899"]
    p = subprocess.Popen(
        cmd,
        env=env,
        cwd=env.get("TAPDIR", "/work/main"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        if subprocess.run(["nbdinfo", "--size", URI], capture_output=True).returncode == 0:
            break
        time.sleep(0.05)
    c0, i0 = cpu(p.pid), idle()
    n0 = netstat()
    fio = ["taskset", "-c", "0"] if PIN else []
    fio += ["fio", "--name=x", "--ioengine=nbd", f"--uri={URI}", "--rw=write", "--bs=1M"]
    fio += ["--iodepth=8", "--size=1g", "--time_based", "--runtime=4", "--output-format=json"]
    out = subprocess.run(fio, capture_output=True, text=True).stdout
    c1, i1 = cpu(p.pid), idle()
    n1 = netstat()
    print("   net", {k: n1[k] - n0[k] for k in NET if n1[k] - n0[k]})
    p.terminate()
    p.wait()
    j = json.loads(out[out.find("{") :])["jobs"][0]
    mib = j["write"]["io_bytes"] / 2**20
    secs = j["job_runtime"] / 1000
    client = (j["usr_cpu"] + j["sys_cpu"]) / 100 * secs
    idle_pct = 100 * (i1[0] - i0[0]) / (i1[1] - i0[1])
    return mib / secs, 1000 * client / mib, 1000 * (c1 - c0) / mib, idle_pct


def main() -> None:
    rounds, variants = int(sys.argv[1]), sys.argv[2:]
    got: dict[str, list[Cell]] = {v: [] for v in variants}
    for r in range(rounds):
        for k in range(len(variants)):
            v = variants[(r + k) % len(variants)]
            m = cell(v)
            got[v].append(m)
            print(
                f"{r} {v:30s} {m[0]:7.0f} MiB/s  client {m[1]:.3f} ms/MiB  "
                f"server {m[2]:.3f} ms/MiB  idle {m[3]:4.1f}%",
                flush=True,
            )
    print("medians:")
    for v in variants:
        cols = [statistics.median(c) for c in zip(*got[v], strict=True)]
        print(
            f"{v:30s} {cols[0]:7.0f} MiB/s  client {cols[1]:.3f}  server {cols[2]:.3f}  "
            f"idle {cols[3]:.1f}"
        )


if __name__ == "__main__":
    main()
