"""The xenbus control plane of one vbd: xenstore states, one frontend at a time.

Lifecycle (``VbdServer.run``), following the 2007 Linux drivers' xenbus dance:

1. As the toolstack, create the backend and frontend directories in Initialising.
2. As blkback's probe, write the ``feature-*`` keys and go to InitWait.
3. When the frontend is Initialised, read ``ring-ref``, ``event-channel``,
   ``protocol`` and ``feature-persistent``, map the ring through the grant table, bind the event channel, write
   ``sectors``, ``sector-size`` and ``info``, and go to Connected.
4. Serve (``blkback.BlkBack``) until the frontend goes to Closing, or its event channel
   closes because it died. Then stop taking requests, let those in flight finish,
   unmap, and go to Closing and Closed.
5. When a frontend is back in Initialising, go to InitWait for the reconnect (or, with
   ``once``, exit).

"Backend" in xenstore paths and state names is Xen's word for blkback's side of the
vbd; in code, ``backend`` is always the core ``tapnbd.backend.Backend``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from tapnbd.xen.blkback import BlkBack, RingStats
from tapnbd.xen.blkif import (
    FEATURE_INDIRECT,
    FEATURE_KEYS,
    FEATURE_PERSISTENT,
    MAX_INDIRECT_SEGMENTS,
    MAX_PERSISTENT_GRANTS,
    PROTOCOL,
    SECTOR_SIZE,
    Op,
    VdiskInfo,
)
from tapnbd.xen.evtchn import EventChannelClosed, bind_interdomain
from tapnbd.xen.grant import GrantError, GrantMapper
from tapnbd.xen.ring import BackRing, SharedRing
from tapnbd.xen.xenstore import (
    XenbusState,
    XenStore,
    XenStoreError,
    backend_dir,
    frontend_dir,
    state_of,
)

if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from tapnbd.backend import Backend

log = logging.getLogger("tapnbd.xen")

#: The guest's domain id and its first disk, xvda = (202 << 8) | 0.
DEFAULT_DOMID = 1
DEFAULT_DEVID = 51712
#: How often the backend looks at the frontend's state while connected. The event
#: channel reports a death at once; this only paces noticing a polite Closing.
WATCH_INTERVAL = 0.02
#: How long a state change waits for a xenstore lock that someone else holds.
LOCK_TIMEOUT = 1.0
#: How long a frontend that bound its event channel has to send its memory.
CONNECT_TIMEOUT = 5.0


class ConnectError(Exception):
    """The frontend's ring, grants or event channel could not be set up."""


