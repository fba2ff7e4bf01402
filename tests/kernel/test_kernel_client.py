"""The Linux kernel's own nbd client against ``tapnbd serve``, in the kernel VM.

Three boots (each costs ~6 s under software emulation):

- the main boot: one server with seven exports behind a recording relay (tests/kernel/
  wire.py). The guest lists them; makes, fills, checks and detaches an ext4 on a raw
  image, an optimised qcow and a normal qcow; mounts a qcow overlay of a raw base
  holding a host-made ext4 and changes it; and writes through a four-connection device
  made with the exact command ``tapnbd attach --via nbd`` runs. The tests after it check
  each part on the host: files and checksums through qemu-img and debugfs, the wire and
  the server's statistics.
- a read-only server: mounts, refuses writes, leaves the image as it was.
- a server restarted under an idle, connected guest.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tapnbd.control.attach import nbd_client_command
from tests.helpers import Server, run, start_server, tapnbd_cmd
from tests.kernel.vm import (
    HOST,
    PORT,
    GuestRun,
    ext4_files,
    need_vm,
    ring,
    run_guest,
    sha256,
    to_raw,
)
from tests.kernel.wire import TF_CAN_MULTI_CONN, Relay

pytestmark = [pytest.mark.vm, pytest.mark.slow]

MiB = 1 << 20
SIZE = 256 * MiB
FS_EXPORTS = {"raw.img": "raw", "opt.qcow": "qcow", "norm.qcow": "qcow"}
MC_OFFSET_MIB, MC_MIB = 1, 8
TREE_FILES = 12  # what the guest's tree() makes
#: The four-connection device, attached with the command ``tapnbd attach --via nbd`` builds.
MC_COMMAND = nbd_client_command(
    "/dev/nbd1", "mc.qcow", host=HOST, port=PORT, connections=4, block_size=4096
)


def _base_files(seed: int) -> dict[str, bytes]:
    """Files for a host-made ext4 (a random but reproducible tree)."""
    rnd = random.Random(seed)
    sizes = {"f1": 1000, "f2": 5000, "sub/f3": 70000, "sub/deeper/f4": 300000, "f5": 0}
    return {name: rnd.randbytes(n) for name, n in sizes.items()}


def _make_ext4(path: Path, top: str, files: dict[str, bytes], size: str, work: Path) -> None:
    """An ext4 image holding FILES under /TOP, made by mkfs.ext4 -d (no mount, no root)."""
    src = work / f"src-{path.name}"
    for name, data in files.items():
        p = src / top / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(path), size])


def _create(path: Path, *args: str) -> Path:
    run(tapnbd_cmd("create", str(path), *args))
    return path


def _timing(run_: GuestRun, first: str, last: str, verify_s: float) -> str:
    """Seconds from booting to this case's end in the guest, plus the host's check."""
    return (
        f"guest {run_.uptime(last) - run_.uptime(first):.1f}s, boot-to-end "
        f"{run_.arrived[last]:.1f}s, host verify {verify_s:.1f}s"
    )


# The main boot.

MAIN_SCRIPT = f"""
t boot
nbd-client -l $S $P > /tmp/list 2>&1 || fail list
sed 's/^/@@LIST /' /tmp/list
nbd-client $S $P /dev/nbd3 -N bell.img >/dev/null || fail "attach doorbell"
for x in {" ".join(FS_EXPORTS)}; do
  t $x-start
  nbd-client $S $P /dev/nbd0 -N $x >/dev/null || fail "attach $x"
  mkfs.ext4 -q -F /dev/nbd0 || fail "mkfs $x"
  mount -t ext4 /dev/nbd0 /mnt || fail "mount $x"
  tree /mnt/t 4 || fail "tree $x"
  sums /mnt/t $x
  umount /mnt || fail "umount $x"
  fsck.ext4 -fn /dev/nbd0 >/dev/null || fail "fsck $x"
  nbd-client -d /dev/nbd0 || fail "detach $x"
  t $x-end
