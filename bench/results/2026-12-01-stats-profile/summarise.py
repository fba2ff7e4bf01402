"""usage: summarise.py OUTDIR [REPO]

Summarise profile.sh's output: py-spy's folded stacks of the server's event-loop
thread, as shares of the samples not waiting in epoll, and fio's IOPS under the profile."""

import collections
import gzip
import json
import sys
from pathlib import Path

FUNCS = [
    "NBDConnection._process",
    "NBDConnection._dispatch",
    "RequestDecoder.next_request",
    "Backend.try_pread",
    "RawDriver.pread_nowait",
    "preadv64v2",
    "NBDConnection._reply_read",
    "writev",
    "Stats.begin",
    "Stats.settle",
    "Stats.done_inline",
]


def main(out: Path, repo: Path) -> None:
    # Lines of the server's tapnbd/backend.py that count a request served at once.
    COUNTS = [
        i
        for i, line in enumerate((repo / "tapnbd/backend.py").read_text().splitlines(), 1)
        if "stats.inline_" in line or "done_inline" in line or "now() if stats.enabled" in line
    ]
    for mode in ("on", "off"):
        loop = busy = stats_lines = 0
        incl: collections.Counter[str] = collections.Counter()
        folded = out / f"server-{mode}.folded"
        if folded.exists():
            text = folded.read_text()
        else:  # as committed
            text = gzip.decompress(folded.with_suffix(".folded.gz").read_bytes()).decode()
        for line in text.splitlines():
            stack, n_ = line.rsplit(" ", 1)
            n = int(n_)
            frames = stack.split(";")
            if not any("uv_run" in f for f in frames):
                continue  # another thread (idle pool threads), not the event loop
            loop += n
            if "epoll_pwait" in frames[-1]:
                continue
            busy += n
            py = [f for f in frames if ".py:" in f]
            if py and ("stats.py" in py[-1] or any(f"backend.py:{i})" in py[-1] for i in COUNTS)):
                stats_lines += n
            for name in {f.split(" (")[0] for f in frames}:
                incl[name] += n
        text = (out / f"fio-{mode}.json").read_text()
        job = json.loads(text[text.index("{") :])["jobs"][0]
        print(
            f"statistics {mode}: fio {job['read']['iops']:.0f} IOPS under the profiler, "
            f"client CPU usr {job['usr_cpu']:.1f} % sys {job['sys_cpu']:.1f} %"
        )
        print(f"  loop-thread samples {loop}, busy (not in epoll_pwait) {busy}")
        print(
            f"  {100 * stats_lines / max(busy, 1):5.1f} % of busy  in counting (stats.py, "
            f"backend.py lines {COUNTS})"
        )
        for name in FUNCS:
            print(f"  {100 * incl[name] / max(busy, 1):5.1f} % of busy  {name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "."))
