"""``tapnbd stats [NAME] [--json] [--watch]``: live per-export counters."""

from __future__ import annotations

import errno
import json
import sys
import time
from typing import Annotated

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tapnbd.cli._control import JsonOpt, StateDirOpt, connect, human_size
from tapnbd.cli.app import app, errors_as_exit, plain
from tapnbd.control.messages import ExportStats, StatsReply, StatsRequest, to_builtins

console = Console()
#: The line that opens each document ``--watch`` writes into a pipe.
WATCH_HEADER = "# tapnbd stats"
#: Operations shown even when idle; the others only once they have been used.
MAIN_OPS = ("read", "write", "flush")


def _us(value: float) -> str:
    if value == 0:
        return "-"
    if value >= 1000:
        return f"{value / 1000:.1f} ms"
    return f"{value:.0f} µs"


def render(
    exports: list[ExportStats],
    previous: dict[str, ExportStats] | None = None,
    elapsed: float = 0.0,
) -> Group:
    """A table per export; with ``previous``, rates over ``elapsed`` seconds too."""
    parts: list[Table | Text] = []
    for e in exports:
        before = (previous or {}).get(e.name)
        state = "" if e.enabled else "  [statistics off]"
        title = Text.assemble(
            plain(e.name, "bold"),
            plain(f"  {e.image} ({e.format})  connections {e.connections}  "),
            f"in flight {e.in_flight}{state}",
        )
        table = Table(title=title, title_justify="left", box=None, header_style="bold")
        table.add_column("OP")
        for col in ("OPS", "BYTES", "ERRORS", "P50", "P99", "MAX"):
            table.add_column(col, justify="right")
        if before is not None:
            table.add_column("OPS/S", justify="right")
            table.add_column("BYTES/S", justify="right")
        for op, c in e.ops.items():
            if op not in MAIN_OPS and c.ops == 0 and c.errors == 0:
                continue
            row = [
                op,
                str(c.ops),
                human_size(c.bytes),
                str(c.errors),
                _us(c.p50_us),
                _us(c.p99_us),
                _us(c.max_us),
            ]
            if before is not None:
                b = before.ops.get(op)
                dt = elapsed or 1.0
                dops = (c.ops - b.ops) if b else c.ops
                dbytes = (c.bytes - b.bytes) if b else c.bytes
                row += [f"{dops / dt:.0f}", human_size(dbytes / dt) + "/s"]
            table.add_row(*row)
        parts.append(table)
        if e.errors_by_errno:
            errs = ", ".join(
                f"{errno.errorcode.get(int(k), k) if k.isdigit() else k}: {v}"
                for k, v in e.errors_by_errno.items()
            )
            parts.append(Text(f"  errors by errno: {errs}"))
        parts.append(Text(""))
    if not exports:
        parts.append(Text("no exports"))
    return Group(*parts)


@app.command("stats")
def stats_cmd(
    name: Annotated[str | None, typer.Argument(help="One export. [default: all]")] = None,
    as_json: JsonOpt = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            "-w",
            help="A live table, updated each interval; into a pipe, a document per interval.",
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option(help="Seconds between updates with --watch.", min=0.1)
    ] = 1.0,
    state_dir: StateDirOpt = None,
) -> None:
    """Operations, bytes, errors, latency (p50, p99, max), requests in flight, connections."""
    with errors_as_exit(), connect(state_dir) as conn:
        reply = conn.call(StatsRequest(name=name), StatsReply)
        if as_json and not watch:
            print(json.dumps([to_builtins(e) for e in reply.exports], indent=2))
            return
        if not watch:
            console.print(render(reply.exports))
            return
        try:
            if as_json:  # one JSON document per line, each interval
                while True:
                    print(json.dumps([to_builtins(e) for e in reply.exports]), flush=True)
                    time.sleep(interval)
                    reply = conn.call(StatsRequest(name=name), StatsReply)
            previous = {e.name: e for e in reply.exports}
            last = time.monotonic()
            if not console.is_terminal:
                # Into a pipe or file a live table would show only its last frame: a
                # document per interval instead, each opened by a header line.
                while True:
                    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                    print(f"{WATCH_HEADER} {stamp}")
                    console.print(render(reply.exports, previous, time.monotonic() - last))
                    sys.stdout.flush()
                    previous, last = {e.name: e for e in reply.exports}, time.monotonic()
                    time.sleep(interval)
                    reply = conn.call(StatsRequest(name=name), StatsReply)
            with Live(render(reply.exports), console=console, auto_refresh=False) as live:
                while True:
                    time.sleep(interval)
                    reply = conn.call(StatsRequest(name=name), StatsReply)
                    now = time.monotonic()
                    live.update(render(reply.exports, previous, now - last), refresh=True)
                    previous = {e.name: e for e in reply.exports}
                    last = now
        except KeyboardInterrupt:
            pass
