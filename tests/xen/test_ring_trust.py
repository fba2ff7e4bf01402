"""The ring backend against a hostile frontend: its memory, its files, its xenstore.

The backend runs as the real ``tapnbd ring serve``; the attacks come from a frontend
in a child process (where it may crash itself) or from the test, which plays a
frontend that shares the vbd directory. Every test ends with the backend alive and a
well-behaved frontend doing I/O through it.
"""

from __future__ import annotations

import subprocess
import sys

from tapnbd.xen.frontend import BlkFront
from tapnbd.xen.xenstore import XenbusState
from tests.helpers import ROOT
from tests.xen.ringproc import RingFactory, RingServer

#: A frontend whose memory is a memfd without seals (as a plain file would be): once
#: connected, it queues writes, cuts its memory back to the ring page (so the data
#: pages are past the end of the file) and only then publishes the requests.
_SHRINKER = """
import os, sys
from tapnbd.xen.frontend import BlkFront, BlkFrontError
from tapnbd.xen.grant import GrantTable

class Unsealed(BlkFront):
    def _create_memory(self, nr_frames):
        return GrantTable.create(domid=self.domid, nr_frames=nr_frames, seals=0)

front = Unsealed(sys.argv[1], timeout=10)
try:
    front.connect()
except BlkFrontError as e:
    print("refused:", e, flush=True)
    sys.exit(0)
print("connected", flush=True)
front.write(0, b"x" * 4096)
ios = [front.submit_write(i * 65536, b"y" * 65536) for i in range(16)]
# Header, grant entries and the ring (frame 0) stay; every data page goes.
os.ftruncate(front.grants.fd, front.grants.frame_offset(1))
front.push()
print("truncated", flush=True)
front.wait(ios)
print("answered", [io.status for io in ios], flush=True)
"""


def pattern(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


def still_serves(backend: RingServer) -> None:
    """The backend process is alive, and a well-behaved frontend gets its data through."""
    assert backend.proc.poll() is None, backend.stderr()
    with BlkFront(backend.path) as front:
        front.write(8192, pattern(0x5A, 4096))
        assert front.read(8192, 4096) == pattern(0x5A, 4096)
    assert backend.proc.poll() is None, backend.stderr()


def test_frontend_memory_that_can_shrink_is_refused(ring: RingFactory) -> None:
    """Truncating the mapped memory must not kill the backend with SIGBUS.

    The backend takes only memory sealed against shrinking, so the frontend is refused
    at connect; had it been mapped, the truncation during I/O would be the crash.
    """
    backend = ring("ram:16M")
    child = subprocess.run(
        [sys.executable, "-c", _SHRINKER, str(backend.path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    rc = backend.proc.poll()
    assert rc is None, f"backend died ({rc}) after the child said {child.stdout!r}"
    assert child.stdout.startswith("refused:"), (child.stdout, child.stderr, backend.stderr())
    assert "not a memfd sealed with F_SEAL_SHRINK" in backend.stderr()
    backend.wait_state(XenbusState.CLOSED, XenbusState.INIT_WAIT)
    still_serves(backend)
