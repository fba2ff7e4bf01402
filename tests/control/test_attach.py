"""Attach and detach through the real path: daemon, NBD, nbdfuse, loop, ext4, mount."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import formats
from tapnbd.control.attach import pid_alive
from tapnbd.control.state import StateDir
from tests.control.tap import Tapnbd, need_devices, need_tools, tapdisk_pids
from tests.control.test_daemon import nbdfuse_pids

pytestmark = [pytest.mark.root, pytest.mark.slow]

#: qcow joins in as soon as its driver is registered.
IMAGE_FORMATS = ["raw"] + (["qcow"] if "qcow" in formats.PROBES else [])


def write_tree(root: Path, seed: int) -> dict[str, str]:
    """A tree of files with known contents; their sha256 by relative path."""
    rng = random.Random(seed)
    sums = {}
    for i in range(40):
        rel = Path(f"d{i % 5}") / f"sub{i % 3}" / f"f{i}.bin"
        size = rng.choice([0, 1, 511, 4096, 65537, rng.randrange(1, 300_000)])
        data = rng.randbytes(size)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        sums[str(rel)] = hashlib.sha256(data).hexdigest()
    big = rng.randbytes(6 << 20)
    (root / "big.bin").write_bytes(big)
    sums["big.bin"] = hashlib.sha256(big).hexdigest()
    os.sync()
    return sums


def read_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*.bin")
    }


def attach(tap: Tapnbd, *args: str) -> str:
    device = tap.ok("attach", *args).strip()
    assert device.startswith("/dev/loop"), device
    return device


def mkfs(device: str) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, capture_output=True)


def fsck_clean(device: str) -> None:
    proc = subprocess.run(["fsck.ext4", "-fn", device], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def backing_under(state: Path) -> list[str]:
    """Loop devices whose backing file lies in the state directory."""
    out = subprocess.run(
        ["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], capture_output=True, text=True
    )
    return [line.split()[0] for line in out.stdout.splitlines() if str(state) in line]


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_filesystem_survives_detach_and_reattach(devtap: Tapnbd, fmt: str) -> None:
    tap = devtap
    image = tap.image(f"disk.{fmt}", fmt)
    attached = tap.run("attach", str(image))
    assert attached.returncode == 0, attached.stderr
    device = attached.stdout.strip()
    assert "started the daemon" in attached.stderr and "tapnbd.log" in attached.stderr
    assert "via nbdfuse + losetup" in attached.stderr  # no kernel nbd module here
    listed = tap.list()
    assert listed["attachments"][0]["device"] == device
    assert listed["exports"][0]["format"] == fmt

    mkfs(device)
    point = tap.mount(device)
    sums = write_tree(point, seed=1)
    tap.umount(point)
    tap.ok("detach", device)
    assert backing_under(tap.state) == []
    assert tap.list()["exports"] == []  # made by attach, gone with its detach

    device = attach(tap, str(image))
    point = tap.mount(device)
    assert read_tree(point) == sums
    tap.umount(point)
    fsck_clean(device)
    tap.ok("detach", str(image))  # by image path this time
    if fmt == "raw":
        fsck_clean(str(image))  # the bytes really are in the file
    assert backing_under(tap.state) == []


def test_two_images_at_once(devtap: Tapnbd) -> None:
    tap = devtap
    a, b = tap.image("a.img"), tap.image("b.img", size="128M")
    dev_a, dev_b = attach(tap, str(a)), attach(tap, str(b))
    assert dev_a != dev_b
    for dev in (dev_a, dev_b):
        mkfs(dev)
    pa, pb = tap.mount(dev_a), tap.mount(dev_b)
    sums_a, sums_b = write_tree(pa, seed=2), write_tree(pb, seed=3)
    assert sums_a != sums_b
    listed = tap.list()
    assert {e["name"]: e["devices"] for e in listed["exports"]} == {
        "a.img": [dev_a],
        "b.img": [dev_b],
    }
    tap.umount(pa)
    tap.umount(pb)
    tap.ok("detach", dev_a)
    tap.ok("detach", dev_b)
    for image, sums in ((a, sums_a), (b, sums_b)):
        dev = attach(tap, str(image), "--read-only")
        point = tap.mount(dev, "ro")
        assert read_tree(point) == sums
        tap.umount(point)
        tap.ok("detach", dev)


def test_read_only_attach_refuses_writes(devtap: Tapnbd) -> None:
    tap = devtap
    image = tap.image("ro.img", size="64M")
    dev = attach(tap, str(image))
    mkfs(dev)
    point = tap.mount(dev)
    (point / "keep.txt").write_text("kept\n")
    tap.umount(point)
    tap.ok("detach", dev)
    before = hashlib.sha256(image.read_bytes()).hexdigest()

    proc = tap.run("attach", "--read-only", str(image))
    assert proc.returncode == 0, proc.stderr
    assert "read-only" in proc.stderr
    dev = proc.stdout.strip()
    assert tap.list()["exports"][0]["read_only"] is True
    ro = subprocess.run(["blockdev", "--getro", dev], capture_output=True, text=True)
    assert ro.stdout.strip() == "1"
    with pytest.raises(OSError) as exc:
        fd = os.open(dev, os.O_WRONLY)
        try:
            os.write(fd, bytes(4096))
        finally:
            os.close(fd)
    assert exc.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    dd = subprocess.run(
        ["dd", "if=/dev/zero", f"of={dev}", "bs=4096", "count=1", "oflag=direct"],
        capture_output=True,
        text=True,
    )
    assert dd.returncode != 0
    point = tap.mount(dev, "ro")
    assert (point / "keep.txt").read_text() == "kept\n"
    with pytest.raises(OSError) as exc:
        (point / "new.txt").write_text("no")
    assert exc.value.errno == errno.EROFS
    tap.umount(point)
    tap.ok("detach", dev)
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_attach_an_internal_snapshot(devtap: Tapnbd) -> None:
    """``attach --snapshot`` shows the image as it was at the snapshot, read-only, as
    qemu-nbd -c -l does; qemu-img convert -l is the referee."""
    need_tools("qemu-img", "qemu-io")
    tap = devtap
    image = tap.base / "snap.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 2M", str(image)], check=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(image)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 2M", str(image)], check=True)
    want = tap.base / "want.raw"
    subprocess.run(
        ["qemu-img", "convert", "-l", "s1", "-O", "raw", str(image), str(want)], check=True
    )
    proc = tap.run("attach", "--snapshot", "s1", str(image))
    assert proc.returncode == 0, proc.stderr
    assert "snapshot 's1'" in proc.stderr and "read-only" in proc.stderr, proc.stderr
    dev = proc.stdout.strip()
    (export,) = tap.list()["exports"]
    assert export["read_only"] is True and export["snapshot"] == "s1"
    ro = subprocess.run(["blockdev", "--getro", dev], capture_output=True, text=True)
    assert ro.stdout.strip() == "1"
    with open(dev, "rb") as f:
        assert f.read(16 << 20) == want.read_bytes()
    tap.ok("detach", dev)
    # An unknown snapshot is refused by name, and nothing stays attached.
    err = tap.fails("attach", "--snapshot", "nope", str(image))
    assert "nope" in err and "s1" in err, err
    assert tap.list()["exports"] == []


def test_detach_refused_while_mounted(devtap: Tapnbd) -> None:
    tap = devtap
    image = tap.image("m.img", size="64M")
    dev = attach(tap, str(image))
    mkfs(dev)
    point = tap.mount(dev)
    for target in (dev, str(image)):
        err = tap.fails("detach", target)
        assert f"{dev} is mounted on {point}" in err, err
    assert tap.list()["attachments"][0]["device"] == dev
    for force in ((), ("--force",)):
        err = tap.fails("daemon", "stop", "--all", *force)
        assert f"not stopping: {dev} is mounted on {point}" in err, err
    # A plain stop leaves the device to its own data path; the next daemon adopts it.
    stopped = tap.run("daemon", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert f"left {dev} attached" in stopped.stderr
    (point / "after-stop.txt").write_text("written with no daemon\n")
    os.sync()
    listed = tap.run("list", "--json")
    assert "died" not in listed.stderr  # a clean stop is not a crash
    assert f"re-adopted {dev}" in listed.stderr
    assert json.loads(listed.stdout)["attachments"][0]["device"] == dev
    tap.umount(point)
    tap.ok("detach", dev)
    err = tap.fails("detach", dev)
    assert f"nothing is attached as {dev}" in err


def test_attach_twice_and_forced_kernel_path(devtap: Tapnbd) -> None:
    tap = devtap
    image = tap.image("t.img", size="32M")
    dev = attach(tap, str(image))
    assert f"already attached as {dev}" in tap.fails("attach", str(image))
    err = tap.fails("attach", "--via", "nbd", str(tap.image("u.img", size="32M")))
    assert "cannot attach with the kernel nbd client" in err
    assert [e["name"] for e in tap.list()["exports"]] == ["t.img"]  # u.img was undone
    tap.ok("detach", dev)


def test_export_remove_refused_while_attached_or_connected(devtap: Tapnbd) -> None:
    tap = devtap
    image = tap.image("e.img", size="64M")
    uris = tap.ok("export", "add", str(image), "--name", "vol").split()
    unix_uri = next(u for u in uris if u.startswith("nbd+unix"))
    dev = attach(tap, "vol")  # an export's name
    assert tap.list()["exports"][0]["devices"] == [dev]

    err = tap.fails("export", "remove", "vol")
    assert f"export 'vol' is attached as {dev}; detach it first, or use --force" in err

    tap.ok("detach", dev)
    assert tap.list()["exports"][0]["name"] == "vol"  # added by hand: outlives the detach

    # A client that stays connected: qemu-io waiting for commands on stdin.
    client = subprocess.Popen(
        ["qemu-io", "-f", "raw", unix_uri],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tap.procs.append(client)
    for _ in range(200):
        if tap.list()["exports"][0]["clients"] == 1:
            break
        time.sleep(0.05)
    assert tap.list()["exports"][0]["clients"] == 1
    dev = attach(tap, "vol")
    err = tap.fails("export", "remove", "vol")
    assert f"is attached as {dev} and has 1 client connected" in err

    done = tap.run("export", "remove", "--force", "vol")
    assert done.returncode == 0, done.stderr
    assert f"detached {dev}" in done.stderr
    assert "disconnected 1 client" in done.stderr
    assert tap.list()["exports"] == []
    assert backing_under(tap.state) == []
    assert "no export named 'vol'" in tap.fails("export", "remove", "vol")


def test_dead_data_path_under_a_mount_is_left_alone(devtap: Tapnbd) -> None:
    """The daemon and the data path both die under a mounted file system: the next
    daemon must not unmount or detach anything, say where it is mounted, and let
    `detach` finish once it is unmounted."""
    tap = devtap
    image = tap.image("dead.img", size="64M")
    dev = attach(tap, str(image))
    mkfs(dev)
    point = tap.mount(dev)
    (point / "f.txt").write_text("x\n")
    os.sync()
    (tapdisk,) = tapdisk_pids(tap.state)
    pid = tap.status()["pid"]
    os.kill(pid, signal.SIGKILL)
    os.kill(tapdisk, signal.SIGKILL)
    sd = StateDir(str(tap.state))
    while sd.daemon_alive() or pid_alive(tapdisk):
        time.sleep(0.01)

    proc = tap.run("list", "--json")
    assert proc.returncode == 0, proc.stderr
    assert f"left {dev} attached: {dev} is mounted on {point}; unmount it first" in proc.stderr
    assert f"its data path (pid {tapdisk}) is gone" in proc.stderr
    assert f"unmount it, then `tapnbd detach {dev}`" in proc.stderr
    assert [a["device"] for a in json.loads(proc.stdout)["attachments"]] == [dev]
    # Untouched: still mounted, the loop device still on its FUSE file. (nbdfuse itself
    # may have exited when its server died; that is not ours to undo.)
    assert os.path.ismount(point), proc.stderr
    assert "unmounted" not in proc.stderr and "stopped nbdfuse" not in proc.stderr
    assert "detached" not in proc.stderr
    assert backing_under(tap.state) == [dev]
    assert f"cannot detach: {dev} is mounted on {point}" in tap.fails("detach", dev)

    subprocess.run(["umount", str(point)], capture_output=True, timeout=120, check=True)
    tap.mounts.remove(point)
    tap.ok("detach", dev)
    assert tap.list()["attachments"] == [] and nbdfuse_pids(tap.state) == []
    assert backing_under(tap.state) == []


def test_attach_via_fuse_under_a_state_directory_named_oddly() -> None:
    """nbdfuse finds the data path's socket through a URI, in which the state
    directory's path is percent-encoded: before, a space or ``%20`` in it made the
    attach fail (libnbd unescapes ``?socket=``)."""
    need_devices()
    tap = Tapnbd(Path(tempfile.mkdtemp(prefix="tnbd a&b%20+", dir="/tmp")))
    try:
        image = tap.image("d.img", size="8M")
        with open(image, "r+b") as f:
            f.seek(5 << 20)
            f.write(b"found through the socket")
        dev = tap.ok("attach", "--via", "fuse", str(image)).strip()
        with open(dev, "rb") as f:
            f.seek(5 << 20)
            assert f.read(24) == b"found through the socket"
        tap.ok("detach", dev)
    finally:
        tap.cleanup()
