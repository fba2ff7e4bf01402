"""A tiny xenstore for the vbd handshake: string keys and values in one JSON file.

Real xenstore is a daemon with transactions and watches. The handshake needs far less:
a handful of keys written a few times per connection. So the store is
``DIR/xenstore.json``, a flat object of ``/path/key -> "string"``. Writers take an
exclusive ``flock`` on ``DIR/xenstore.lock``, read, change and atomically replace the
file, which makes each ``write``/``write_many`` a transaction. Readers need no lock: a
rename is atomic, so they see the old file or the new one. Watches are polling: a few
small reads every few milliseconds while a side waits for the other's state.

The file is written by both sides, so each side treats what it reads as hostile: it
is opened without following symlinks, read up to ``MAX_STORE_SIZE`` bytes, and must be
one flat object of string keys and values within xenstore's own limits. A store that
is not is rejected with one log line, and the reader goes on with the last valid copy
it saw (a writer rewrites the file from it), so garbage can neither crash a side nor
grow it. Writes replace the file by rename from a fresh, unpredictably named temporary
file (O_EXCL), and the lock is opened with O_NOFOLLOW: a symlink planted at either name
makes nobody write through it.

Paths and keys are those of the 2007 Linux drivers (../shared/spec/blktap.md 4.4):
the frontend's ``/local/domain/<domU>/device/vbd/<devid>`` and the backend's
``/local/domain/0/backend/tap/<domU>/<devid>`` (blktap's backend type was "tap").
"""

from __future__ import annotations

import asyncio
import enum
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, TypeVar

from tapnbd.errors import TapnbdError
from tapnbd.safefs import UnsafePathError, atomic_write, open_private, read_capped

if TYPE_CHECKING:
    from pathlib import Path

T = TypeVar("T")

STORE = "xenstore.json"
LOCK = "xenstore.lock"
#: xenstored's limits: XENSTORE_ABS_PATH_MAX and XENSTORE_PAYLOAD_MAX (io/xs_wire.h).
MAX_PATH = 3072
MAX_VALUE = 4096
#: A vbd's handshake needs a few dozen keys; this leaves room for several vbds.
MAX_KEYS = 4096
#: How long a write waits for another writer's lock, and how often it looks.
LOCK_TIMEOUT = 5.0
LOCK_POLL = 0.002
#: A full store of the biggest keys and values would not fit; a real one is ~2 KiB.
MAX_STORE_SIZE = 1 << 20

log = logging.getLogger("tapnbd.xen")


class XenStoreError(TapnbdError):
    """xenstore.json (or its lock) is unsafe or malformed; the message says how."""


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _held(timeout: float) -> str:
    return f"cannot lock the xenstore: {LOCK} held by another writer for {timeout:g}s"


def parse_store(data: bytes) -> dict[str, str]:
    """The keys of a store file, or XenStoreError naming what is wrong with it."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        # RecursionError: "[[[[...": the C decoder gives up on deep nesting.
        raise XenStoreError(f"{STORE}: not JSON: {str(e)[:100]}") from None
    if not isinstance(obj, dict):
        raise XenStoreError(f"{STORE}: a JSON {type(obj).__name__}, not an object")
    if len(obj) > MAX_KEYS:
        raise XenStoreError(f"{STORE}: {len(obj)} keys, more than {MAX_KEYS}")
    for key, value in obj.items():
        if not key.startswith("/") or len(key) > MAX_PATH:
            raise XenStoreError(
                f"{STORE}: key {key[:80]!r} is not an absolute path of at most {MAX_PATH} bytes"
            )
        if not isinstance(value, str):
            raise XenStoreError(
                f"{STORE}: {key[:80]}: value is a {type(value).__name__}, not a string"
            )
        if len(value) > MAX_VALUE:
            raise XenStoreError(f"{STORE}: {key[:80]}: value is longer than {MAX_VALUE}")
    return obj


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
        #: What the last valid read or our last write held: the store to go on with
        #: while the file is rejected.
        self._last_good: dict[str, str] = {}
        #: Why the file was last rejected, so each new reason is logged once.
        self._rejected = ""

    # Reading.

    def load(self) -> dict[str, str]:
        """Every key, as of one moment; XenStoreError if the file is unsafe or malformed."""
        try:
            data = read_capped(self.path, MAX_STORE_SIZE)
        except FileNotFoundError:
            return {}
        except (OSError, UnsafePathError) as e:
            raise XenStoreError(str(e)) from None  # names the path
        return parse_store(data)

    def snapshot(self) -> dict[str, str]:
        """Every key, as of one moment; the last valid copy while the file is rejected."""
        try:
            data = self.load()
        except XenStoreError as e:
            if str(e) != self._rejected:
                self._rejected = str(e)
                log.warning("xenstore rejected, going on with the last valid copy: %s", e)
            return dict(self._last_good)
        self._rejected = ""
        self._last_good = data
        return dict(data)

    def exists(self) -> bool:
        return os.path.lexists(self.path)

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
        return ls_of(self.snapshot(), path)

    # Writing: each call is one transaction.

    def write(self, path: str, value: str | int) -> None:
        self.write_many({path: value})

    def write_many(
        self,
        values: Mapping[str, str | int],
        *,
        remove: Iterable[str] = (),
        clear: bool = False,
        timeout: float = LOCK_TIMEOUT,
    ) -> None:
        """Remove the subtrees in ``remove`` (everything if ``clear``), then write.

        XenStoreError if the lock is not ours within ``timeout`` seconds.
        """
        fd = self._open_lock()
        try:
            deadline = time.monotonic() + timeout
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    raise XenStoreError(_held(timeout))
                time.sleep(LOCK_POLL)
            self._write_locked(values, remove, clear)
        finally:
            os.close(fd)  # releases the flock

    async def write_many_async(
        self,
        values: Mapping[str, str | int],
        *,
        remove: Iterable[str] = (),
        timeout: float = LOCK_TIMEOUT,
    ) -> None:
        """``write_many`` that waits for the lock without blocking the event loop.

        Whoever holds the lock (a frontend shares it) cannot stall the backend's data
        path, and cannot hold a state change back for more than ``timeout`` seconds.
        """
        fd = self._open_lock()
        try:
            deadline = time.monotonic() + timeout
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    raise XenStoreError(_held(timeout))
                await asyncio.sleep(LOCK_POLL)
            self._write_locked(values, remove, False)
        finally:
            os.close(fd)

    def _open_lock(self) -> int:
        try:
            return open_private(self._lock_path, os.O_RDWR | os.O_CREAT)
        except (OSError, UnsafePathError) as e:
            raise XenStoreError(f"cannot lock the xenstore: {e}") from None

    def _write_locked(
        self, values: Mapping[str, str | int], remove: Iterable[str], clear: bool
    ) -> None:
        data = {} if clear else self.snapshot()
        for prefix in remove:
            p = prefix.rstrip("/")
            for k in [k for k in data if k == p or k.startswith(p + "/")]:
                del data[k]
        for k, v in values.items():
            data[k] = str(v)
        text = json.dumps(data, indent=0, sort_keys=True).encode()
        try:
            atomic_write(self.path, text, mode=0o600)
        except (OSError, UnsafePathError) as e:
            raise XenStoreError(f"cannot write the xenstore: {e}") from None
        self._last_good = data

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


def ls_of(snapshot: Mapping[str, str], path: str) -> dict[str, str]:
    """The keys directly under ``path`` in a snapshot, by name."""
    prefix = path.rstrip("/") + "/"
    return {
        k[len(prefix) :]: v
        for k, v in snapshot.items()
        if k.startswith(prefix) and "/" not in k[len(prefix) :]
    }
