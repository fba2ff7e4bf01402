"""``serve -s``: writes go to a throwaway qcow2 overlay, the image is only read
(qemu-nbd -s, its ``--snapshot``).

qemu-nbd is the referee: one seeded libnbd script writes, zeroes and trims through each
server (socket activation), then reads back every byte and both block status contexts.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
from pathlib import Path

import pytest

from tests.formats.qcow_util import qemu_img
from tests.helpers import nbdsh_script, qemu_io, run, start_server, tapnbd_cmd

KiB, MiB = 1 << 10, 1 << 20

# argv[1]: the seed; argv[2:]: the server. Prints the data's digest and both maps (a
# context the server does not offer maps as []).
SCRIPT = r"""
import hashlib, json, random, sys
import nbd

h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.connect_systemd_socket_activation(sys.argv[2:])
size = h.get_size()
rng = random.Random(int(sys.argv[1]))
for _ in range(24):
    op = rng.choice(["write", "write", "zero", "trim"])
    off = rng.randrange(0, size // 4096) * 4096
    n = min(rng.choice([512, 4096, 65536, 200704]), size - off)
    print(op, off, n, file=sys.stderr)
    if op == "write":
        h.pwrite(bytes([rng.randrange(1, 256)]) * n, off)
    elif op == "zero":
        h.zero(n, off)
    else:
        h.trim(n, off)
h.flush()
digest = hashlib.sha256()
for off in range(0, size, 1 << 20):
    digest.update(h.pread(min(1 << 20, size - off), off))
def walk(ctx):
    runs, pos = [], 0
    while pos < size and h.can_meta_context(ctx):
        seen = []
        def cb(name, offset, entries, err):
            if name == ctx:
                seen.extend(entries)
            return 0
        h.block_status(size - pos, pos, cb)
        if not seen:
            raise SystemExit(f"no progress in {ctx} at {pos}")
        runs += seen
        pos += sum(seen[::2])
    return runs
print(json.dumps({
    "sha": digest.hexdigest(),
    "alloc": walk("base:allocation"),
    "depth": walk("qemu:allocation-depth"),
}))
"""


def merged(pairs: list[int]) -> list[tuple[int, int]]:
    """(length, flags) pairs with neighbours of equal flags merged (servers split runs
    where they like)."""
    out: list[tuple[int, int]] = []
    for length, flags in zip(pairs[::2], pairs[1::2], strict=True):
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + length, flags)
        else:
            out.append((length, flags))
    return out


def summary(got: object) -> dict[str, object]:
    """Both maps merged. In base:allocation, ZERO without HOLE counts as data: it is a
    hint about the overlay's file (its holes), and the two overlays' files differ
    (qemu reserves a new cluster's space with fallocate, tapnbd leaves it sparse)."""
    assert isinstance(got, dict)
    alloc = [f if f & 1 else 0 if i % 2 else f for i, f in enumerate(got["alloc"])]
    return {"sha": got["sha"], "alloc": merged(alloc), "depth": merged(got["depth"])}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The servers' $TMPDIR, where their overlays go: it must be empty after each."""
    d = tmp_path / "scratch"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    return d


def images(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    raw = tmp_path / "base.raw"
    with raw.open("wb") as f:
        f.truncate(4 * MiB)
    qemu_io(raw, "write -P 7 1M 1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
    qemu_io(top, "write -P 8 1536k 64k", "write -z 3M 64k", fmt="qcow2")
    return {"raw": (raw, "raw"), "qcow2 over raw": (top, "qcow2")}


@pytest.mark.parametrize("kind", ["raw", "qcow2 over raw"])
def test_throwaway_overlay_as_qemu_nbd(tmp_path: Path, scratch: Path, kind: str) -> None:
    """Seeded writes, zeroings and trims read back, and map, as through qemu-nbd -s; the
    image's bytes never change and no overlay file is left."""
    img, fmt = images(tmp_path)[kind]
    seed = random.SystemRandom().randrange(1 << 30)
    print("seed", seed)
    before = digest(img)
    # qemu-nbd ignores TRIM by default; tapnbd unmaps. Both unmap here.
    ours = summary(
        nbdsh_script(SCRIPT, str(seed), *tapnbd_cmd("serve", "-s", "-A", "-f", fmt, str(img)))
    )
    assert digest(img) == before
    qemu_nbd = ["qemu-nbd", "-s", "-A", "--discard=unmap", "-f", fmt, str(img)]
    theirs = summary(nbdsh_script(SCRIPT, str(seed), *qemu_nbd))
    assert digest(img) == before
    assert ours == theirs
    assert os.listdir(scratch) == []


def test_throwaway_overlay_leaves_nothing_after_kill(tmp_path: Path, scratch: Path) -> None:
    """The overlay is unlinked as soon as it is open: a SIGKILLed server leaves no file,
    and its writes, seen while it ran, never reached the image."""
    img, fmt = images(tmp_path)["qcow2 over raw"]
    before = digest(img)
    sock = tmp_path / "s.sock"
    srv = start_server(["-s", "-f", fmt, "-k", str(sock), f"a={img}"], tmp_path / "serve.log")
    try:
        assert os.listdir(scratch) == []  # open, and already unlinked
        uri = f"nbd+unix:///a?socket={sock}"
        qemu_io(uri, "write -P 9 0 3M")
        qemu_io(uri, "read -P 9 0 3M", "read -P 0 3M 64k", "read -P 0 3200k 896k")
    finally:
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
    assert digest(img) == before
    assert os.listdir(scratch) == []


def test_throwaway_overlay_read_only_and_errors(tmp_path: Path, scratch: Path) -> None:
    """With -r the export is read-only as ever, and no overlay is made (qemu-nbd -s -r);
    an overlay with nowhere to go fails the start with a message that names the
    directory."""
    img, fmt = images(tmp_path)["raw"]
    script = r"""
import json, sys
import nbd
h = nbd.NBD()
h.set_full_info(True)
h.connect_systemd_socket_activation(sys.argv[1:])
print(json.dumps([h.is_read_only(), h.get_export_description()]))
"""
    gone = tmp_path / "gone"
    env = {**os.environ, "TMPDIR": str(gone)}
    ro = ["env", f"TMPDIR={gone}", *tapnbd_cmd("serve", "-s", "-r", "-f", fmt, str(img))]
    assert nbdsh_script(script, *ro) == [True, f"{img} (raw)"]  # TMPDIR unused
    rw = nbdsh_script(script, *tapnbd_cmd("serve", "-s", "-f", fmt, str(img)))
    assert rw == [False, f"{img} (raw, writes to a throwaway overlay)"]
    out = run(tapnbd_cmd("serve", "-s", "-f", fmt, "-p", "0", str(img)), check=False, env=env)
    assert out.returncode == 1
    assert f"no room for the throwaway overlay in {gone}" in out.stderr
    assert json.dumps(os.listdir(scratch)) == "[]"
