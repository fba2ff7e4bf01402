"""Per second of a run with ``trace.diff`` applied: big WRITEs answered, MiB/s, and the
medians of header-to-payload-complete (the receive) and payload-to-reply (the write).

    python3 trace.py /var/tmp/rw/trace-PID.txt

Events (monotonic ns, connection, kind, value): kind 10 + type at a request's header,
2 when a WRITE's payload is complete, 3 when a request is answered (value: its
payload charge), 4 the bytes queued in the socket when a big WRITE could be spliced.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict


def med_us(xs: list[int]) -> str:
    return f"{statistics.median(xs) / 1e3:6.0f}" if xs else "     -"


def main(path: str) -> None:
    with open(path) as f:
        events = [tuple(map(int, line.split())) for line in f if line.strip()]
    t0 = events[0][0]
    open_: dict[int, tuple[int, int | None]] = {}
    recv: dict[int, list[int]] = defaultdict(list)
    serve: dict[int, list[int]] = defaultdict(list)
    moved: dict[int, int] = defaultdict(int)
    spliced: dict[int, int] = defaultdict(int)
    queued: list[int] = []
    for t, conn, kind, value in events:
        second = (t - t0) // 1_000_000_000
        if kind == 4:
            queued.append(value)
        elif kind == 11:
            open_[conn] = (t, None)
        elif kind == 2 and conn in open_:
            open_[conn] = (open_[conn][0], t)
        elif kind == 3 and conn in open_ and value >= 65536:
            head, done = open_.pop(conn)
            moved[second] += value
            if done is None:  # spliced: no payload-complete event
                spliced[second] += 1
                serve[second].append(t - head)
            else:
                recv[second].append(done - head)
                serve[second].append(t - done)
    for s in sorted(serve):
        if len(serve[s]) < 20:
            continue
        print(
            f"t={s:3} MiB/s={moved[s] / 2**20:5.0f} n={len(serve[s]):4}"
            f" receive_us={med_us(recv[s])} write_us={med_us(serve[s])}"
            f" p90_write_us={statistics.quantiles(serve[s], n=10)[-1] / 1e3:6.0f}"
            f" spliced={spliced[s]}"
        )
    if queued:
        print(
            f"bytes queued when a big WRITE's header was decoded: median"
            f" {statistics.median(queued):.0f}, most {max(queued)} ({len(queued)} WRITEs)"
        )


if __name__ == "__main__":
    main(sys.argv[1])
