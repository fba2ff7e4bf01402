#!/usr/bin/env python3
"""tapnbd convert against qemu-img convert: wall time and user+sys CPU, as ratios.

Usage (with the venv's python; each --tree is a tapnbd checkout, run with PYTHONPATH
set to it, so that a tree before the changes and one after run in the same rounds):

    /work/main/.venv/bin/python bench/results/2026-12-04-s32-convert/convert_bench.py \
        --tree before=/tmp/s32/base --tree after=/work/hA --rounds 5 --out figures.csv

The source is deterministic (``--seed``): ``--size`` bytes in 4 MiB runs, each run data
(seeded random bytes, incompressible) with probability 0.7, else a hole (0.15) or
written zeros (0.15), so that both block status and zero detection have work to do. A
qcow2 copy of it (made by qemu-img) is the qcow2 source. Both are read once before the
rounds, so they are in the page cache.

Each round runs every case once for each tapnbd tree and once for qemu-img, the order
rotating from round to round; a ratio is tapnbd / qemu-img within one round. CPU is the
child's user+sys from wait4(2). Before each run the source is read again (untimed): this
VM's DAMON pages out page-cache pages it sees little used, and whichever run came first
after that paid for reading them back from disk. The target is removed before each run.

Cache modes: ``unsafe`` and ``writeback`` are given to both tools with -t. ``default``
gives neither -t: qemu-img convert's default for the target is unsafe, tapnbd's is
writeback (a final fdatasync).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

RUN = 4 << 20
PY = sys.executable


@dataclass(frozen=True)
class Case:
    name: str
    src: str  # "raw" or "qcow2"
    out: str  # -O
    cache: str | None  # -t, None: each tool's default


CASES = [
    Case("raw-qcow2-unsafe", "raw", "qcow2", "unsafe"),
    Case("raw-qcow2-wb", "raw", "qcow2", "writeback"),
    Case("raw-qcow2-default", "raw", "qcow2", None),
    Case("raw-raw-unsafe", "raw", "raw", "unsafe"),
    Case("raw-raw-wb", "raw", "raw", "writeback"),
    Case("qcow2-raw-unsafe", "qcow2", "raw", "unsafe"),
    Case("qcow2-raw-wb", "qcow2", "raw", "writeback"),
    Case("qcow2-qcow2-unsafe", "qcow2", "qcow2", "unsafe"),
]


def make_source(path: str, size: int, seed: int) -> tuple[int, int, int]:
    """The seeded source; returns (data, hole, zero) run counts."""
    rng = random.Random(seed)
    counts = [0, 0, 0]
    with open(path, "wb") as f:
        f.truncate(size)
        for pos in range(0, size, RUN):
            n = min(RUN, size - pos)
            r = rng.random()
            if r < 0.7:
                f.seek(pos)
                f.write(rng.randbytes(n))
                counts[0] += 1
            elif r < 0.85:
                counts[1] += 1  # a hole
            else:
                f.seek(pos)
                f.write(bytes(n))
                counts[2] += 1
    return counts[0], counts[1], counts[2]


def command(tool: str, case: Case, src: str, dst: str) -> list[str]:
    t = ["-t", case.cache] if case.cache else []
    if tool == "qemu-img":
        return ["qemu-img", "convert", *t, "-f", case.src, "-O", case.out, src, dst]
    return [PY, "-m", "tapnbd", "convert", "-q", *t, "-f", case.src, "-O", case.out, src, dst]


def prime(path: str) -> None:
    """Read ``path`` whole, so that it is in the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass


