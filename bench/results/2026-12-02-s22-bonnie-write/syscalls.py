"""Time inside each system call from the ``syscalls`` hook's perf data (``hooks.sh``):
calls, seconds (and share of the span; above 100 % when several threads sit in it),
bytes, and the median of calls moving 256 KiB or more.

    python3 syscalls.py /var/tmp/rw/syscalls-tap.data
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
from collections import defaultdict

LINE = re.compile(r"\s*(\d+)\s+([\d.]+):\s+syscalls:sys_(enter|exit)_(\w+):\s*(.*)")
RET = re.compile(r"0x([0-9a-f]+)$")


def main(path: str) -> None:
    out = subprocess.run(
        ["perf", "script", "-i", path, "-F", "tid,time,event,trace"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    entered: dict[str, tuple[str, float]] = {}
    calls: dict[str, list[tuple[float, int]]] = defaultdict(list)
    first = last = 0.0
    for line in out.splitlines():
        m = LINE.match(line)
        if m is None:
            continue
        tid, stamp, edge, name, rest = m.groups()
        t = float(stamp)
        first, last = first or t, t
        if edge == "enter":
            entered[tid] = (name, t)
        elif tid in entered:
            name, t0 = entered.pop(tid)
            ret = RET.search(rest.strip())
            moved = int(ret.group(1), 16) if ret else 0
            calls[name].append((t - t0, 0 if moved >= 1 << 63 else moved))  # -errno: 0
    span = last - first
    print(f"{path}: span {span:.2f} s")
    for name, xs in calls.items():
        spent = sum(d for d, _ in xs)
        moved = sum(b for _, b in xs)
        big = [d for d, b in xs if b >= 256 << 10]
        rate = moved / spent / 1e6 if spent else 0.0
        med = f"{statistics.median(big) * 1e3:.2f} ms" if big else "-"
        print(
            f"{name:9} calls {len(xs):6} time {spent:6.2f} s ({100 * spent / span:3.0f} % of span)"
            f" {moved / 2**20:6.0f} MiB at {rate:5.0f} MB/s; big-call median {med}"
        )


if __name__ == "__main__":
    main(sys.argv[1])
