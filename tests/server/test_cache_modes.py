"""``serve --cache``, through a real client: writethrough flushes the image file after
every write (a flush that fails fails the write), unsafe never does (a FLUSH succeeds
whatever the file says), and the O_DIRECT modes are refused.

The flushes are seen by failing them: ``--inject-at file`` puts the fault filter
between the qcow2 format and its file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.formats.qcow_util import need, qemu_img
from tests.helpers import nbdsh_script, run, tapnbd_cmd

SCRIPT = """
import json, sys
import nbd
h = nbd.NBD()
h.connect_systemd_socket_activation(sys.argv[1:])
out = {}
for name, call in (
    ("write", lambda: h.pwrite(b"w" * 4096, 0)),
    ("flush", lambda: h.flush()),
    ("read", lambda: h.pread(4096, 0) == b"w" * 4096),
):
    try:
        out[name] = call()
    except nbd.Error as e:
        out[name] = e.errno
print(json.dumps(out))
"""


@pytest.mark.parametrize(
    ("mode", "want"),
    [
        ("writeback", {"write": None, "flush": "EIO", "read": True}),
        ("writethrough", {"write": "EIO", "flush": "EIO", "read": True}),
        ("unsafe", {"write": None, "flush": None, "read": True}),
    ],
)
def test_cache_modes_with_failing_file_flushes(
    tmp_path: Path, mode: str, want: dict[str, object]
) -> None:
    need("qemu-img")
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    faults = ["--inject-at", "file", "--inject-error", "EIO:100%:flush"]
    server = tapnbd_cmd("serve", "-f", "qcow2", f"--cache={mode}", *faults, str(img))
    assert nbdsh_script(SCRIPT, *server) == want


def test_o_direct_modes_are_refused(tmp_path: Path) -> None:
    img = tmp_path / "a.raw"
    img.write_bytes(bytes(4096))
    out = run(tapnbd_cmd("serve", "--cache=none", "-p", "0", str(img)), check=False)
    assert out.returncode == 1
    assert "--cache=none needs O_DIRECT" in out.stderr
