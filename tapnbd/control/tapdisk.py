"""The data path of one attachment: a process that serves one image, whatever the daemon does.

blktap ran a ``tapdisk`` per disk, apart from blktapctrl, so that the control side could
crash without taking a disk away from a guest. This is ours::

    python -m tapnbd.control.tapdisk DIR --image IMG --name NAME --token T [--format F]
                                         [--read-only] [--no-stats] [--poll-us N]

It opens the image, serves it over NBD on ``DIR/nbd.sock`` (the device's client, nbdfuse
or the kernel's, connects there and nowhere else) and answers the daemon on
``DIR/ctl.sock``. Both sockets are 0600, in the daemon's 0700 directory, and peers are
checked with SO_PEERCRED. The daemon starts it in a session of its own, so a kill -9 of
the daemon (or of its process group) leaves it running.

When it is ready it writes ``DIR/tapdisk.json`` (pid, token, sockets, image, the format
it detected, and later the device and mount point the daemon gives it) and prints the
same record as one JSON line on stdout, which it then points at /dev/null: nobody need
read it again, and a dead reader must not kill us with SIGPIPE.

The control socket takes one JSON object per line, ``{"op": ...}``:

- ``status``: the record;
- ``stats``: the export's counters (``Stats.snapshot``);
- ``device``: remember ``device`` and ``mountdir`` in the record;
- ``stop``: drain requests in flight, flush and close the image, answer, exit.

SIGTERM and SIGINT stop it the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from typing import Any

import msgspec

from formats.filters.cachemode import CACHE_MODES, open_for_cache
from formats.imagemap import described, overlay_wanted
from tapnbd import runtime, safefs
from tapnbd.backend import Backend
from tapnbd.control.auth import allowed, peer_uid
from tapnbd.control.messages import Trust
from tapnbd.errors import TapnbdError
from tapnbd.logformat import log_to_stderr
from tapnbd.server.exports import Export, ExportRegistry
from tapnbd.server.listener import NBDServer
from tapnbd.server.poll import POLL_US_MAX

log = logging.getLogger("tapnbd.tapdisk")

#: How the daemon recognises one of ours in /proc/PID/cmdline.
MODULE = "tapnbd.control.tapdisk"
RECORD = "tapdisk.json"
NBD_SOCKET = "nbd.sock"
CONTROL_SOCKET = "ctl.sock"
#: Control lines are small; anything longer is hostile.
MAX_CONTROL_LINE = 4096


def write_record(directory: str, record: dict[str, Any]) -> None:
    """``tapdisk.json``, atomically (a new file, renamed over the old one)."""
    data = json.dumps(record, indent=2).encode() + b"\n"
    safefs.atomic_write(os.path.join(directory, RECORD), data)


class Tapdisk:
    def __init__(self, args: argparse.Namespace) -> None:
        self.dir: str = os.path.abspath(args.dir)
        self.args = args
        self.registry = ExportRegistry()
        self.server = NBDServer(self.registry, poll_us=args.poll_us)
        self.export: Export | None = None
        self.control: asyncio.AbstractServer | None = None
        self.stop = asyncio.Event()
        self.record: dict[str, Any] = {}
        self.closed = False
        self.unclean = False  # the last close did not flush (Backend.close_within)

    async def start(self) -> None:
        a = self.args
        overlay = overlay_wanted(a.throwaway, a.read_only)
        driver = await open_for_cache(
            a.image,
            a.cache,
            fmt=a.format,
            read_only=a.read_only,
            rules=a.trust.rules(share=a.share, guard_raw=a.probed_raw),
            snapshot=a.snapshot,
            # The overlay is this process's: it goes when the data path exits.
            throwaway=overlay,
        )
        try:
            # A snapshot opens read-only: without an overlay, so is the Backend.
            backend = Backend(driver, read_only=a.read_only)
            backend.stats.enabled = a.stats
            # No path in the description: NBD clients see it.
            what = described(driver, overlay, a.snapshot)
            self.export = Export(
                a.name, backend, a.image, f"{a.name} ({what})", share=a.share, throwaway=overlay
            )
            self.registry.add(self.export, default=True)
        except BaseException:
            await driver.close()
            raise
        nbd_sock = os.path.join(self.dir, NBD_SOCKET)
        ctl_sock = os.path.join(self.dir, CONTROL_SOCKET)
        old = os.umask(0o177)
        try:
            # The device's client runs as the daemon's user (or root): nobody else.
            await self.server.listen_unix(nbd_sock, mode=0o600, allow=allowed)
            self.control = await asyncio.start_unix_server(
                self._client, ctl_sock, limit=MAX_CONTROL_LINE
            )
        finally:
            os.umask(old)
        self.record = {
            "pid": os.getpid(),
            "token": a.token,
            "name": a.name,
            "image": a.image,
            # The format the driver stack was opened as (detected when asked for "auto").
            "format": self.export.format,
            "size": backend.size,
            "read_only": backend.read_only,
            "multi_conn": backend.can_multi_conn,
            # Read back from the server, not the arguments: what its connections do.
            "poll_us": self.server.poll_ns // 1000,
            "socket": nbd_sock,
            "control": ctl_sock,
            "device": "",
            "mountdir": "",
        }
        write_record(self.dir, self.record)
        log.info("tapdisk %d serving %r (%s) on %s", os.getpid(), a.name, a.image, nbd_sock)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.control is not None:
            self.control.close()
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.dir, CONTROL_SOCKET))
        # Drain, flush and close the image.
        self.unclean = bool(await self.server.shutdown())
        if not self.unclean:
            log.info("tapdisk %d flushed and closed %r", os.getpid(), self.args.name)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _pid, uid = peer_uid(writer.get_extra_info("socket"))
            if not allowed(uid):
                return
            while not self.stop.is_set():
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b'{"error": "message too long"}\n')
                    return
                if not line:
                    return
                reply = await self._handle(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
                if self.closed:
                    self.stop.set()  # only once the reply to "stop" is out
        except (ConnectionError, OSError) as e:
            log.debug("control client: %s", e)
        finally:
            writer.close()

    async def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (ValueError, RecursionError):
            return {"error": "bad request: not JSON"}
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            return {"error": "bad request: expected an object with an op"}
        op = req["op"]
        if op == "status":
            return dict(self.record)
        if op == "stats":
            assert self.export is not None
            stats = self.export.backend.stats
            return {"snapshot": stats.snapshot(), "enabled": stats.enabled}
        if op == "device":
            device, mountdir = req.get("device", ""), req.get("mountdir", "")
            if not isinstance(device, str) or not isinstance(mountdir, str):
                return {"error": "bad request: device and mountdir are strings"}
            self.record.update(device=device, mountdir=mountdir)
            write_record(self.dir, self.record)
            return {"ok": True}
        if op == "stop":
            await self.close()
            return {"ok": True, "flushed": not self.unclean}
        return {"error": f"unknown op {op[:64]!r}"}


async def run(args: argparse.Namespace) -> int:
    tap = Tapdisk(args)
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    try:
        await tap.start()
    except (TapnbdError, OSError) as e:
        await tap.server.shutdown()
        print(json.dumps({"error": str(e)}), flush=True)
        return 1
    print(json.dumps(tap.record), flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    waiters = [asyncio.ensure_future(tap.stop.wait()), asyncio.ensure_future(signalled.wait())]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    if not tap.stop.is_set():
        log.info("signalled: stopping")
    await tap.close()
    return 1 if tap.unclean else 0


def trust_argv(trust: Trust) -> list[str]:
    """The command-line words that give a tapdisk the admin's trust options (none for
    the defaults: its command line stays as it was)."""
    return [] if trust == Trust() else ["--trust", msgspec.json.encode(trust).decode()]


def _trust(text: str) -> Trust:
    try:
        return msgspec.json.decode(text, type=Trust)
    except msgspec.DecodeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    p.add_argument("dir")
    p.add_argument("--image", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--format", default="auto")
    p.add_argument("--snapshot", default=None, help="an internal qcow2 snapshot, read-only")
    p.add_argument("--read-only", action="store_true")
    p.add_argument(
        "--share", action="store_true", help="forbid nothing, test nothing (formats.locks)"
    )
    p.add_argument(
        "--throwaway", action="store_true", help="writes go to a throwaway qcow2 overlay"
    )
    p.add_argument(
        "--probed-raw",
        action="store_true",
        help="--format raw was probed by the daemon: guard it as a probed raw image",
    )
    p.add_argument("--cache", default="writeback", choices=CACHE_MODES, help="qemu-nbd's")
    # The admin's trust options for the image's backing chain (formats.OpenRules).
    p.add_argument("--trust", type=_trust, default=Trust(), help="messages.Trust, as JSON")
    p.add_argument("--no-stats", dest="stats", action="store_false")
    p.add_argument(
        "--poll-us",
        type=_poll_us,
        default=0,
        metavar="N",
        help="microseconds to wait for a client's next request before sleeping (0: off)",
    )
    return p.parse_args(argv)


def _poll_us(text: str) -> int:
    """``--poll-us``: the range ``tapnbd serve`` and ``daemon start`` take."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value <= POLL_US_MAX:
        raise argparse.ArgumentTypeError(f"{value} is not in 0..{POLL_US_MAX}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    log_to_stderr(logging.INFO, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return runtime.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
