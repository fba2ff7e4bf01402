"""A failed flush sticks (issue 11; PostgreSQL's "fsyncgate" lesson).

After fdatasync fails the kernel may have dropped the dirty pages and cleared the error,
so a later flush that succeeds would tell the client its data is safe when it is not.
Once a flush fails, every later FLUSH and FUA request on the export fails with EIO, on
every connection, with the error in the log and in the statistics, until the image is
reopened.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.helpers import Server, nbdsh_script

SCRIPT = r"""
import errno, json, os, sys
import nbd

uri, trigger = sys.argv[1], sys.argv[2]
res = {}

def probe(name, fn):
    try:
        fn()
        res[name] = "OK"
    except nbd.Error as e:
        res[name] = errno.errorcode.get(e.errno, str(e.errno))

h = nbd.NBD()
h.connect_uri(uri)
h.pwrite(b"\x01" * 4096, 0)
probe("flush_before", h.flush)
open(trigger, "w").close()  # the fault filter fails flushes while this file exists
h.pwrite(b"\x02" * 4096, 0)
probe("flush_failing", h.flush)
os.unlink(trigger)  # the fault is gone: the disk would answer again
probe("flush_after", h.flush)
probe("flush_again", h.flush)
probe("fua_write_after", lambda: h.pwrite(b"\x03" * 4096, 8192, nbd.CMD_FLAG_FUA))
probe("plain_write_after", lambda: h.pwrite(b"\x04" * 4096, 8192))
probe("read_after", lambda: h.pread(4096, 8192))
g = nbd.NBD()
g.connect_uri(uri)
probe("flush_other_connection", g.flush)
g.shutdown()
h.shutdown()
print(json.dumps(res))
"""

REOPENED = r"""
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.flush()
print(json.dumps(h.pread(4096, 8192) == b"\x04" * 4096))
"""


def test_failed_flush_sticks_until_reopened(
    serve: Callable[..., Server], raw_image: Path, tmp_path: Path
) -> None:
    trigger = tmp_path / "fail-flush"
    stats = tmp_path / "stats.json"
    server = serve(
        str(raw_image),
        "--format",
        "raw",
        "--inject-error",
        "EIO:100%:flush",
        "--inject-error-file",
        str(trigger),
        "--stats-file",
        str(stats),
    )
    res = nbdsh_script(SCRIPT, server.uri, str(trigger))
    assert res == {
        "flush_before": "OK",
        "flush_failing": "EIO",
        # Never retried into a success, on this connection or another.
        "flush_after": "EIO",
        "flush_again": "EIO",
        "fua_write_after": "EIO",
        "flush_other_connection": "EIO",
        # Plain writes and reads go on.
        "plain_write_after": "OK",
        "read_after": "OK",
    }
    assert server.stop() == 1  # what was written since the last good flush may be lost
    log = server.stderr()
    assert "flush failed" in log and "until the image is reopened" in log, log
    assert "exiting with status 1: 'disk.img' not closed cleanly" in log, log
    snap = json.loads(stats.read_text())["disk.img"]
    assert snap["sync_error"] and "flush" in snap["sync_error"]
    assert snap["ops"]["flush"]["errors"] == 4 and snap["ops"]["write"]["errors"] == 1

    # An operator reopens the image: flushes work again.
    again = serve(str(raw_image), "--format", "raw")
    assert nbdsh_script(REOPENED, again.uri) is True
