"""``serve --cache``, through a real client: writethrough flushes the image file after
every write (a flush that fails fails the write), unsafe never does (a FLUSH succeeds
whatever the file says), and none and directsync open the image files with O_DIRECT
and serve what qemu-nbd serves.

The flushes are seen by failing them: ``--inject-at file`` puts the fault filter
between the qcow2 format and its file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.formats.qcow_util import need, qemu_img
from tests.helpers import nbdsh_script, on_copies, qemu_io, run, start_server, tapnbd_cmd
from tests.server.test_throwaway_overlay import SCRIPT as REQUESTS
from tests.server.test_throwaway_overlay import summary

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


def image_fd_flags(pid: int, image: Path) -> list[int]:
    """The open flags of each of ``pid``'s descriptors on ``image`` (/proc fdinfo)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != str(image):
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        flags = next(line for line in info.splitlines() if line.startswith("flags:"))
        out.append(int(flags.split()[1], 8))
    return out


@pytest.mark.parametrize("mode", ["none", "directsync", "-n"])
def test_direct_modes_open_the_file_with_o_direct(tmp_path: Path, mode: str) -> None:
    need("qemu-io")
    img = tmp_path / "a.raw"
    img.write_bytes(bytes(1 << 20))
    args = ["-n"] if mode == "-n" else [f"--cache={mode}"]
    srv = start_server([*args, "-f", "raw", "-k", str(tmp_path / "s"), f"a={img}"],
                       tmp_path / "log")  # fmt: skip
    try:
        flags = image_fd_flags(srv.proc.pid, img)
        assert flags and all(f & os.O_DIRECT for f in flags), flags
        qemu_io(srv.uri, "write -P 3 1000 5000", "read -P 3 1000 5000", "read -P 0 6000 2192")
    finally:
        srv.stop()
    assert img.read_bytes()[1000:6000] == b"\3" * 5000


@pytest.mark.parametrize("kind", ["raw", "odd raw", "qcow2"])
def test_cache_none_as_qemu_nbd(tmp_path: Path, kind: str) -> None:
    """The same seeded requests (512-byte ones among them, inside 4 KiB blocks) through
    both servers with --cache=none, over copies of one image: data, block status and
    files agree, and the odd-sized file keeps its size (nbdkit referees that one)."""
    need("qemu-img", "qemu-io", "qemu-nbd", "nbdkit")
    fmt = "qcow2" if kind == "qcow2" else "raw"
    src = tmp_path / f"src.{fmt}"
    if kind == "odd raw":
        src.write_bytes(bytes(4_000_001))
    else:
        qemu_img("create", "-q", "-f", fmt, src, "4M")
    qemu_io(src, "write -P 1 0 256k", "write -P 2 1M 1M", fmt=fmt)
    seed = random.SystemRandom().randrange(1 << 30)
    print("seed", seed)
    servers = {
        "tapnbd": lambda img: tapnbd_cmd("serve", "--cache=none", "-f", fmt, str(img)),
        # qemu-nbd rounds an export's size up to 512 bytes: nbdkit referees the odd one.
        "qemu": lambda img: (
            ["nbdkit", "--exit-with-parent", "file", str(img)]
            if kind == "odd raw"
            else ["qemu-nbd", "--cache=none", "--discard=unmap", "-f", fmt, str(img)]
        ),
    }
    runs = on_copies(src, servers, REQUESTS, str(seed))
    got = {who: summary(out) for who, (_, out) in runs.items()}
    assert got["tapnbd"] == got["qemu"]
    files = [str(tmp_path / f"{who}.{fmt}") for who in ("tapnbd", "qemu")]
    run(["qemu-img", "compare", "-f", fmt, "-F", fmt, *files])
    if kind == "odd raw":
        assert os.path.getsize(files[0]) == 4_000_001
