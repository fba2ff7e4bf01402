"""``tapnbd daemon start|stop|status``."""

from __future__ import annotations

import json
import os
import time
from typing import Annotated

import typer
from rich.console import Console

from tapnbd import runtime
from tapnbd.cli._control import JsonOpt, StateDirOpt, client, report
from tapnbd.cli._server_opts import PollUsOpt
from tapnbd.cli.app import PLAIN, app, errors_as_exit, fail, plain
from tapnbd.control.daemon import DaemonConfig
from tapnbd.control.main import run_daemon
from tapnbd.control.messages import (
    ShutdownReply,
    ShutdownRequest,
    StatusReply,
    StatusRequest,
    to_builtins,
)
from tapnbd.control.state import default_state_dir
from tapnbd.server.listener import DEFAULT_MAX_CONNECTIONS

daemon_app = typer.Typer(
    rich_markup_mode=PLAIN,
    help="The control daemon: owns exports and attached devices (blktapctrl).",
    no_args_is_help=True,
)
app.add_typer(daemon_app, name="daemon")
console = Console()


def _off(value: str | None) -> bool:
    return value is not None and value.lower() in ("", "none", "off", "no")


def _given(ctx: typer.Context, *, but: tuple[str, ...]) -> list[str]:
    """The options typed on the command line (not from the environment or defaults)."""
    return [
        p.opts[0] if p.opts else str(p.name)
        for p in ctx.command.params
        if p.name not in but
        and p.name is not None
        and getattr(ctx.get_parameter_source(p.name), "name", "") == "COMMANDLINE"
    ]


