"""The rbd driver against a real Ceph cluster, with ``rbd`` and qemu's own rbd driver as referees."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import (
    SYSTEM_PYTHON,
    Server,
    fio_verify,
    nbdsh_script,
    need,
    qemu_io,
    run,
    start_server,
    tapnbd_cmd,
)
from tests.rbd import cluster as ceph

pytestmark = pytest.mark.slow


def rbd_export(cluster: ceph.Cluster, image: str, dest: Path) -> bytes:
    """The image's bytes as ``rbd export`` reads them (the referee)."""
    cluster.rbd("export", "--no-progress", image.removeprefix("rbd:"), str(dest))
    return dest.read_bytes()


def nbd_bytes(uri: str, dest: Path) -> bytes:
    """The export's bytes as nbdcopy reads them (a client nobody here wrote)."""
    need("nbdcopy")
    run(["nbdcopy", uri, str(dest)])
    return dest.read_bytes()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_serve_writes_land_in_rbd(
    serve: Callable[..., Server], rbd_image: str, ceph_cluster: ceph.Cluster, tmp_path: Path
) -> None:
    server = serve(rbd_image, "--socket", str(tmp_path / "s"))
    qemu_io(server.uri, "write -P 0x5a 1M 3M", "write -P 0xa5 63M 1M", "flush")
    qemu_io(server.uri, "read -P 0x5a 1M 3M", "read -P 0 4M 1M")
    exported = rbd_export(ceph_cluster, rbd_image, tmp_path / "ref.raw")
    assert exported[1 << 20 : 4 << 20] == b"\x5a" * (3 << 20)
    assert digest(nbd_bytes(server.uri, tmp_path / "nbd.raw")) == digest(exported)
    # qemu's own rbd driver reads the same bytes.
    qemu_io(rbd_image, "read -P 0xa5 63M 1M")


def test_block_status_follows_allocation(
    serve: Callable[..., Server], rbd_image: str, tmp_path: Path
) -> None:
    server = serve(rbd_image, "--socket", str(tmp_path / "s"))
    qemu_io(server.uri, "write -P 1 8M 64k", "flush")
    extents = json.loads(run(["nbdinfo", "--map", "--json", server.uri]).stdout)
    data = [e for e in extents if not e["type"] & 1]
    assert data and all(e["offset"] <= 8 << 20 < e["offset"] + e["length"] for e in data), data
    qemu_io(server.uri, "discard 8M 64k")
    extents = json.loads(run(["nbdinfo", "--map", "--json", server.uri]).stdout)
    assert all(e["type"] & 1 for e in extents), extents


def test_fio_verify_through_rbd(
    serve: Callable[..., Server], rbd_image: str, tmp_path: Path
) -> None:
    server = serve(rbd_image, "--socket", str(tmp_path / "s"))
    job = fio_verify(
        server.uri, "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16m", timeout=600
    )
    assert job["error"] == 0


def test_convert_qcow_into_rbd_and_back(
    rbd_image: str, ceph_cluster: ceph.Cluster, tmp_path: Path
) -> None:
    src = tmp_path / "src.qcow"
    run(tapnbd_cmd("create", str(src), "--size", "32M"))
    seed = random.randrange(1 << 30)
    print(f"seed={seed}")
    rng = random.Random(seed)
    cmds = [f"write -P {rng.randrange(1, 255)} {rng.randrange(0, 31)}M 512k" for _ in range(6)]
    qemu_io(src, *cmds, fmt="qcow")
    name = rbd_image + "-imported"
    run(tapnbd_cmd("convert", "-q", str(src), name))
    # qemu-img reads the imported image through its own rbd driver.
    ref = tmp_path / "ref.raw"
    run(["qemu-img", "convert", "-f", "qcow", "-O", "raw", str(src), str(ref)])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref), name])
    out = tmp_path / "out.raw"
    run(tapnbd_cmd("convert", "-q", "-O", "raw", name, str(out)))
    assert digest(out.read_bytes()) == digest(ref.read_bytes())


def test_create_info_and_snapshots(ceph_cluster: ceph.Cluster, tmp_path: Path) -> None:
    name = f"rbd:{ceph.POOL}/made-{os.getpid()}"
    run(tapnbd_cmd("create", name, "--size", "10M"))
    failed = run(tapnbd_cmd("create", name, "--size", "10M"), check=False)
    assert failed.returncode == 1 and "already exists" in failed.stderr
    qemu_io(name, "write -P 7 0 1M")
    ceph_cluster.rbd("snap", "create", f"{name[4:]}@before")
    qemu_io(name, "write -P 9 0 1M")
    info = json.loads(run(tapnbd_cmd("info", "--json", name)).stdout)
    assert info["format"] == "rbd" and info["virtual-size"] == 10 << 20
    assert "exclusive-lock" in info["features"]
    assert [s["name"] for s in info["snapshots"]] == ["before"]
    assert "lock-owners" in info


