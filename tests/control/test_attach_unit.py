"""Pure parts of attaching: the nbd-client command line, mount checks, path choice,
Prometheus text."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tapnbd.control import attach as devices
from tapnbd.control.attach import AttachError, nbd_client_command, nbd_disconnect_command
from tapnbd.control.messages import ExportStats, OpCounters
from tapnbd.control.metrics import prometheus_text


def test_nbd_client_unix_socket() -> None:
    cmd = nbd_client_command("/dev/nbd0", "disk.img", socket="/run/tapnbd/attach.sock")
    assert cmd == [
        "nbd-client",
        "-unix",
        "/run/tapnbd/attach.sock",
        "/dev/nbd0",
        "-N",
        "disk.img",
        "-b",
        "512",
    ]


def test_nbd_client_tcp_multi_conn_read_only() -> None:
    cmd = nbd_client_command(
        "/dev/nbd3",
        "vm disk",
        host="10.0.0.7",
        port=10810,
        read_only=True,
        connections=4,
        block_size=4096,
        timeout=30,
    )
    assert cmd == [
        "nbd-client",
        "10.0.0.7",
        "10810",
        "/dev/nbd3",
        "-N",
        "vm disk",
        "-b",
        "4096",
        "-C",
        "4",
        "-R",
        "-t",
        "30",
    ]


def test_nbd_client_default_port_and_disconnect() -> None:
    assert nbd_client_command("/dev/nbd1", "x", host="h")[1:3] == ["h", "10809"]
    assert nbd_disconnect_command("/dev/nbd1") == ["nbd-client", "-d", "/dev/nbd1"]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, "exactly one of socket and host"),
        ({"socket": "/s", "host": "h"}, "exactly one of socket and host"),
        ({"socket": "/s", "block_size": 8192}, "block sizes 512 to 4096"),
        ({"socket": "/s", "connections": 0}, "at least 1"),
    ],
)
def test_nbd_client_refuses(kwargs: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        nbd_client_command("/dev/nbd0", "x", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs an export name"):
        nbd_client_command("/dev/nbd0", "", socket="/s")


def test_choose_via_unknown() -> None:
    with pytest.raises(AttachError, match="use auto, nbd, fuse or socket"):
        devices.choose_via("usb")


def test_choose_via_socket_needs_no_device() -> None:
    via, why = devices.choose_via("socket")
    assert via == "socket" and "no local device" in why


def test_choose_via_nbd_refused_with_reason_when_unavailable() -> None:
    ok, why = devices.kernel_nbd_status()
    if ok:
        pytest.skip("the kernel nbd client works here")
    with pytest.raises(
        AttachError, match="cannot attach with the kernel nbd client: " + re.escape(why)
    ):
        devices.choose_via("nbd")


def _find_block_device() -> tuple[str, int]:
    for name in sorted(os.listdir("/dev")):
        path = "/dev/" + name
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_mode & 0o170000) == 0o060000:
            return path, st.st_rdev
    pytest.skip("no block device in /dev")


def test_mounts_of_matches_device_number_and_unescapes(tmp_path: Path) -> None:
    device, rdev = _find_block_device()
    major, minor = os.major(rdev), os.minor(rdev)
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        f"90 22 {major}:{minor} / /mnt/my\\040disk rw,relatime - ext4 /dev/whatever rw\n"
        f"91 22 {major}:{minor} /sub /srv/bind rw - ext4 /dev/whatever rw\n"
        "92 22 0:50 / /elsewhere rw - tmpfs tmpfs rw\n"
    )
    assert devices.mounts_of(device, str(info)) == ["/mnt/my disk", "/srv/bind"]
    assert devices.mounts_of("/nonexistent", str(info)) == []


def test_mounts_of_matches_source_path(tmp_path: Path) -> None:
    device, _ = _find_block_device()
    info = tmp_path / "mountinfo"
    info.write_text(f"90 22 0:99 / /mnt/x rw - ext4 {device} rw\n")
    assert devices.mounts_of(device, str(info)) == ["/mnt/x"]


def test_pid_alive() -> None:
    assert devices.pid_alive(os.getpid())
    assert not devices.pid_alive(0)
    assert not devices.pid_alive(2**22 + 1)


def test_prometheus_text() -> None:
    c = OpCounters(ops=3, bytes=12288, errors=1, p50_us=8.0, p99_us=16.0, max_us=20.0)
    zero = OpCounters(0, 0, 0, 0.0, 0.0, 0.0)
    stats = ExportStats(
        name='we"ird\\name',
        image="/a",
        format="raw",
        ops={"read": c, "write": zero, "trim": zero},
        errors_by_errno={"5": 1},
        in_flight=2,
        connections=1,
        uptime_s=3.0,
        enabled=True,
    )
    text = prometheus_text([stats], {"up": 1, "exports": 1})
    lines = text.splitlines()
    assert "# TYPE tapnbd_requests_total counter" in lines
    assert 'tapnbd_requests_total{export="we\\"ird\\\\name",op="read"} 3' in lines
    assert 'tapnbd_bytes_total{export="we\\"ird\\\\name",op="read"} 12288' in lines
    assert 'tapnbd_errors_by_errno_total{export="we\\"ird\\\\name",errno="EIO"} 1' in lines
    assert 'tapnbd_request_duration_max_seconds{export="we\\"ird\\\\name",op="read"} 2e-05' in lines
    assert 'tapnbd_request_duration_seconds_count{export="we\\"ird\\\\name",op="trim"} 0' in lines
    assert 'tapnbd_requests_in_flight{export="we\\"ird\\\\name"} 2' in lines
    assert "tapnbd_up 1" in lines
    for line in lines:  # every sample line is NAME{LABELS} VALUE
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
    assert text.endswith("\n")
