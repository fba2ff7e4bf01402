"""Seq write 1M QD8 cells, servers rotated each round: MiB/s, then fio's and the server's
CPU per MiB (the server's includes its start-up, about 0.4 s for tapnbd).

    python3 cell.py ROUNDS KIND...

KIND: ``nk`` (nbdkit file), ``tap:`` (tapnbd --format raw) or ``tapp:`` (tapnbd with
the format probed, so the probed-raw guard is in front), each optionally followed by
``ENV=VALUE,...`` for the server; ``TAPDIR=/path`` serves that tree's tapnbd. The image's
pages are dropped before each cell.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

IMG = "/var/tmp/rw/a.raw"
TAP = os.environ.get("TAPDIR", "/work/main")
PORT = "10910"


def start(kind: str) -> tuple[subprocess.Popen[bytes], str]:
    env = dict(os.environ)
    if kind == "nk":
        cmd = ["nbdkit", "-f", "-p", PORT, "-i", "127.0.0.1", "file", IMG]
        uri = f"nbd://127.0.0.1:{PORT}/"
    else:
        name, _, extra = kind.partition(":")
        for kv in filter(None, extra.split(",")):
            k, v = kv.split("=")
            env[k] = v
        env["PYTHONPATH"] = env.get("TAPDIR", TAP)
        fmt = [] if name == "tapp" else ["--format", "raw"]
        cmd = [f"{TAP}/.venv/bin/python", "-m", "tapnbd", "serve", *fmt, "--port", PORT]
        cmd.append(f"a={IMG}")
        uri = f"nbd://127.0.0.1:{PORT}/a"
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if subprocess.run(["nbdinfo", "--size", uri], capture_output=True).returncode == 0:
            break
        time.sleep(0.05)
    return p, uri


def cell(kind: str, rt: int) -> tuple[float, float, float]:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1")
    p, uri = start(kind)
    fio = ["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1M"]
    fio += ["--iodepth=8", "--size=1G", f"--runtime={rt}", "--time_based"]
    out = subprocess.run([*fio, "--output-format=json"], capture_output=True, text=True).stdout
    j = json.loads(out[out.index("{") :])["jobs"][0]
    bw = j["write"]["bw"] / 1024
    cpu = (j["usr_cpu"] + j["sys_cpu"]) / 100 * rt
    with open(f"/proc/{p.pid}/stat") as f:
        st = f.read().rsplit(")", 1)[1].split()
    srv = (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
    p.terminate()
    p.wait()
    moved = bw * rt
    return bw, cpu / moved * 1e6, srv / moved * 1e6


def main() -> None:
    rounds, kinds = int(sys.argv[1]), sys.argv[2:]
    rt = int(os.environ.get("RT", "4"))
    print("rounds", rounds, "kinds", kinds, flush=True)
    for r in range(rounds):
        order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
        for k in order:
            bw, fcpu, scpu = cell(k, rt)
            print(f"{r} {k} {bw:.0f} MiB/s fio_us/MiB {fcpu:.1f} srv_us/MiB {scpu:.1f}", flush=True)


if __name__ == "__main__":
    main()