def test_snapshot_is_served_read_only(
    serve: Callable[..., Server], rbd_image: str, ceph_cluster: ceph.Cluster, tmp_path: Path
) -> None:
    qemu_io(rbd_image, "write -P 3 0 1M")
    ceph_cluster.rbd("snap", "create", f"{rbd_image[4:]}@s1")
    qemu_io(rbd_image, "write -P 4 0 1M")
    server = serve(rbd_image + "@s1", "--socket", str(tmp_path / "s"))
    info = json.loads(run(["nbdinfo", "--json", server.uri]).stdout)
    assert info["exports"][0]["is_read_only"] is True
    out = run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 3 0 1M", server.uri]).stdout
    assert "read 1048576/1048576" in out and "verification failed" not in out, out


def test_qcow_overlay_on_rbd_backing(rbd_image: str, tmp_path: Path) -> None:
    """An overlay whose header names an RBD image: followed only where the admin says
    the header may name one (--allow-remote-backing; README, "Security model")."""
    qemu_io(rbd_image, "write -P 0x11 0 2M")
    overlay = tmp_path / "overlay.qcow"
    run(tapnbd_cmd("create", str(overlay), "-b", rbd_image))
    refused = run(tapnbd_cmd("info", "-f", "qcow", str(overlay)), check=False)
    assert refused.returncode == 1 and "--allow-remote-backing" in refused.stderr, refused
    allow = "--allow-remote-backing"
    info = json.loads(run(tapnbd_cmd("info", "--json", allow, "-f", "qcow", str(overlay))).stdout)
    assert info["backing-filename"] == rbd_image
    server = start_server(
        [str(overlay), "--format", "qcow", allow, "--socket", str(tmp_path / "s")],
        tmp_path / "log",
    )
    try:
        qemu_io(server.uri, "read -P 0x11 0 2M", "write -P 0x22 0 64k", "flush")
        qemu_io(server.uri, "read -P 0x22 0 64k", "read -P 0x11 64k 1M")
    finally:
        server.stop()
    qemu_io(rbd_image, "read -P 0x11 0 2M")  # the base is untouched


def test_qcow2_overlay_on_rbd_backing_as_qemu_img_records_it(
    rbd_image: str, tmp_path: Path
) -> None:
    """QEMU's rbd is a protocol, so qemu-img records an rbd: backing file's format as
    raw; tapnbd opens such an overlay, and its own create (without -F) records the same."""
    qemu_io(rbd_image, "write -P 0x33 0 1M")
    by_qemu, by_us = tmp_path / "q.qcow2", tmp_path / "t.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", rbd_image, str(by_qemu)])
    run(tapnbd_cmd("create", "-f", "qcow2", "-b", rbd_image, str(by_us)))
    for overlay in (by_qemu, by_us):
        info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(overlay)]).stdout)
        assert info["backing-filename-format"] == "raw", info
        sock, log = tmp_path / f"{overlay.stem}.sock", tmp_path / f"{overlay.stem}.log"
        args = [str(overlay), "-f", "qcow2", "--allow-remote-backing", "--socket", str(sock)]
        server = start_server(args, log)
        try:
            qemu_io(server.uri, "read -P 0x33 0 1M", "write -P 0x44 0 64k", "flush")
        finally:
            server.stop()
        qemu_io(overlay, "read -P 0x44 0 64k", "read -P 0x33 64k 960k", fmt="qcow2")
    qemu_io(rbd_image, "read -P 0x33 0 1M")  # the base is untouched


WRITE_AND_FLUSH = """
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\\x42" * 65536, 1 << 20)
h.flush()
print(json.dumps("flushed"))
"""


def test_kill9_keeps_flushed_writes(
    rbd_image: str, ceph_cluster: ceph.Cluster, tmp_path: Path
) -> None:
    server = start_server([rbd_image, "--socket", str(tmp_path / "s")], tmp_path / "log")
    assert nbdsh_script(WRITE_AND_FLUSH, server.uri) == "flushed"
    server.stop(signal.SIGKILL)
    data = rbd_export(ceph_cluster, rbd_image, tmp_path / "after.raw")
    assert data[1 << 20 : (1 << 20) + 65536] == b"\x42" * 65536


def test_dead_osd_gives_eio_then_recovers(
    rbd_image: str, ceph_cluster: ceph.Cluster, tmp_path: Path
) -> None:
    name = rbd_image + ":rados_osd_op_timeout=3"
    server = start_server(
        [name, "ram:1M", "--socket", str(tmp_path / "s")], tmp_path / "log", exports=2
    )
    try:
        qemu_io(server.uris[0], "write -P 5 0 64k", "flush")
        ceph_cluster.kill_osd()
        try:
            failed = run(["qemu-io", "-f", "raw", "-c", "read 0 64k", server.uris[0]], check=False)
            assert "Input/output error" in failed.stdout + failed.stderr, failed
            # The server is up and another export is unaffected.
            qemu_io(server.uris[1], "write -P 1 0 4k", "read -P 1 0 4k")
        finally:
            ceph_cluster.start_osd()
        qemu_io(server.uris[0], "read -P 5 0 64k", "write -P 6 64k 4k", "flush")
    finally:
        server.stop()


