"""The daemon's process main: the state directory's lock, logging, signals, run, stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from tapnbd.control.daemon import Daemon, DaemonConfig
from tapnbd.control.state import StateDir
from tapnbd.errors import TapnbdError
from tapnbd.logformat import LogFormatter

log = logging.getLogger("tapnbd.control")


def setup_logging(d: StateDir, verbose: bool) -> None:
    root = logging.getLogger("tapnbd")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Opened by safefs (no symlink followed), not by FileHandler's open(path).
    handler = logging.StreamHandler(open(d.open_log(), "a", buffering=1))  # noqa: SIM115
    handler.setFormatter(LogFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    if sys.stderr.isatty():
        console = logging.StreamHandler()
        console.setFormatter(LogFormatter("tapnbd: %(message)s"))
        root.addHandler(console)


async def run_daemon(config: DaemonConfig, *, verbose: bool = False) -> int:
    """Run the daemon in this process until ``daemon stop``, SIGTERM or SIGINT."""
    d = StateDir(config.state_dir)
    d.create()
    os.umask(0o077)
    pid_fd = d.lock()
    if pid_fd is None:
        raise TapnbdError(f"a daemon is already running for {d.path} (pid {d.read_pid()})")
    try:
        setup_logging(d, verbose)
        daemon = Daemon(config)
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, signalled.set)
        try:
            try:
                await daemon.start(pid_fd)
            except BaseException:
                await daemon.server.shutdown()
                await daemon.close()
                raise
            waiters = [
                asyncio.ensure_future(daemon.stopped.wait()),
                asyncio.ensure_future(signalled.wait()),
            ]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
            if signalled.is_set() and not daemon.stopped.is_set():
                log.info("signalled: stopping (attached devices keep running)")
                async with daemon.lock:
                    await daemon.stop()
            await daemon.close()
            log.info("stopped")
            if daemon.unclean:
                return 1  # an export's close did not flush; the log says which

        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    finally:
        with contextlib.suppress(OSError):
            d.clear_pid(pid_fd)
        os.close(pid_fd)
    return 0