done

t over-start
nbd-client $S $P /dev/nbd0 -N over.qcow >/dev/null || fail "attach overlay"
mount -t ext4 /dev/nbd0 /mnt || fail "mount overlay"
sums /mnt/base base-seen
tree /mnt/t 2 || fail "tree overlay"
echo changed >> /mnt/base/f1 && rm /mnt/base/f2 || fail "change overlay"
umount /mnt || fail "umount overlay"
fsck.ext4 -fn /dev/nbd0 >/dev/null || fail "fsck overlay"
mount -t ext4 -o ro /dev/nbd0 /mnt && sums /mnt over && umount /mnt || fail "sums overlay"
nbd-client -d /dev/nbd0 || fail "detach overlay"
t over-end

t mc-start
{shlex.join(MC_COMMAND)} >/dev/null || fail "attach multi-conn"
dd if=/dev/urandom of=/tmp/mc.bin bs=1M count={MC_MIB} 2>/dev/null
# Direct writes go down the issuing CPU's queue, so from two CPUs they use two sockets;
# then one FLUSH, from CPU 0 only, must make the writes of both durable.
half=$(({MC_MIB} / 2))
taskset -c 0 dd if=/tmp/mc.bin of=/dev/nbd1 bs=1M count=$half seek={MC_OFFSET_MIB} oflag=direct 2>/dev/null &
p0=$!
taskset -c 1 dd if=/tmp/mc.bin of=/dev/nbd1 bs=1M skip=$half count=$half seek=$(({MC_OFFSET_MIB} + half)) oflag=direct 2>/dev/null &
p1=$!
wait $p0 && wait $p1 || fail "mc write"
taskset -c 0 dd if=/dev/null of=/dev/nbd1 conv=notrunc,fsync 2>/dev/null || fail "mc flush"
h=$(sha256sum < /tmp/mc.bin | cut -d' ' -f1)
echo "@@SUM mc data $h"
echo "@@MARK mc-synced"
wait_doorbell /dev/nbd3
r=$(dd if=/dev/nbd1 bs=1M skip={MC_OFFSET_MIB} count={MC_MIB} iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$r" = "$h" ] || fail "mc read back $r"
nbd-client -d /dev/nbd1 || fail "detach multi-conn"
t mc-end
nbd-client -d /dev/nbd3
"""


@dataclass
class MainBoot:
    work: Path
    images: dict[str, Path]
    base_files: dict[str, bytes]
    base_hash: str
    run: GuestRun
    relay: Relay
    stats: dict[str, dict[str, object]]
    mc_host_sha: list[str] = field(default_factory=list)  # read by the host while attached


@pytest.fixture(scope="module")
def main_boot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MainBoot]:
    need_vm()
    work = tmp_path_factory.mktemp("kernel-main")
    images = {"raw.img": work / "raw.img", "bell.img": work / "bell.img"}
    with open(images["raw.img"], "wb") as f:
        f.truncate(SIZE)
    with open(images["bell.img"], "wb") as f:
        f.truncate(MiB)
    images["opt.qcow"] = _create(work / "opt.qcow", "--size", "256M")
    images["norm.qcow"] = _create(work / "norm.qcow", "--size", "256M", "--no-optimise")
    base_files = _base_files(7)
    images["base.raw"] = work / "base.raw"
    _make_ext4(images["base.raw"], "base", base_files, "256M", work)
    base_hash = sha256(images["base.raw"].read_bytes())
    images["over.qcow"] = _create(work / "over.qcow", "--backing", str(images["base.raw"]))
    images["mc.qcow"] = _create(work / "mc.qcow", "--size", "64M", "--no-optimise")
    exports = ["raw.img", "opt.qcow", "norm.qcow", "over.qcow", "mc.qcow", "bell.img"]
    sock, stats_file = work / "server.sock", work / "stats.json"
    server = start_server(
        [
            *(str(images[e]) for e in exports),
            "--socket",
            str(sock),
            "--stats-file",
            str(stats_file),
            "--allow-probed-backing-chain",  # over.qcow <- base.raw: made right here
        ],
        work / "server.log",
        exports=len(exports),
    )
    relay = Relay(str(work / "relay.sock"), str(sock))
    boot: MainBoot | None = None
    try:
        mc_host_sha: list[str] = []

        def on_mark(name: str) -> None:
            # Still attached: the guest's FLUSH must already have put every write, made
            # on any of the four connections, into the image file.
            if name == "mc-synced":
                raw = to_raw(images["mc.qcow"], work / "mc.raw", "qcow")
                with open(raw, "rb") as f:
                    f.seek(MC_OFFSET_MIB * MiB)
                    mc_host_sha.append(sha256(f.read(MC_MIB * MiB)))
                ring(images["bell.img"])

        # Two CPUs: the multi-connection case needs requests from two queues.
        result = run_guest(Path(relay.path), MAIN_SCRIPT, work, on_mark, qemu_options=("-smp", "2"))
    finally:
        code = server.stop()
        relay.close()
    assert code == 0, server.stderr()
    assert result.rc == 0, result.console()
    stats = json.loads(stats_file.read_text())
    boot = MainBoot(work, images, base_files, base_hash, result, relay, stats, mc_host_sha)
    yield boot


def test_listing(main_boot: MainBoot) -> None:
    """nbd-client -l lists every export (NBD_OPT_LIST)."""
    lines = main_boot.run.tagged("LIST")
    listed = {f[0][:-1] for f in lines if f[0].endswith(":") and f[0] != "Negotiation:"}
    assert listed == {"raw.img", "opt.qcow", "norm.qcow", "over.qcow", "mc.qcow", "bell.img"}


@pytest.mark.parametrize("name", list(FS_EXPORTS))
def test_filesystem_round_trip(main_boot: MainBoot, name: str) -> None:
    """mkfs.ext4 (TRIM of the whole device), files, fsck, DISC; qemu-img and debugfs agree."""
    guest = main_boot.run.sums(name)
    assert len(guest) == TREE_FILES, guest
    t0 = time.monotonic()
    raw = to_raw(main_boot.images[name], main_boot.work / f"{name}.raw", FS_EXPORTS[name])
    assert ext4_files(raw, "/t", main_boot.work) == guest
    print(name, _timing(main_boot.run, "boot", f"{name}-end", time.monotonic() - t0))


def test_overlay_over_raw_base(main_boot: MainBoot) -> None:
    """A qcow overlay shows its raw base's ext4, takes the changes, leaves the base alone."""
    expected_base = {n: sha256(d) for n, d in main_boot.base_files.items()}
    assert main_boot.run.sums("base-seen") == expected_base
    t0 = time.monotonic()
    assert sha256(main_boot.images["base.raw"].read_bytes()) == main_boot.base_hash
    raw = to_raw(main_boot.images["over.qcow"], main_boot.work / "over.raw", "qcow")
    seen = main_boot.run.sums("over")
    assert seen["base/f1"] == sha256(main_boot.base_files["f1"] + b"changed\n")
    assert "base/f2" not in seen and len(seen) == len(expected_base) - 1 + TREE_FILES
    on_host = {f"base/{n}": h for n, h in ext4_files(raw, "/base", main_boot.work).items()}
    on_host |= {f"t/{n}": h for n, h in ext4_files(raw, "/t", main_boot.work).items()}
    assert on_host == seen
    print("overlay", _timing(main_boot.run, "over-start", "over-end", time.monotonic() - t0))


def test_multi_conn_flush_covers_other_connections(main_boot: MainBoot) -> None:
    """-C 4: four sockets, writes spread over them, one FLUSH makes them all durable."""
    conns = main_boot.relay.by_export()["mc.qcow"]
    assert len(conns) == 4
    assert all(c.tflags is not None and c.tflags & TF_CAN_MULTI_CONN for c in conns)
    writers = [c for c in conns if c.count("write")]
    assert len(writers) >= 2, "writes did not spread over the connections"
    assert sum(c.count("flush") for c in conns) >= 1
    # The strict case: a connection whose writes only another connection's FLUSH covered.
    assert any(not c.count("flush") for c in writers)
    assert main_boot.mc_host_sha == [main_boot.run.sums("mc")["data"]]
    print("multi-conn", _timing(main_boot.run, "mc-start", "mc-end", 0))


def test_kernel_requests_in_wire_and_stats(main_boot: MainBoot) -> None:
    """What the kernel sent, seen on the wire, matches the server's statistics; no errors."""
    summary = main_boot.relay.summary()
    print(json.dumps(summary, indent=1))
    for name, conns in main_boot.relay.by_export().items():
        for c in conns:
            assert not c.problems and not c.errors and not c.pending, (name, c)
            assert c.requests[-1][0] == "disc", f"{name}: ended without NBD_CMD_DISC"
        ops = main_boot.stats[name]["ops"]
        assert isinstance(ops, dict)
        for op in ("read", "write", "trim", "flush"):
            wire = [n for c in conns for n in c.lengths(op)]
            assert (ops[op]["ops"], ops[op]["bytes"]) == (len(wire), sum(wire)), (name, op)
            assert ops[op]["errors"] == 0
            assert ops[op]["max_bytes"] == max(wire, default=0), (name, op)
        fua = sum(c.count("write", fua=True) for c in conns)
        assert ops["write"]["fua"] == fua, name
        assert main_boot.stats[name]["connections"] == 0
    for name in FS_EXPORTS:
        s = summary[name]
        trims = [
            (off, n)
            for c in main_boot.relay.by_export()[name]
            for o, _, off, n in c.requests
            if o == "trim"
        ]
        assert sum(n for _, n in trims) >= SIZE, f"{name}: mkfs did not discard the whole device"
        assert s["fua"].get("write", 0) >= 1  # type: ignore[attr-defined]
        assert s["max_len"]["write"] >= 128 << 10  # type: ignore[index]
        assert s["requests"]["flush"] >= 1  # type: ignore[index]


# Read-only.

RO_SCRIPT = """
t boot
nbd-client $S $P /dev/nbd0 -N ro.img -readonly >/dev/null || fail attach
[ "$(cat /sys/block/nbd0/ro)" = 1 ] || fail "device not read-only"
mount -t ext4 -o ro /dev/nbd0 /mnt || fail mount
sums /mnt/d ro
touch /mnt/d/new 2>/dev/null && fail "touch on a read-only mount worked"
mount -o remount,rw /mnt 2>/dev/null && fail "remount rw worked"
dd if=/dev/zero of=/dev/nbd0 bs=4096 count=1 oflag=direct 2>/dev/null && fail "raw write worked"
umount /mnt || fail umount
nbd-client -d /dev/nbd0 || fail detach
# Without -readonly the export's READ_ONLY flag alone must make the device read-only.
nbd-client $S $P /dev/nbd1 -N ro.img >/dev/null || fail "attach rw"
[ "$(cat /sys/block/nbd1/ro)" = 1 ] || fail "READ_ONLY flag ignored"
dd if=/dev/zero of=/dev/nbd1 bs=4096 count=1 oflag=direct 2>/dev/null && fail "raw write worked"
nbd-client -d /dev/nbd1 || fail "detach rw"
t end
"""


def test_read_only_export(tmp_path: Path) -> None:
    need_vm()
    files = _base_files(11)
    image = tmp_path / "ro.img"
    _make_ext4(image, "d", files, "64M", tmp_path)
    before = sha256(image.read_bytes())
    sock, stats_file = tmp_path / "s.sock", tmp_path / "stats.json"
    server = start_server(
        [str(image), "--read-only", "--socket", str(sock), "--stats-file", str(stats_file)],
        tmp_path / "server.log",
    )
    try:
        result = run_guest(sock, RO_SCRIPT, tmp_path)
    finally:
        assert server.stop() == 0
    assert result.rc == 0, result.console()
    assert result.sums("ro") == {n: sha256(d) for n, d in files.items()}
    assert sha256(image.read_bytes()) == before
    ops = json.loads(stats_file.read_text())["ro.img"]["ops"]
    assert all(ops[op]["ops"] == 0 for op in ("write", "trim", "zero"))
    assert all(op["errors"] == 0 for op in ops.values())
    print("read-only", _timing(result, "boot", "end", 0))


# Server restart.

RESTART_SCRIPT = """
t boot
# -t: without a timeout the kernel waits forever for a request the dead server never
# answered (nbd_xmit_timeout: "Possible stuck request"), e.g. when the harness's socat
# writes its error message into the stream ("Wrong magic (0x32303236)", i.e. "2026").
nbd-client $S $P /dev/nbd0 -N rs.img -t 10 >/dev/null || fail attach
# Idle means idle: no lazy inode-table zeroing, no atime updates after the sync.
mkfs.ext4 -q -F /dev/nbd0 && mount -t ext4 -o noinit_itable,noatime /dev/nbd0 /mnt || fail mkfs
tree /mnt/t 2 || fail tree
sync
sums /mnt/t before
echo "@@MARK restart"
# The new server describes its exports as "gen2": wait for it (the old one is gone then).
n=0
until nbd-client -l $S $P 2>/dev/null | grep -q gen2; do
  n=$((n+1)); [ $n -gt 300 ] && fail "server did not come back"; sleep 0.2
done
t restarted
# The connection died with the old server: the next I/O fails, promptly.
timeout 60 dd if=/dev/nbd0 of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null && fail "I/O on a dead connection worked"
[ $? = 1 ] || fail "I/O on a dead connection did not fail cleanly"
t errored
umount /mnt 2>/dev/null || umount -l /mnt
nbd-client -d /dev/nbd0 >/dev/null 2>&1
# Attach again: everything synced before the restart is there, and writes work.
nbd-client $S $P /dev/nbd0 -N rs.img >/dev/null || fail reattach
mount -t ext4 /dev/nbd0 /mnt || fail remount
sums /mnt/t after
tree /mnt/t2 1 || fail tree2
sums /mnt/t2 new
umount /mnt && fsck.ext4 -fn /dev/nbd0 >/dev/null || fail fsck
nbd-client -d /dev/nbd0 || fail detach
t end
"""


def test_server_restart_under_connected_guest(tmp_path: Path) -> None:
    need_vm()
    image = tmp_path / "rs.img"
    with open(image, "wb") as f:
        f.truncate(128 * MiB)
    sock = tmp_path / "s.sock"
    servers: list[Server] = [start_server([str(image), "--socket", str(sock)], tmp_path / "0.log")]

    def on_mark(name: str) -> None:
        if name != "restart":
            return
        # The old server exits first (it holds the image's write lock until then), and
        # the new one takes over the path: the guest sees only new connections.
        assert servers[0].stop() == 0
        new = start_server(
            [str(image), "--socket", str(tmp_path / "new.sock"), "--description", "gen2"],
            tmp_path / "1.log",
        )
        servers.append(new)
        os.rename(tmp_path / "new.sock", sock)

    try:
        result = run_guest(sock, RESTART_SCRIPT, tmp_path, on_mark)
    finally:
        for s in servers:
            s.stop()
    assert result.rc == 0, result.console()
    assert len(servers) == 2, "the guest never asked for the restart"
    before = result.sums("before")
    assert len(before) == TREE_FILES and result.sums("after") == before
    t0 = time.monotonic()
    assert ext4_files(image, "/t", tmp_path) == before
    assert ext4_files(image, "/t2", tmp_path) == result.sums("new")
    print("restart", _timing(result, "boot", "end", time.monotonic() - t0))