def timed(cmd: list[str], tree: str | None, cwd: str) -> tuple[float, float, float]:
    """(wall, user, sys) of one run of ``cmd`` (with PYTHONPATH=``tree``), in ``cwd``:
    ``python -m`` puts the working directory before PYTHONPATH, so it must not be a
    checkout."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = tree
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env, cwd=cwd)
    _pid, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}")
    return wall, ru.ru_utime, ru.ru_stime


def verify(case: Case, src: str, dst: str) -> None:
    subprocess.run(["qemu-img", "compare", "-f", case.src, "-F", case.out, src, dst], check=True)
    if case.out == "qcow2":
        subprocess.run(["qemu-img", "check", dst], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1 << 30)
    ap.add_argument("--seed", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="work directory (default: a new one in /var/tmp)")
    ap.add_argument("--only", action="append", help="case name (repeatable)")
    ap.add_argument("--out", default=None, help="CSV of every run")
    ap.add_argument("--verify", action="store_true", help="qemu-img compare/check once per case")
    ap.add_argument(
        "--tree",
        action="append",
        help="NAME=PATH of a tapnbd checkout (repeatable; default: tapnbd=$PYTHONPATH)",
    )
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree or [f"tapnbd={os.environ['PYTHONPATH']}"])
    tools = [*trees, "qemu-img"]

    work = args.dir or tempfile.mkdtemp(prefix="convert-bench-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    raw = os.path.join(work, f"src-{args.size}-{args.seed}.raw")
    qcow = raw[:-4] + ".qcow2"
    if not os.path.exists(raw):
        print("source runs (data, hole, zero):", make_source(raw, args.size, args.seed))
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow], check=True)
    for p in (raw, qcow):  # into the page cache
        with open(p, "rb") as src_file:
            while src_file.read(16 << 20):
                pass
    srcs = {"raw": raw, "qcow2": qcow}
    cases = [c for c in CASES if not args.only or c.name in args.only]

    rows: list[Run] = []
    # A tiny conversion: the fixed cost (interpreter start, imports, open, close).
    tiny = os.path.join(work, "tiny.raw")
    with open(tiny, "wb") as tiny_file:
        tiny_file.write(b"x" * 65536)
    for r in range(args.rounds):
        # Each tool goes first in turn: a cost that falls on whoever runs first (a
        # flusher thread still busy, say) is shared out.
        order = tools[r % len(tools) :] + tools[: r % len(tools)]
        for case in [*cases, Case("tiny", "raw", "raw", "unsafe")]:
            src = tiny if case.name == "tiny" else srcs[case.src]
            for tool in order:
                dst = os.path.join(work, f"dst-{tool}.{case.out}")
                if os.path.exists(dst):
                    os.unlink(dst)
                prime(src)
                wall, user, sys_ = timed(command(tool, case, src, dst), trees.get(tool), work)
                rows.append(Run(r, case.name, tool, wall, user, sys_))
                if args.verify and r == 0 and case.name != "tiny":
                    verify(case, src, dst)
                os.unlink(dst)
        print(f"round {r} done", file=sys.stderr)

    if args.out:
        with open(args.out, "w", newline="") as out:
            w = csv.writer(out)
            w.writerow(["round", "case", "tool", "wall", "user", "sys"])
            w.writerows((x.round, x.case, x.tool, x.wall, x.user, x.sys) for x in rows)
    summary(rows, [c.name for c in cases] + ["tiny"], tools, args.rounds)


@dataclass(frozen=True)
class Run:
    round: int
    case: str
    tool: str
    wall: float
    user: float
    sys: float

    @property
    def cpu(self) -> float:
        return self.user + self.sys


def summary(rows: list[Run], cases: list[str], tools: list[str], rounds: int) -> None:
    """Medians per case and tool, and the medians of the per-round ratios to qemu-img."""
    by = {(x.case, x.tool, x.round): x for x in rows}
    med = statistics.median
    print(
        f"{'case':20} {'tool':9} {'wall':>6} {'user':>6} {'sys':>6} {'cpu':>6} "
        f"{'wall x':>7} {'cpu x':>6} {'cpu x range':>11}"
    )
    for name in cases:
        for tool in tools:
            runs = [by[name, tool, r] for r in range(rounds)]
            qemu = [by[name, "qemu-img", r] for r in range(rounds)]
            line = (
                f"{name:20} {tool:9} {med(x.wall for x in runs):6.3f} "
                f"{med(x.user for x in runs):6.3f} {med(x.sys for x in runs):6.3f} "
                f"{med(x.cpu for x in runs):6.3f}"
            )
            if tool != "qemu-img":
                pairs = list(zip(runs, qemu, strict=True))
                rw = [t.wall / q.wall for t, q in pairs]
                rc = [t.cpu / q.cpu if q.cpu else float("nan") for t, q in pairs]
                line += f" {med(rw):7.2f} {med(rc):6.2f} {min(rc):5.2f}-{max(rc):5.2f}"
            print(line)


if __name__ == "__main__":
    main()
