"""The Linux kernel's nbd client on qcow2 images served by tapnbd, in the kernel VM.

One boot (two CPUs), four qemu-made qcow2 exports on a unix socket behind the recording
relay (tests/kernel/wire.py):

- ``fresh.qcow2`` (v3, 64 KiB clusters): mkfs.ext4 (a TRIM of the whole device), files,
  a file written, removed and trimmed away (fstrim), fsck;
- ``mc.qcow2`` (v2, compat 0.10): the same through a four-connection device
  (``nbd-client -C 4``, the command ``tapnbd attach --via nbd`` builds), with direct
  writes from both CPUs so they go down two of the sockets;
- ``over-raw.qcow2`` on a raw base and ``over-q2.qcow2`` (4 KiB clusters) on a qcow2
  base, both holding a host-made ext4: the guest reads the base's files, adds its own,
  changes and removes some, fsck. ``over-raw.qcow2`` has an internal snapshot taken
  before the boot, which must still read as the base did.

On the host, after the server has exited: ``qemu-img check`` finds every image clean,
and debugfs, on qemu-img's raw copy, finds exactly the files the guest checksummed.
The bases are left as they were.

A second, short boot mounts a snapshot of ``over-q2.qcow2`` taken after the first,
served with ``serve --snapshot`` while the active image has been scribbled over.
"""

from __future__ import annotations

import json
import random
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from tapnbd.control.attach import nbd_client_command
from tests.formats.qcow2_util import check_clean
from tests.helpers import run, start_server, tapnbd_cmd
from tests.kernel.vm import HOST, PORT, GuestRun, ext4_files, need_vm, run_guest, sha256, to_raw
from tests.kernel.wire import TF_CAN_MULTI_CONN, Relay

pytestmark = [pytest.mark.vm, pytest.mark.slow]

TREE_FILES = 12  # what the guest's tree() makes
SEED = 1313
MC_COMMAND = nbd_client_command(
    "/dev/nbd1", "mc.qcow2", host=HOST, port=PORT, connections=4, block_size=4096
)
OVERLAYS = ("over-raw.qcow2", "over-q2.qcow2")

SCRIPT = f"""
t boot
nbd-client $S $P /dev/nbd0 -N fresh.qcow2 >/dev/null || fail "attach fresh"
mkfs.ext4 -q -F /dev/nbd0 || fail "mkfs fresh"
mount -t ext4 /dev/nbd0 /mnt || fail "mount fresh"
tree /mnt/t 4 || fail "tree fresh"
# Clusters written, then freed by fstrim (TRIM): their refcounts must drop to 0.
dd if=/dev/urandom of=/mnt/junk bs=1M count=8 2>/dev/null && sync || fail "junk fresh"
rm /mnt/junk && sync && fstrim /mnt || fail "fstrim fresh"
sums /mnt/t fresh.qcow2
umount /mnt || fail "umount fresh"
fsck.ext4 -fn /dev/nbd0 >/dev/null || fail "fsck fresh"
nbd-client -d /dev/nbd0 || fail "detach fresh"
t fresh-end

{shlex.join(MC_COMMAND)} >/dev/null || fail "attach multi-conn"
mkfs.ext4 -q -F /dev/nbd1 || fail "mkfs mc"
mount -t ext4 /dev/nbd1 /mnt || fail "mount mc"
tree /mnt/t 2 || fail "tree mc"
# Direct writes go down the issuing CPU's queue: from two CPUs, two of the sockets.
taskset -c 0 dd if=/dev/urandom of=/mnt/t/cpu0 bs=64k count=32 oflag=direct 2>/dev/null &
p0=$!
taskset -c 1 dd if=/dev/urandom of=/mnt/t/cpu1 bs=64k count=32 oflag=direct 2>/dev/null &
p1=$!
wait $p0 && wait $p1 || fail "mc direct writes"
sums /mnt/t mc.qcow2
umount /mnt || fail "umount mc"
fsck.ext4 -fn /dev/nbd1 >/dev/null || fail "fsck mc"
nbd-client -d /dev/nbd1 || fail "detach multi-conn"
t mc-end

for x in {" ".join(OVERLAYS)}; do
  nbd-client $S $P /dev/nbd0 -N $x >/dev/null || fail "attach $x"
  mount -t ext4 /dev/nbd0 /mnt || fail "mount $x"
  sums /mnt/base $x-base
  tree /mnt/t 2 || fail "tree $x"
  echo changed >> /mnt/base/f1 && rm /mnt/base/f2 || fail "change $x"
  umount /mnt || fail "umount $x"
  fsck.ext4 -fn /dev/nbd0 >/dev/null || fail "fsck $x"
  mount -t ext4 -o ro /dev/nbd0 /mnt && sums /mnt $x && umount /mnt || fail "sums $x"
  nbd-client -d /dev/nbd0 || fail "detach $x"
  t $x-end
done
"""


