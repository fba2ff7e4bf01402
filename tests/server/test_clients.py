"""Real clients against ``tapnbd serve``: nbdinfo, qemu-io, qemu-img, nbdcopy, fio."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from formats.qcow.check import check_qcow
from formats.qcow.create import create_qcow
from tests.helpers import Server, fio_verify, need, run


def test_nbdinfo_json_reports_capabilities(serve: Callable[..., Server], raw_image: Path) -> None:
    need("nbdinfo")
    server = serve(str(raw_image), "--description", "a test disk")
    info = json.loads(run(["nbdinfo", "--json", server.uri]).stdout)
    assert info["protocol"] == "newstyle-fixed"
    assert info["TLS"] is False
    export = info["exports"][0]
    assert export["export-name"] == "disk.img"
    assert export["description"] == "a test disk"
    assert export["export-size"] == 64 << 20
    assert "base:allocation" in export["contexts"]
    for cap in (
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_df",
        "can_multi_conn",
        "can_cache",
    ):
        assert export[cap] is True, cap
    assert export["is_read_only"] is False
    assert export["block_size_minimum"] == 1
    assert export["block_size_maximum"] == 32 << 20


def test_nbdinfo_can_and_is(serve: Callable[..., Server], raw_image: Path) -> None:
    need("nbdinfo")
    rw = serve(str(raw_image))
    ro = serve(str(raw_image), "--read-only", "--share")  # a reader beside the writer
    assert run(["nbdinfo", "--can", "multi-conn", rw.uri], check=False).returncode == 0
    assert run(["nbdinfo", "--can", "trim", rw.uri], check=False).returncode == 0
    assert run(["nbdinfo", "--is", "read-only", rw.uri], check=False).returncode == 2
    assert run(["nbdinfo", "--is", "read-only", ro.uri], check=False).returncode == 0
    assert run(["nbdinfo", "--can", "trim", ro.uri], check=False).returncode == 2
    assert run(["nbdinfo", "--can", "write", ro.uri], check=False).returncode == 2


def test_nbdinfo_list_names_every_export(serve: Callable[..., Server], tmp_path: Path) -> None:
    need("nbdinfo")
    images = []
    for name in ("a.img", "b.img"):
        path = tmp_path / name
        path.write_bytes(bytes(1 << 20))
        images.append(str(path))
    server = serve(*images, "ram:4M", exports=3)
    assert [u.rsplit("/", 1)[1] for u in server.uris] == ["a.img", "b.img", "ram"]
    listed = json.loads(run(["nbdinfo", "--list", "--json", server.uri]).stdout)
    names = sorted(e["export-name"] for e in listed["exports"])
    assert names == ["a.img", "b.img", "ram"]
    sizes = {e["export-name"]: e["export-size"] for e in listed["exports"]}
    assert sizes == {"a.img": 1 << 20, "b.img": 1 << 20, "ram": 4 << 20}
    # The empty name is the first image (the default export).
    default = server.uri.rsplit("/", 1)[0] + "/"
    assert (
        json.loads(run(["nbdinfo", "--json", default]).stdout)["exports"][0]["export-size"]
        == 1 << 20
    )


def test_nbdinfo_map_shows_holes_and_data(serve: Callable[..., Server], raw_image: Path) -> None:
    need("nbdinfo")
    with open(raw_image, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\xaa" * (1 << 20))
    server = serve(str(raw_image))
    mapping = json.loads(run(["nbdinfo", "--map", "--json", server.uri]).stdout)
    runs = [(m["offset"], m["length"], m["type"]) for m in mapping]
    assert (0, 1 << 20, 3) in runs  # hole, zero
    assert (1 << 20, 1 << 20, 0) in runs  # data
    assert sum(m["length"] for m in mapping) == 64 << 20


def _qcow(path: Path, size: int, *, optimise: bool = True, backing: Path | None = None) -> Path:
    asyncio.run(
        create_qcow(str(path), size, optimise=optimise, backing=str(backing) if backing else None)
    )
    return path


def _map(uri: str) -> list[tuple[int, int, int]]:
    mapping = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    return [(m["offset"], m["length"], m["type"]) for m in mapping]


def test_nbdinfo_map_qcow(serve: Callable[..., Server], tmp_path: Path) -> None:
    """Block status from the qcow tables (type: 0 data, 2 zero, 3 hole|zero)."""
    need("nbdinfo", "qemu-io")
    MiB = 1 << 20
    opt = _qcow(tmp_path / "opt.qcow", 8 * MiB)
    normal = _qcow(tmp_path / "normal.qcow", 8 * MiB, optimise=False)
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(4 * MiB)  # shorter than the overlay
        f.seek(1 * MiB)
        f.write(b"b" * 65536)
    over = _qcow(tmp_path / "over.qcow", 8 * MiB, backing=base)
    server = serve(str(opt), str(normal), str(over), "--allow-probed-backing-chain", exports=3)
    for uri in server.uris:
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 4k 8k", "-c", "write -P 0x22 3M 4k", uri])
    o, n, v = (_map(u) for u in server.uris)
    # Optimised: the first write preallocated the slot's whole extent (2 MiB); the
    # clusters never written are provably zero (a hole in the file).
    assert o == [
        (0, 4096, 2),
        (4096, 8192, 0),
        (12288, 3 * MiB - 12288, 2),  # two extents, both allocated: one run
        (3 * MiB, 4096, 0),
        (3 * MiB + 4096, 1 * MiB - 4096, 2),
        (4 * MiB, 4 * MiB, 3),
    ]
    # Normal, no backing file: unallocated is a hole that reads as zeros.
    assert n == [
        (0, 4096, 3),
        (4096, 8192, 0),
        (12288, 3 * MiB - 12288, 3),
        (3 * MiB, 4096, 0),
        (3 * MiB + 4096, 5 * MiB - 4096, 3),
    ]
    # Over a backing file: its data is data, its holes and past its end are holes.
    assert v == [
        (0, 4096, 3),
        (4096, 8192, 0),
        (12288, 1 * MiB - 12288, 3),
        (1 * MiB, 65536, 0),
        (1 * MiB + 65536, 2 * MiB - 65536, 3),
        (3 * MiB, 4096, 0),
        (3 * MiB + 4096, 5 * MiB - 4096, 3),
    ]


@pytest.mark.parametrize("spec", ["file", "ram"])
def test_qemu_io_patterns(serve: Callable[..., Server], raw_image: Path, spec: str) -> None:
    need("qemu-io")
    server = serve(str(raw_image) if spec == "file" else "ram:64M")
    cmds = [
        "write -P 0xab 0 1M",
        "write -P 0xcd 1M 4k",
        "aio_write -P 0x11 8M 64k",
        "aio_write -P 0x22 9M 64k",
        "aio_flush",
        "write -z 2M 1M",
        "discard 4M 1M",
        "write -P 0x33 -f 10M 512",
        "flush",
        "read -P 0xab 0 1M",
        "read -P 0xcd 1M 4k",
        "read -P 0 2M 1M",
        "read -P 0x11 8M 64k",
        "read -P 0x22 9M 64k",
        "read -P 0x33 10M 512",
        "read -P 0 63M 1M",
    ]
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    out = run([*args, server.uri]).stdout
    assert "Pattern verification failed" not in out
    assert out.count("read ") >= 7


def test_qemu_img_convert_and_compare(serve: Callable[..., Server], tmp_path: Path) -> None:
    need("qemu-img")
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(3 << 20) + bytes(5 << 20) + os.urandom(1 << 20))
    target = tmp_path / "target.img"
    target.write_bytes(bytes(src.stat().st_size))
    server = serve(str(target))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), server.uri])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), server.uri])
    back = tmp_path / "back.img"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, str(back)])
    assert back.read_bytes() == src.read_bytes()


def test_nbdcopy_both_directions(serve: Callable[..., Server], tmp_path: Path) -> None:
    need("nbdcopy")
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(2 << 20) + bytes(6 << 20) + os.urandom(8 << 20))
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(16 << 20))
    server = serve(str(disk))
    run(["nbdcopy", "--flush", str(src), server.uri])
    out = tmp_path / "out.img"
    run(["nbdcopy", server.uri, str(out)])
    assert out.read_bytes() == src.read_bytes()
    assert disk.read_bytes() == src.read_bytes()
    # Multi-connection, many requests in flight.
    out2 = tmp_path / "out2.img"
    run(["nbdcopy", "-C", "4", "-R", "16", "--request-size=65536", server.uri, str(out2)])
    assert out2.read_bytes() == src.read_bytes()


def fio_four_connections(uri: str, *sizes: str) -> None:
    """fio's random writes over four connections, 16 MiB each, then every block read
    back and checked by crc32c; ``sizes``: block sizes and queue depth."""
    job = fio_verify(
        uri, "--rw=randwrite", *sizes, "--numjobs=4", "--size=16m", "--offset_increment=16m"
    )
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 64 << 20
    assert job["read"]["io_bytes"] >= 64 << 20  # the verify pass read everything back


@pytest.mark.parametrize("spec", ["file", "ram", "qcow-optimised", "qcow-normal"])
def test_fio_verify_crc32c_four_connections(
    serve: Callable[..., Server], tmp_path: Path, spec: str
) -> None:
    """32 requests in flight over 4 connections, every block verified."""
    need("fio")
    disk = tmp_path / "fio.img"
    if spec.startswith("qcow"):
        # Fresh images: every first write allocates, concurrently with the others.
        _qcow(disk, 64 << 20, optimise=spec == "qcow-optimised")
    else:
        disk.write_bytes(bytes(64 << 20))
    server = serve(str(disk) if spec != "ram" else "ram:64M")
    fio_four_connections(server.uri, "--bs=4k", "--bsrange=512-64k", "--iodepth=8")
    if spec.startswith("qcow"):
        # Closed cleanly, the image is consistent: no leaks, no overlaps, checksum written.
        assert server.stop() == 0
        res = asyncio.run(check_qcow(str(disk)))
        assert res.exit_code == 0, res.to_json()
        assert res.allocated_clusters > 0
        if spec == "qcow-optimised":
            assert res.cksum == "ok"


def test_nbdcopy_big_writes_into_optimised_qcow(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    """1 MiB WRITEs into a fresh allocation-optimised qcow (spliced into each extent's
    place in the file when the payload is all queued: tests/server/test_splice.py), read
    back by qemu-img from the closed image."""
    need("nbdcopy", "qemu-img")
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(5 << 20) + bytes(2 << 20) + os.urandom(9 << 20))
    disk = _qcow(tmp_path / "disk.qcow", 16 << 20)
    server = serve(str(disk))
    run(["nbdcopy", "--flush", "--request-size=1048576", str(src), server.uri])
    assert server.stop() == 0
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow", str(src), str(disk)])
    res = asyncio.run(check_qcow(str(disk)))
    assert res.exit_code == 0 and res.cksum == "ok", res.to_json()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_fio_verify_big_writes_arriving_in_pieces(
    serve: Callable[..., Server], tmp_path: Path, transport: str
) -> None:
    """1 MiB WRITEs over four connections, verified by crc32c. A unix socket queues at
    most the sender's buffer (about 208 KiB), so every payload arrives in pieces and is
    spliced into the file as it comes (tests/server/test_splice.py). Over TCP from this
    host no payload is spliced (splice.same_host): all are received into buffers."""
    need("fio")
    disk = tmp_path / "fio.img"
    disk.write_bytes(bytes(64 << 20))
    args = [str(disk), "--verbose"]
    if transport == "unix":
        args += ["--socket", str(tmp_path / "s.sock")]
    server = serve(*args)
    fio_four_connections(server.uri, "--bs=1M", "--iodepth=4")
    if transport == "unix":
        server.wait_for_log("spliced as its payload arrives")
    assert server.stop() == 0
    if transport == "tcp":  # where it costs a local sender more than it saves
        assert "spliced as its payload arrives" not in server.stderr()