@daemon_app.command("start")
def start_cmd(
    ctx: typer.Context,
    state_dir: StateDirOpt = None,
    tcp: Annotated[
        str | None,
        typer.Option(
            envvar="TAPNBD_TCP",
            help="Also serve NBD on TCP HOST:PORT (needs --tls-cert/--tls-key, or "
            "--insecure-tcp). By default NBD is only on the 0600 unix socket.",
        ),
    ] = None,
    insecure_tcp: Annotated[
        bool,
        typer.Option(
            "--insecure-tcp", help="Serve --tcp without TLS: every local user can connect."
        ),
    ] = False,
    tls_cert: Annotated[str | None, typer.Option(help="TLS certificate for --tcp (PEM).")] = None,
    tls_key: Annotated[str | None, typer.Option(help="TLS private key for --tcp (PEM).")] = None,
    tls_ca: Annotated[
        str | None, typer.Option(help="CA certificate; TCP clients must present one it signed.")
    ] = None,
    expose_paths: Annotated[
        bool, typer.Option("--expose-paths", help="Show image paths in NBD export descriptions.")
    ] = False,
    unix: Annotated[
        bool, typer.Option("--unix/--no-unix", help="Serve NBD on nbd.sock in the state dir.")
    ] = True,
    metrics: Annotated[
        str | None,
        typer.Option(
            envvar="TAPNBD_METRICS",
            help="Serve Prometheus metrics on unix:PATH (mode 0600) or on a loopback HOST:PORT.",
        ),
    ] = None,
    stats: Annotated[
        bool, typer.Option("--stats/--no-stats", help="Count operations and latency.")
    ] = True,
    poll_us: PollUsOpt = 0,
    max_connections: Annotated[
        int, typer.Option(help="Refuse NBD clients beyond this many.")
    ] = DEFAULT_MAX_CONNECTIONS,
    foreground: Annotated[
        bool, typer.Option("--foreground", help="Run in this process instead of in the background.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Start the daemon (other commands start it on their own when needed)."""
    directory = state_dir or default_state_dir()
    config = DaemonConfig(
        state_dir=directory,
        tcp=None if _off(tcp) else tcp,
        insecure_tcp=insecure_tcp,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        expose_paths=expose_paths,
        unix=unix,
        metrics=None if _off(metrics) else metrics,
        stats=stats,
        poll_us=poll_us,
        max_connections=max_connections,
    )
    with errors_as_exit():
        config.check()  # before anything starts: refused here, not in the daemon's log
    if foreground:
        with errors_as_exit():
            code = runtime.run(run_daemon(config, verbose=verbose))
        raise typer.Exit(code)
    c = client(directory)
    with errors_as_exit():
        conn = c.try_connect()
        if conn is not None:
            with conn:
                status = conn.call(StatusRequest(), StatusReply)
            running = f"the daemon is already running (pid {status.pid}); its log is {status.log}"
            ignored = _given(ctx, but=("state_dir",))
            if ignored:
                # Options a running daemon cannot take must not vanish silently.
                fail(
                    f"{running}: {', '.join(ignored)} would be ignored; stop it first "
                    "(tapnbd daemon stop) to start it with new options"
                )
            report(running)
            return
        c.recover()
        args = ["--unix" if unix else "--no-unix", "--stats" if stats else "--no-stats"]
        args += ["--max-connections", str(max_connections), "--poll-us", str(poll_us)]
        if tcp is not None:
            args += ["--tcp", tcp or "none"]
        if insecure_tcp:
            args.append("--insecure-tcp")
        for flag, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key), ("--tls-ca", tls_ca)):
            if path:
                args += [flag, os.path.abspath(path)]
        if expose_paths:
            args.append("--expose-paths")
        if metrics is not None:
            args += ["--metrics", metrics or "none"]
        if verbose:
            args.append("--verbose")
        with c.start(args) as conn:
            status = conn.call(StatusRequest(), StatusReply)
    _print_status(status)


@daemon_app.command("stop")
def stop_cmd(
    state_dir: StateDirOpt = None,
    detach_all: Annotated[
        bool,
        typer.Option("--all", help="Detach every device too (refused while one is mounted)."),
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="With --all: detach lazily; mounted devices still refuse."),
    ] = False,
) -> None:
    """Drain requests in flight, flush every export, and exit.

    Attached devices keep running (each has a data-path process of its own) and the
    next daemon re-adopts them, unless --all is given.
    """
    c = client(state_dir)
    with errors_as_exit():
        status = c.status()
        if status is None and detach_all and c.has_attachments():
            # The devices outlived their daemon: start one to re-adopt and detach them.
            with c.connect() as conn:
                status = conn.call(StatusRequest(), StatusReply)
        if status is None:
            report("the daemon is not running")
            return
        with c.connect(autostart=False) as conn:
            reply = conn.call(ShutdownRequest(force=force, all=detach_all), ShutdownReply)
        for device in reply.detached:
            report(f"detached {device}")
        for device in reply.kept:
            report(f"left {device} attached (its data path runs on; `daemon stop --all` detaches)")
        for name in reply.flushed:
            report(f"flushed and closed {name!r}")
        if not c.wait_stopped():
            fail(f"the daemon (pid {status.pid}) did not exit; see {status.log}")
    report(f"stopped the daemon (pid {status.pid})")
    if reply.unclean:
        names = ", ".join(map(repr, reply.unclean))
        fail(f"{names}: closed without a last flush, as a crash would leave it; see {status.log}")


@daemon_app.command("status")
def status_cmd(state_dir: StateDirOpt = None, as_json: JsonOpt = False) -> None:
    """Say whether the daemon runs, where, and what it serves. Exit status 3 if it does not."""
    with errors_as_exit():
        status = client(state_dir).status()
    if status is None:
        if as_json:
            print(json.dumps({"running": False}))
        else:
            report("the daemon is not running")
        raise typer.Exit(3)
    if as_json:
        print(json.dumps({"running": True, **to_builtins(status)}, indent=2))
        return
    _print_status(status)


def _print_status(status: StatusReply) -> None:
    uptime = time.time() - status.started
    console.print(f"[bold]tapnbd daemon[/] {status.version}, pid {status.pid}, up {uptime:.0f} s")
    console.print(plain(f"  state dir  {status.state_dir}"), highlight=False)
    console.print(plain(f"  log        {status.log}"), highlight=False)
    console.print(plain(f"  NBD        {', '.join(status.listen) or 'nowhere'}"), highlight=False)
    if status.metrics:
        where = (
            f"{status.metrics} (GET /metrics)"
            if status.metrics.startswith("unix:")
            else f"http://{status.metrics}/metrics"
        )
        console.print(plain(f"  metrics    {where}"), highlight=False)
    console.print(f"  exports    {status.exports}, attached devices {status.attachments}")
    if not status.stats_enabled:
        console.print("  statistics off")
    if status.poll_us:
        console.print(f"  polling    up to {status.poll_us} us for each client's next request")
