"""Tables (Markdown, rich, CSV), the PNG bar charts, and the machine description for results."""

from __future__ import annotations

import csv
import datetime as dt
import math
import os
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table as RichTable

from bench.proc import tapnbd_command


@dataclass
class Table:
    """A table with a title, headers and string cells; ``align`` is "l" or "r" per column."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    align: list[str] = field(default_factory=list)

    def _align(self) -> list[str]:
        return self.align or ["l"] + ["r"] * (len(self.headers) - 1)

    def markdown(self) -> str:
        def esc(cell: str) -> str:
            return cell.replace("|", "\\|")

        widths = [len(h) for h in self.headers]
        for row in self.rows:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(esc(cell)))
        # Delimiter cells span the padding too; a right-aligned one ends in its colon.
        sep = []
        for a, w in zip(self._align(), widths, strict=True):
            w = max(w, 3) + 2
            sep.append("-" * (w - 1) + ":" if a == "r" else "-" * w)

        def line(cells: Sequence[str]) -> str:
            padded = []
            for a, w, c in zip(self._align(), widths, cells, strict=True):
                c = esc(c)
                padded.append(c.rjust(max(w, 3)) if a == "r" else c.ljust(max(w, 3)))
            return "| " + " | ".join(padded) + " |"

        out = [line(self.headers), "|" + "|".join(sep) + "|"]
        out += [line(r) for r in self.rows]
        return "\n".join(out)

    def rich(self) -> RichTable:
        table = RichTable(title=self.title, title_justify="left")
        for h, a in zip(self.headers, self._align(), strict=True):
            table.add_column(h, justify="right" if a == "r" else "left")
        for row in self.rows:
            table.add_row(*row)
        return table


def write_csv(path: Path, rows: Sequence[Mapping[str, object]]) -> None:
    """One CSV file from a list of dicts (the first row's keys are the header)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        path.write_text("")
        return
    header = list(rows[0].keys())
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def fmt_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def fmt_num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return ""
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def median_interval(xs: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """A confidence interval for the median of ``xs`` that assumes no distribution (the
    sign test's): the k-th smallest and the k-th largest value, for the largest k whose
    coverage, 1 - 2 P(Binomial(n, 1/2) < k), is still at least ``level``. None when
    even the whole range covers less (n < 6 at 95 %).

    It says whether a run tells a ratio's median apart from a goal, on a machine whose
    single cells swing by 20 % and more.
    """
    n = len(xs)
    below = 0.0  # P(Binomial(n, 1/2) <= k) once k's term is added
    k = 0
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if 1 - 2 * below < level:
            break
        k += 1
    if k == 0:
        return None
    s = sorted(xs)
    return s[k - 1], s[n - k]


def bar_chart(
    path: Path,
    *,
    title: str,
    categories: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    ylabel: str,
    annotate: Mapping[str, Sequence[str]] | None = None,
    reference: float | None = None,
) -> str | None:
    """A grouped bar chart: one group per category, one bar per series.

    Returns None when it was written, or the reason it was not (matplotlib missing).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (`make bench` installs it)"
    names = list(series)
    n = max(len(names), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(categories) + 2), 4.8), dpi=120)
    for i, name in enumerate(names):
        values = [0.0 if v is None else v for v in series[name]]
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(categories))]
        bars = ax.bar(xs, values, width, label=name)
        labels = annotate.get(name) if annotate else None
        if labels:
            ax.bar_label(bars, labels=list(labels), fontsize=7, padding=2)
    if reference is not None:
        ax.axhline(reference, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(list(range(len(categories))))
    ax.set_xticklabels(list(categories), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.margins(y=0.12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return None


def _version(cmd: list[str], pattern: str = r"\d+\.\d+(\.\d+)?\w*") -> str:
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(0) if m else "?"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=Path(__file__).resolve().parent.parent,
        )
    except OSError:
        return ""
    return out.stdout.strip()


def machine() -> dict[str, str]:
    """What the results were measured on: the machine, the peers' versions, tapnbd's commit."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / (1 << 20):.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    commit = _git("rev-parse", "--short", "HEAD")
    if _git("status", "--porcelain", "--untracked-files=no", "--", "tapnbd", "formats"):
        commit += " (+ uncommitted changes in tapnbd/ or formats/)"
    return {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "host": socket.gethostname(),
        "kernel": platform.release(),
        "cpu": f"{os.cpu_count()} x {cpu}" if cpu else str(os.cpu_count()),
        "memory": mem,
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "tapnbd": commit,
        "tapnbd event loop": os.environ.get("TAPNBD_LOOP", "default (uvloop if installed)"),
        "fio": _version(["fio", "--version"]),
        "qemu-nbd": _version(["qemu-nbd", "--version"]),
        "nbdkit": _version(["nbdkit", "--version"]),
        "nbd-server": _version(["nbd-server", "-V"]),
        "libnbd (nbdfuse)": _version(["nbdfuse", "--version"]),
        "bonnie++": _version(["bonnie++", "-h"], r"Version: \S+|\d\.\d+\w*"),
        "tapnbd command": " ".join(tapnbd_command()),
        "harness": f"{sys.executable} -m bench",
    }


def machine_markdown(info: Mapping[str, str]) -> str:
    return "\n".join(f"- **{k}**: {v}" for k, v in info.items())


def run_dir(base: Path, host: str | None = None) -> Path:
    """A fresh results directory named after the date, time and machine."""
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    name = f"{stamp}-{host or socket.gethostname()}"
    return base / re.sub(r"[^A-Za-z0-9._-]", "_", name)
