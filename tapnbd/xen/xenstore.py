"""A tiny xenstore for the vbd handshake: string keys and values in one JSON file.

Real xenstore is a daemon with transactions and watches. The handshake needs far less:
a handful of keys written a few times per connection. So the store is
``DIR/xenstore.json``, a flat object of ``/path/key -> "string"``. Writers take an
exclusive ``flock`` on ``DIR/xenstore.lock``, read, change and atomically replace the
file, which makes each ``write``/``write_many`` a transaction. Readers need no lock: a
rename is atomic, so they see the old file or the new one. Watches are polling: a few
small reads every few milliseconds while a side waits for the other's state.

Paths and keys are those of the 2007 Linux drivers (../shared/spec/blktap.md 4.4):
the frontend's ``/local/domain/<domU>/device/vbd/<devid>`` and the backend's
``/local/domain/0/backend/tap/<domU>/<devid>`` (blktap's backend type was "tap").
"""

from __future__ import annotations

import asyncio
import enum
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from pathlib import Path

T = TypeVar("T")

STORE = "xenstore.json"
LOCK = "xenstore.lock"


class XenbusState(enum.IntEnum):
    """enum xenbus_state (io/xenbus.h)."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


def backend_dir(domid: int, devid: int) -> str:
    return f"/local/domain/0/backend/tap/{domid}/{devid}"


def frontend_dir(domid: int, devid: int) -> str:
    return f"/local/domain/{domid}/device/vbd/{devid}"


class XenStore:
    """Key/value access to ``DIR/xenstore.json``; safe across processes."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, STORE)
        self._lock_path = os.path.join(self.directory, LOCK)

    # Reading.

    def snapshot(self) -> dict[str, str]:
        """Every key, as of one moment."""
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read())
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def read(self, path: str) -> str | None:
        return self.snapshot().get(path)

    def read_int(self, path: str, default: int | None = None) -> int | None:
        value = self.read(path)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            return default

    def ls(self, path: str) -> dict[str, str]:
        """The keys directly under ``path``, by name."""
        prefix = path.rstrip("/") + "/"
        return {
            k[len(prefix) :]: v
            for k, v in self.snapshot().items()
            if k.startswith(prefix) and "/" not in k[len(prefix) :]
        }

    # Writing: each call is one transaction.

    def write(self, path: str, value: str | int) -> None:
        self.write_many({path: value})

    def write_many(
        self,
        values: Mapping[str, str | int],
        *,
        remove: Iterable[str] = (),
        clear: bool = False,
    ) -> None:
        """Remove the subtrees in ``remove`` (everything if ``clear``), then write."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = {} if clear else self.snapshot()
            for prefix in remove:
                p = prefix.rstrip("/")
                for k in [k for k in data if k == p or k.startswith(p + "/")]:
                    del data[k]
            for k, v in values.items():
                data[k] = str(v)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        finally:
            os.close(fd)  # releases the flock

    def rm(self, path: str) -> None:
        self.write_many({}, remove=[path])

    # vbd states.

    def state(self, directory: str) -> XenbusState:
        """The ``state`` key of a device directory; UNKNOWN if absent or garbage."""
        value = self.read_int(f"{directory}/state", 0)
        try:
            return XenbusState(value or 0)
        except ValueError:
            return XenbusState.UNKNOWN

    def switch_state(self, directory: str, state: XenbusState) -> None:
        """xenbus_switch_state."""
        self.write(f"{directory}/state", int(state))

    # Watches, by polling.

    def wait(
        self,
        check: Callable[[dict[str, str]], T | None],
        *,
        timeout: float,
        interval: float = 0.002,
    ) -> T:
        """Poll until ``check(snapshot)`` returns something other than None; return it."""
        deadline = time.monotonic() + timeout
        while True:
            got = check(self.snapshot())
            if got is not None:
                return got
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout:g}s waiting on {self.path}")
            time.sleep(interval)

    async def wait_async(
        self,
        check: Callable[[dict[str, str]], T | None],
        *,
        interval: float = 0.005,
        wake: asyncio.Event | None = None,
    ) -> T:
        """Like ``wait`` without blocking the loop; ``wake`` cuts a poll interval short."""
        while True:
            got = check(self.snapshot())
            if got is not None:
                return got
            if wake is None:
                await asyncio.sleep(interval)
            else:
                try:
                    await asyncio.wait_for(wake.wait(), interval)
                except TimeoutError:
                    pass


def state_of(snapshot: Mapping[str, str], directory: str) -> XenbusState:
    """The state of ``directory`` in a snapshot (UNKNOWN if absent or garbage)."""
    try:
        return XenbusState(int(snapshot.get(f"{directory}/state", "0")))
    except ValueError:
        return XenbusState.UNKNOWN
