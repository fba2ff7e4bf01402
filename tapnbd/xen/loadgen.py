"""A small fio-like load generator for a blkif ring, driven through BlkFront.

It keeps ``iodepth`` I/Os in flight for ``runtime`` seconds, as fio's time-based jobs
do, so its numbers line up with ``fio --ioengine=nbd`` on the NBD side of a
benchmark. Read data is copied out of the granted pages into the caller's buffer (one of
``iodepth``, reused), as a real frontend's completion would, and written data is copied
in. Each I/O is published as soon as it is queued, as blkfront does.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tapnbd.xen.frontend import BlkFront, Io

PATTERNS = ("read", "write", "randread", "randwrite")


@dataclass(frozen=True, slots=True)
class Job:
    """One workload, in fio's terms."""

    rw: str = "randread"
    bs: int = 4096
    iodepth: int = 32
    runtime: float = 5.0
    #: Bytes of the disk to address from offset 0 (default: all of it).
    size: int | None = None
    seed: int = 1

    def __post_init__(self) -> None:
        if self.rw not in PATTERNS:
            raise ValueError(f"rw must be one of {', '.join(PATTERNS)}")
        if self.bs <= 0 or self.bs % 512:
            raise ValueError("bs must be a positive multiple of 512")
        if self.iodepth < 1:
            raise ValueError("iodepth must be at least 1")


@dataclass(frozen=True, slots=True)
class JobResult:
    """What a job did."""

    job: Job
    ios: int
    bytes: int
    seconds: float
    #: Ring requests published, kicks sent to the backend, upcalls from it.
    requests: int
    notifications: int
    events: int
    #: CPU time (user + system) this process spent over the job.
    cpu_seconds: float = 0.0

    @property
    def iops(self) -> float:
        return self.ios / self.seconds if self.seconds else 0.0

    @property
    def mib_s(self) -> float:
        return self.bytes / self.seconds / (1 << 20) if self.seconds else 0.0

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["iops"] = round(self.iops, 1)
        d["mib_s"] = round(self.mib_s, 1)
        return d


def run_job(front: BlkFront, job: Job) -> JobResult:
    """Run ``job`` against a connected frontend."""
    region = min(job.size or front.size, front.size)
    nblocks = region // job.bs
    if nblocks < 1:
        raise ValueError(f"the disk ({front.size} bytes) is smaller than one block")
    write = job.rw.endswith("write")
    rand = job.rw.startswith("rand")
    rng = random.Random(job.seed)
    payload = os.urandom(job.bs) if write else b""
    counts = [0, 0]  # ios completed, ios in flight
    failed: list[Io] = []
    # Read buffers are reused, as a guest's page cache reuses its pages.
    free = [] if write else [bytearray(job.bs) for _ in range(job.iodepth)]

    def done(io: Io) -> None:
        counts[0] += 1
        counts[1] -= 1
        if io.status:
            failed.append(io)
        if io.data is not None:
            free.append(io.data)

    requests0, kicks0, events0 = front.requests, front.notifications, front.events
    next_block = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    deadline = t0 + job.runtime
    stopping = False
    while True:
        # submit_* may itself wait for ring slots and complete I/Os (callbacks run
        # then), so the deadline is checked per submission, not only after wait_any.
        while counts[1] < job.iodepth and not stopping:
            if time.perf_counter() >= deadline:
                stopping = True
                break
            if rand:
                block = rng.randrange(nblocks)
            else:
                block = next_block
                next_block = (next_block + 1) % nblocks
            if write:
                io = front.submit_write(block * job.bs, payload)
            else:
                io = front.submit_read(block * job.bs, job.bs, into=free.pop())
            io.callback = done
            counts[1] += 1
            # Published at once, as blkfront's queue_rq flushes each request: an idle
            # backend is kicked by the first of a refill and works while the rest are
            # built (the kick only goes if it armed req_event, so a busy one gets none).
            front.push()
        front.wait_any()
        if failed:
            failed[0].result()  # raises IOFailed
        if not stopping and time.perf_counter() >= deadline:
            stopping = True
        if stopping and counts[1] == 0:
            break
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return JobResult(
        job=job,
        ios=counts[0],
        bytes=counts[0] * job.bs,
        seconds=seconds,
        requests=front.requests - requests0,
        notifications=front.notifications - kicks0,
        events=front.events - events0,
        cpu_seconds=cpu,
    )