@dataclass
class Boot:
    work: Path
    images: dict[str, Path]
    base_files: dict[str, bytes]
    base_hashes: dict[str, str]
    run: GuestRun
    relay: Relay


def _qemu_img(*args: str | Path) -> None:
    run(["qemu-img", *map(str, args)])


def _base_files() -> dict[str, bytes]:
    rnd = random.Random(SEED)
    print("seed", SEED)
    sizes = {"f1": 1000, "f2": 5000, "sub/f3": 70000, "sub/deeper/f4": 300000, "f5": 0}
    return {name: rnd.randbytes(n) for name, n in sizes.items()}


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> Boot:
    need_vm()
    work = tmp_path_factory.mktemp("kernel-qcow2")
    files = _base_files()
    src = work / "src"
    for name, data in files.items():
        (src / "base" / name).parent.mkdir(parents=True, exist_ok=True)
        (src / "base" / name).write_bytes(data)
    base_raw, base_q2 = work / "base.raw", work / "base.qcow2"
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(src), str(base_raw), "64M"])
    _qemu_img("convert", "-f", "raw", "-O", "qcow2", base_raw, base_q2)
    images = {name: work / name for name in ("fresh.qcow2", "mc.qcow2", *OVERLAYS)}
    _qemu_img("create", "-f", "qcow2", images["fresh.qcow2"], "128M")
    _qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", images["mc.qcow2"], "64M")
    over_raw, over_q2 = images["over-raw.qcow2"], images["over-q2.qcow2"]
    _qemu_img("create", "-f", "qcow2", "-b", base_raw.name, "-F", "raw", over_raw)
    _qemu_img("snapshot", "-c", "pristine", over_raw)
    _qemu_img(
        "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", base_q2.name, "-F", "qcow2",
        over_q2,
    )  # fmt: skip
    hashes = {p.name: sha256(p.read_bytes()) for p in (base_raw, base_q2)}
    sock = work / "server.sock"
    server = start_server(
        [*(str(p) for p in images.values()), "--format", "qcow2", "--socket", str(sock)],
        work / "server.log",
        exports=len(images),
    )
    relay = Relay(str(work / "relay.sock"), str(sock))
    try:
        # Two CPUs: the multi-connection case needs requests from two queues.
        result = run_guest(Path(relay.path), SCRIPT, work, qemu_options=("-smp", "2"))
    finally:
        code = server.stop()
        relay.close()
    assert code == 0, server.stderr()
    assert result.rc == 0, result.console()
    return Boot(work, images, files, hashes, result, relay)


@pytest.mark.parametrize("name", ["fresh.qcow2", "mc.qcow2", *OVERLAYS])
def test_images_pass_qemu_img_check(boot: Boot, name: str) -> None:
    check_clean(boot.images[name])


@pytest.mark.parametrize("name", ["fresh.qcow2", "mc.qcow2"])
def test_filesystem_round_trip(boot: Boot, name: str) -> None:
    """mkfs.ext4, files, fsck in the guest; debugfs finds the same files in qemu's copy."""
    guest = boot.run.sums(name)
    extra = 2 if name == "mc.qcow2" else 0  # the two direct-written files
    assert len(guest) == TREE_FILES + extra, guest
    raw = to_raw(boot.images[name], boot.work / f"{name}.raw", "qcow2")
    assert ext4_files(raw, "/t", boot.work) == guest