WRITE_UNTIL_KILLED = """
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
flushed, errors = [], []
for i in range(int(sys.argv[2])):
    try:
        h.pwrite(bytes([i % 251 + 1]) * 65536, i * 65536)
        h.flush()
        flushed.append(i)
        print("flushed", i, flush=True)
    except nbd.Error as e:
        errors.append(e.errno)
        if len(errors) >= 3:
            break
print(json.dumps({"flushed": flushed, "errors": errors}), flush=True)
"""


def test_osd_killed_during_writes(
    rbd_image: str, ceph_cluster: ceph.Cluster, tmp_path: Path
) -> None:
    """Every error is a clean EIO, and after the OSD is back every flushed write reads back."""
    need(SYSTEM_PYTHON)
    server = start_server(
        [rbd_image + ":rados_osd_op_timeout=3", "--socket", str(tmp_path / "s")],
        tmp_path / "log",
    )
    writer = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", WRITE_UNTIL_KILLED, server.uri, "512"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert writer.stdout is not None
    try:
        for line in writer.stdout:  # kill the OSD once 20 writes are flushed
            if line.startswith("flushed 19"):
                ceph_cluster.kill_osd()
                break
        result = json.loads(writer.stdout.read().strip().splitlines()[-1])
        writer.wait(timeout=120)
    finally:
        writer.kill()
        ceph_cluster.start_osd()
    assert result["errors"] and set(result["errors"]) == {"EIO"}, result
    assert server.proc.poll() is None
    flushed = result["flushed"]
    assert len(flushed) >= 20
    server.stop()
    data = rbd_export(ceph_cluster, rbd_image, tmp_path / "after.raw")
    for i in flushed:
        assert data[i * 65536 : (i + 1) * 65536] == bytes([i % 251 + 1]) * 65536, i


def test_unreachable_cluster_is_a_one_line_error(tmp_path: Path) -> None:
    conf = tmp_path / "dead.conf"
    conf.write_text("[global]\nmon host = v1:127.0.0.1:1\nauth client required = none\n")
    name = f"rbd:rbd/x:conf={conf}:client_mount_timeout=2:rados_mon_op_timeout=2"
    proc = run(tapnbd_cmd("info", name), check=False, timeout=60)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("tapnbd:")]
    assert len(lines) == 1 and "Ceph cluster" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_two_hosts_hand_over_with_exclusive(rbd_image: str, tmp_path: Path) -> None:
    """Live migration: A holds the lock; B waits; A flushes and releases; B serves."""
    a = start_server(
        [rbd_image, "--exclusive", "--socket", str(tmp_path / "a")], tmp_path / "a.log"
    )
    b: Server | None = None
    try:
        qemu_io(a.uri, "write -P 0xaa 0 1M")  # not flushed: the release must flush it
        with open(tmp_path / "b.log", "w") as err:
            b_proc = subprocess.Popen(
                tapnbd_cmd(
                    "serve", rbd_image, "--exclusive", "--lock-wait", "120",
                    "--socket", str(tmp_path / "b"),
                ),
                stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip
        # B cannot take the lock while A has it: it has not announced itself.
        assert b_proc.poll() is None
        a.proc.send_signal(signal.SIGUSR1)  # hand-over: A flushes and releases
        from tests.helpers import read_ready_lines

        uri = read_ready_lines(b_proc, 1, tmp_path / "b.log", 120, "server B").split()[0]
        b = Server(b_proc, [uri], tmp_path / "b.log")
        qemu_io(b.uri, "read -P 0xaa 0 1M", "write -P 0xbb 1M 4k", "flush")
        # A write still arriving at the old host fails cleanly with EPERM.
        late = run(["qemu-io", "-f", "raw", "-c", "write -P 0xcc 0 4k", a.uri], check=False)
        assert "Operation not permitted" in late.stdout + late.stderr, late
        qemu_io(b.uri, "read -P 0xaa 0 4k")
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_shared_without_exclusive_is_librbd_default(rbd_image: str, tmp_path: Path) -> None:
    """Without --exclusive both hosts may write: librbd moves the lock between them."""
    a = start_server([rbd_image, "--socket", str(tmp_path / "a")], tmp_path / "a.log")
    b = start_server([rbd_image, "--socket", str(tmp_path / "b")], tmp_path / "b.log")
    try:
        qemu_io(a.uri, "write -P 1 0 4k", "flush")
        qemu_io(b.uri, "write -P 2 4k 4k", "flush")
        qemu_io(a.uri, "read -P 1 0 4k", "read -P 2 4k 4k")
    finally:
        a.stop()
        b.stop()