class VbdServer:
    """Serves one vbd over ``backend``, one frontend at a time, in ``directory``."""

    def __init__(
        self,
        backend: Backend,
        directory: str | Path,
        *,
        domid: int = DEFAULT_DOMID,
        devid: int = DEFAULT_DEVID,
        params: str = "",
        once: bool = False,
    ) -> None:
        self.backend = backend
        self.directory = os.fspath(directory)
        self.domid = domid
        self.devid = devid
        self.params = params
        self.once = once
        self.xs = XenStore(self.directory)
        self.be = backend_dir(domid, devid)
        self.fe = frontend_dir(domid, devid)
        self.stats = RingStats()
        self.connection: BlkBack | None = None
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()

    @property
    def state(self) -> XenbusState:
        return self.xs.state(self.be)

    def stop(self) -> None:
        """Ask ``run`` to disconnect politely and return."""
        self._stop.set()

    async def wait_ready(self) -> None:
        """Until the backend is in InitWait for the first time."""
        await self._ready.wait()

    async def _switch(self, state: XenbusState) -> None:
        log.info("vbd %d/%d: backend %s", self.domid, self.devid, state.name)
        await self._write({f"{self.be}/state": int(state)})

    async def _write(self, values: dict[str, str | int]) -> bool:
        """One xenstore transaction; a store we cannot write is logged, not fatal.

        Whoever planted the symlink or garbage, or holds the lock, that refuses the
        write may let go, and the next write then goes through; the frontend meanwhile
        sees no change.
        """
        try:
            await self.xs.write_many_async(values, timeout=LOCK_TIMEOUT)
        except XenStoreError as e:
            log.error("vbd %d/%d: xenstore write refused: %s", self.domid, self.devid, e)
            return False
        return True

    # The handshake.

    def _create_device(self) -> None:
        """The toolstack's part, then blkback's probe: both directories, then InitWait."""
        b = self.backend
        writable = not b.read_only
        self.xs.write_many(
            {
                f"{self.be}/frontend": self.fe,
                f"{self.be}/frontend-id": self.domid,
                f"{self.be}/params": self.params,
                f"{self.be}/type": "tap",
                f"{self.be}/mode": "w" if writable else "r",
                f"{self.be}/dev": "xvda",
                f"{self.be}/state": int(XenbusState.INITIALISING),
                f"{self.fe}/backend": self.be,
                f"{self.fe}/backend-id": 0,
                f"{self.fe}/virtual-device": self.devid,
                f"{self.fe}/device-type": "disk",
                f"{self.fe}/state": int(XenbusState.INITIALISING),
            },
            remove=[self.be, self.fe],
        )
        features = {
            Op.WRITE_BARRIER: b.can_flush and writable,
            Op.FLUSH_DISKCACHE: b.can_flush and writable,
            Op.DISCARD: b.can_trim,
        }
        keys: dict[str, str | int] = {
            f"{self.be}/{FEATURE_KEYS[op]}": int(on) for op, on in features.items()
        }
        if b.can_trim:
            keys[f"{self.be}/discard-granularity"] = b.block_size.preferred
            keys[f"{self.be}/discard-alignment"] = 0
            keys[f"{self.be}/discard-secure"] = 0
        keys[f"{self.be}/{FEATURE_INDIRECT}"] = MAX_INDIRECT_SEGMENTS
        keys[f"{self.be}/{FEATURE_PERSISTENT}"] = 1
        keys[f"{self.be}/state"] = int(XenbusState.INIT_WAIT)
        self.xs.write_many(keys)  # at start: a store we cannot write is fatal
        log.info("vbd %d/%d: backend INIT_WAIT in %s", self.domid, self.devid, self.directory)

    async def _connect(self, snap: dict[str, str]) -> BlkBack:
        """Bind the frontend's event channel, take its memory, map its ring.

        blkback's connect_ring, with one step of ours: the frontend's memory arrives as
        a sealed memfd over the event channel (grant.py says why).
        """
        try:
            ring_ref = int(snap[f"{self.fe}/ring-ref"])
            port = int(snap[f"{self.fe}/event-channel"])
        except (KeyError, ValueError) as e:
            raise ConnectError(f"frontend wrote no usable ring-ref/event-channel: {e}") from None
        protocol = snap.get(f"{self.fe}/protocol", PROTOCOL)
        if protocol != PROTOCOL:
            raise ConnectError(f"unsupported protocol {protocol!r}, only {PROTOCOL!r}")
        try:
            evtchn = bind_interdomain(self.directory, self.domid, port)
        except (EventChannelClosed, ValueError, OverflowError) as e:
            raise ConnectError(str(e)) from None
        if (uid := evtchn.peer_uid) != os.geteuid():
            # Someone else's process bound the port's abstract name first.
            evtchn.close()
            raise ConnectError(f"event channel {port} is bound by uid {uid}, not ours")
        grants: GrantMapper | None = None
        try:
            fd = await evtchn.receive_fd(CONNECT_TIMEOUT)
            grants = GrantMapper(fd, domid=0, owner=self.domid)
            sring = SharedRing(grants.map(ring_ref, readonly=False))
        except (GrantError, EventChannelClosed, TimeoutError, ValueError) as e:
            if grants is not None:
                grants.close()
            evtchn.close()
            what = str(e) or "sent no memory in time"
            raise ConnectError(f"frontend's memory refused: {what}") from None
        if snap.get(f"{self.fe}/{FEATURE_PERSISTENT}") == "1":
            # blkback's connect_ring: persistent only when both ends said so.
            grants.persist(MAX_PERSISTENT_GRANTS)
            log.info("vbd %d/%d: persistent grants", self.domid, self.devid)
        # BACK_RING_INIT: our private indices start at 0, as SHARED_RING_INIT left them.
        return BlkBack(self.backend, BackRing(sring), grants, evtchn, self.stats)

    async def _publish_disk(self) -> None:
        b = self.backend
        info = VdiskInfo(0) if not b.read_only else VdiskInfo.READONLY
        await self._write(
            {
                f"{self.be}/sectors": b.size // SECTOR_SIZE,
                f"{self.be}/sector-size": SECTOR_SIZE,
                f"{self.be}/info": int(info),
                f"{self.be}/state": int(XenbusState.CONNECTED),
            }
        )
        log.info("vbd %d/%d: backend CONNECTED", self.domid, self.devid)

    async def _watch(self, check: Any, wake: asyncio.Event | None = None) -> Any:
        """Poll xenstore until ``check`` answers or we are asked to stop (None)."""
        stop = self._stop

        def check_or_stop(snap: dict[str, str]) -> object | None:
            if stop.is_set():
                return False
            got: object | None = check(snap)
            return got

        got = await self.xs.wait_async(check_or_stop, interval=WATCH_INTERVAL, wake=wake)
        return None if got is False else got

    async def run(self) -> None:
        self._create_device()
        self._ready.set()
        try:
            while not self._stop.is_set():
                snap = await self._watch(
                    lambda s: s if state_of(s, self.fe) == XenbusState.INITIALISED else None
                )
                if snap is None:
                    break
                try:
                    conn = await self._connect(snap)
                except ConnectError as e:
                    log.warning("vbd %d/%d: connect failed: %s", self.domid, self.devid, e)
                    await self._switch(XenbusState.CLOSED)
                else:
                    await self._serve(conn)
                if self.once or not await self._await_reconnect():
                    break
        finally:
            if self.state != XenbusState.CLOSED:
                await self._switch(XenbusState.CLOSED)

    async def _serve(self, conn: BlkBack) -> None:
        self.stats.connections += 1
        self.connection = conn
        conn.start()
        await self._publish_disk()
        lost = conn.lost
        gone = (XenbusState.CLOSING, XenbusState.CLOSED, XenbusState.INITIALISING)

        def closing(snap: dict[str, str]) -> XenbusState | None:
            st = state_of(snap, self.fe)
            if st in gone:
                return st
            return XenbusState.UNKNOWN if lost.is_set() else None

        fe_state = await self._watch(closing, wake=lost)
        try:
            if lost.is_set():
                log.warning("vbd %d/%d: cleaning up after the frontend", self.domid, self.devid)
            await conn.quiesce()
            conn.unmap()
            await self._switch(XenbusState.CLOSING)
            if fe_state is XenbusState.CLOSING and not lost.is_set():
                # The frontend finishes with Closed; its event channel closing also counts.
                await self._watch(
                    lambda s: (
                        True
                        if lost.is_set() or state_of(s, self.fe) != XenbusState.CLOSING
                        else None
                    ),
                    wake=lost,
                )
        finally:
            conn.unbind()
            self.connection = None
            await self._switch(XenbusState.CLOSED)

    async def _await_reconnect(self) -> bool:
        """Closed until a frontend is Initialising again ("prepare for reconnect")."""
        got = await self._watch(
            lambda s: True if state_of(s, self.fe) == XenbusState.INITIALISING else None
        )
        if got is None:
            return False
        await self._switch(XenbusState.INIT_WAIT)
        return True