def test_multi_conn_spreads_writes_over_connections(boot: Boot) -> None:
    conns = boot.relay.by_export()["mc.qcow2"]
    assert len(conns) == 4
    assert all(c.tflags is not None and c.tflags & TF_CAN_MULTI_CONN for c in conns)
    assert len([c for c in conns if c.count("write")]) >= 2, "writes used one connection"


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_takes_changes_and_leaves_its_base(boot: Boot, name: str) -> None:
    expected_base = {n: sha256(d) for n, d in boot.base_files.items()}
    assert boot.run.sums(f"{name}-base") == expected_base
    seen = boot.run.sums(name)
    assert seen["base/f1"] == sha256(boot.base_files["f1"] + b"changed\n")
    assert "base/f2" not in seen and len(seen) == len(expected_base) - 1 + TREE_FILES
    raw = to_raw(boot.images[name], boot.work / f"{name}.raw", "qcow2")
    on_host = {f"base/{n}": h for n, h in ext4_files(raw, "/base", boot.work).items()}
    on_host |= {f"t/{n}": h for n, h in ext4_files(raw, "/t", boot.work).items()}
    assert on_host == seen
    for base, digest in boot.base_hashes.items():
        assert sha256((boot.work / base).read_bytes()) == digest


def test_snapshot_taken_before_the_boot_reads_as_the_base(boot: Boot) -> None:
    """The guest's writes copied the snapshot's clusters, never changed them: qemu-img
    and ``tapnbd serve --snapshot`` both still read the base there."""
    img = boot.images["over-raw.qcow2"]
    base = (boot.work / "base.raw").read_bytes()
    theirs = boot.work / "pristine.raw"
    _qemu_img("convert", "-l", "snapshot.name=pristine", "-O", "raw", img, theirs)
    assert theirs.read_bytes() == base
    ours = boot.work / "pristine-nbd.raw"
    server = start_server(
        [str(img), "--snapshot", "pristine", "--format", "qcow2"], boot.work / "snap.log"
    )
    try:
        run(["nbdcopy", server.uri, str(ours)])
    finally:
        assert server.stop() == 0
    assert ours.read_bytes() == base
    info = json.loads(run(tapnbd_cmd("info", "-f", "qcow2", "--json", str(img))).stdout)
    assert [s["name"] for s in info["snapshots"]] == ["pristine"]


SNAPSHOT_SCRIPT = """
t boot
nbd-client $S $P /dev/nbd0 -N over-q2.qcow2 >/dev/null || fail "attach snapshot"
mount -t ext4 -o ro /dev/nbd0 /mnt || fail "mount snapshot"
sums /mnt snap
umount /mnt || fail "umount snapshot"
fsck.ext4 -fn /dev/nbd0 >/dev/null || fail "fsck snapshot"
if dd if=/dev/zero of=/dev/nbd0 bs=4k count=1 oflag=direct 2>/dev/null; then
  fail "a write to the snapshot succeeded"
fi
echo "@@RO refused"
nbd-client -d /dev/nbd0 || fail "detach snapshot"
t end
"""


def test_guest_mounts_a_snapshot_taken_after_its_writes(boot: Boot) -> None:
    """After the main boot: qemu-img snapshots the overlay and qemu-io scribbles over
    the active image; ``serve --snapshot`` still gives the guest the ext4 it left,
    read-only (the kernel client sees NBD_FLAG_READ_ONLY), and changes nothing."""
    img = boot.images["over-q2.qcow2"]
    _qemu_img("snapshot", "-c", "after-guest", img)
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xee 0 64M", str(img)])
    before = sha256(img.read_bytes())
    sock = boot.work / "snap.sock"
    server = start_server(
        [str(img), "--snapshot", "after-guest", "--format", "qcow2", "--socket", str(sock)],
        boot.work / "snap-server.log",
    )
    work = boot.work / "snap-boot"
    work.mkdir()
    try:
        result = run_guest(sock, SNAPSHOT_SCRIPT, work)
    finally:
        assert server.stop() == 0, server.stderr()
    assert result.rc == 0, result.console()
    assert result.tagged("RO") == [["refused"]]
    assert result.sums("snap") == boot.run.sums("over-q2.qcow2")
    assert sha256(img.read_bytes()) == before
    check_clean(img)
