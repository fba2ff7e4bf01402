"""Corrupt QCOW v1 images, made by hand: open fails with a message naming the field, or
the request fails with EIO. Never a crash, and never another cluster's data.

The base image is a normal 8 MiB qcow (4 KiB clusters, 512-entry L2 tables, so one L1
slot covers 2 MiB) written with 'a' at 0 and 'b' at 3 MiB: two L2 tables, two clusters.
The server tests check that EIO reaches a real client (libnbd) and that the server goes
on serving. The header parser is property-tested with hypothesis.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from formats import open_image
from formats.qcow.geometry import MAX_L1_SIZE, Geometry, l1_cksum
from formats.qcow.layout import (
    CKSUM_OFFSET,
    EXT_OFFSET,
    HEADER_SIZE,
    QCOW_MAGIC,
    XEN_MAGIC,
    QcowHeader,
    XenExtension,
)
from formats.qcow.meta import check_version_and_crypt
from tapnbd.errors import ImageError, InvalidImageError, UnsupportedImageError
from tests.formats.qcow_util import MiB, make_qcow, need, open_qcow, patch, qemu_img, read_header
from tests.helpers import Server, nbdsh_script, tapnbd_cmd

SIZE = 8 * MiB
CS = 4096
A_OFF, B_OFF = 0, 3 * MiB


async def _base(path: Path, *, optimise: bool = False) -> Path:
    await make_qcow(path, SIZE, optimise=optimise)
    d = await open_qcow(path)
    await d.pwrite(A_OFF, b"a" * CS)
    await d.pwrite(B_OFF, b"b" * CS)
    await d.close()
    return path


def _l1_at(path: Path, i: int) -> int:
    return read_header(path).l1_table_offset + 8 * i


def _l1(path: Path, i: int) -> int:
    with open(path, "rb") as f:
        f.seek(_l1_at(path, i))
        return int.from_bytes(f.read(8), "big")


def _set_l1(path: Path, i: int, value: int, *, fix_cksum: bool = False) -> None:
    patch(path, _l1_at(path, i), value.to_bytes(8, "big"))
    if fix_cksum:  # a forger who also rewrites the checksum
        h = read_header(path)
        with open(path, "rb") as f:
            f.seek(h.l1_table_offset)
            l1 = f.read(Geometry.from_header(h).l1_size * 8)
        patch(path, CKSUM_OFFSET, l1_cksum(l1).to_bytes(4, "big"))


def _l2(path: Path, i: int, j: int) -> int:
    with open(path, "rb") as f:
        f.seek(_l1(path, i) + 8 * j)
        return int.from_bytes(f.read(8), "big")


def _set_l2(path: Path, i: int, j: int, value: int) -> None:
    patch(path, _l1(path, i) + 8 * j, value.to_bytes(8, "big"))


def _field(offset: int, fmt: str, value: int) -> Callable[[Path], None]:
    return lambda p: patch(p, offset, struct.pack(fmt, value))


def _eof(p: Path) -> int:
    return p.stat().st_size


# Header field offsets (spec §1.1).
VERSION, BACKING_OFF, SIZE_OFF, CLUSTER_BITS, L2_BITS, CRYPT, L1_OFF = 4, 8, 24, 32, 33, 36, 40

#: (id, damage, error type, what the message must say: the field and the fault)
OPEN_FAILURES: list[tuple[str, Callable[[Path], None], type[ImageError], str]] = [
    (
        "l1-entry-past-eof",
        lambda p: _set_l1(p, 1, _eof(p) + CS),
        InvalidImageError,
        r"L1 entry 1 \(0x[0-9a-f]+\) points past the end of the file",
    ),
    (
        "l1-entry-straddles-eof",
        lambda p: _set_l1(p, 1, _eof(p) - 8),
        InvalidImageError,
        r"L1 entry 1 .* points past the end of the file",
    ),
    (
        "l2-table-overlaps-header",
        lambda p: _set_l1(p, 0, 16),
        InvalidImageError,
        r"L1 entry 0 \(0x10\) points into the header or L1 table",
    ),
    (
        "l2-table-overlaps-l1-table",
        lambda p: _set_l1(p, 0, 0x1000),
        InvalidImageError,
        r"L1 entry 0 \(0x1000\) points into the header or L1 table \(which end at 0x1020\)",
    ),
    (
        "l2-tables-overlap",
        lambda p: _set_l1(p, 1, _l1(p, 0) + 8),
        InvalidImageError,
        r"L1 entries 0 and 1 point to overlapping L2 tables",
    ),
    (
        "l1-table-overlaps-header",
        _field(L1_OFF, ">Q", 16),
        InvalidImageError,
        r"l1_table_offset 0x10 overlaps the header",
    ),
    (
        "l1-table-past-eof",
        _field(L1_OFF, ">Q", 1 << 40),
        InvalidImageError,
        r"l1_table_offset 0x10000000000 lies past the end of the file",
    ),
    (
        "size-absurd",
        _field(SIZE_OFF, ">Q", (1 << 64) - 1),
        InvalidImageError,
        r"size 18446744073709551615 is absurd",
    ),
    (
        "l1-size-absurd",
        _field(SIZE_OFF, ">Q", 1 << 62),
        InvalidImageError,
        rf"size {1 << 62} needs an L1 table of {(1 << 62) >> 21} entries; at most {MAX_L1_SIZE}",
    ),
    (
        "l1-size-past-eof",
        _field(SIZE_OFF, ">Q", 1 << 40),  # 512 Ki entries: 4 MiB of L1 in a 24 KiB file
        InvalidImageError,
        r"L1 table \(l1_size 524288 entries at l1_table_offset 0x1000\) runs past the end "
        r"of the file .*truncated",
    ),
    (
        "size-too-small",
        _field(SIZE_OFF, ">Q", 1),
        InvalidImageError,
        r"size 1 is too small",
    ),
    (
        "truncated-in-header",
        lambda p: os.truncate(p, 30),
        InvalidImageError,
        r"file is 30 bytes, shorter than the 48-byte QCOW header",
    ),
    (
        "truncated-empty",
        lambda p: os.truncate(p, 0),
        InvalidImageError,
        r"file is 0 bytes, shorter than the 48-byte QCOW header",
    ),
    (
        "truncated-in-l1",
        lambda p: os.truncate(p, 4096 + 12),
        InvalidImageError,
        r"L1 table \(l1_size 4 entries .*\) runs past the end of the file \(4108 bytes\)",
    ),
    (
        "truncated-in-l2",
        lambda p: os.truncate(p, _l1(p, 1) + 100),
        InvalidImageError,
        r"L1 entry 1 .* points past the end of the file",
    ),
    (
        "bad-magic",
        _field(0, ">I", 0x51464900),
        InvalidImageError,
        r"magic 0x51464900 is not QCOW's 0x514649fb",
    ),
    (
        "version-2",
        _field(VERSION, ">I", 2),
        UnsupportedImageError,
        r"version 2: this is a qcow2 image",
    ),
    (
        "version-3",
        _field(VERSION, ">I", 3),
        UnsupportedImageError,
        r"version 3: this is a qcow2 image",
    ),
    ("version-0", _field(VERSION, ">I", 0), InvalidImageError, r"version 0 is unknown"),
    (
        "encrypted",
        _field(CRYPT, ">I", 1),
        UnsupportedImageError,
        r"crypt_method 1: the image is encrypted",
    ),
    ("crypt-unknown", _field(CRYPT, ">I", 2), InvalidImageError, r"crypt_method 2 is unknown"),
    (
        "cluster-bits-small",
        _field(CLUSTER_BITS, ">B", 8),
        InvalidImageError,
        r"cluster_bits 8 is out of range",
    ),
    (
        "cluster-bits-big",
        _field(CLUSTER_BITS, ">B", 17),
        InvalidImageError,
        r"cluster_bits 17 is out of range",
    ),
    ("l2-bits-small", _field(L2_BITS, ">B", 5), InvalidImageError, r"l2_bits 5 is out of range"),
    ("l2-bits-big", _field(L2_BITS, ">B", 14), InvalidImageError, r"l2_bits 14 is out of range"),
    (
        "backing-name-past-eof",
        lambda p: _backing(p, 1 << 30, 10),
        InvalidImageError,
        r"backing_file_offset 0x40000000 \(\+10 bytes\) lies past the end of the file",
    ),
    (
        "backing-name-too-long",
        lambda p: _backing(p, 64, 5000),
        InvalidImageError,
        r"backing_file_size 5000 is too long",
    ),
    (
        "backing-name-overlaps-header",
        lambda p: _backing(p, 8, 16),
        InvalidImageError,
        r"backing_file_offset 0x8 overlaps the header",
    ),
    (
        "backing-name-overlaps-l1",
        lambda p: _backing(p, 4096, 16),
        InvalidImageError,
        r"backing_file_offset 0x1000 \(\+16 bytes\) overlaps the L1 table",
    ),
]


def _backing(path: Path, offset: int, length: int) -> None:
    patch(path, BACKING_OFF, struct.pack(">QI", offset, length))


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [pytest.param(d, e, m, id=i) for i, d, e, m in OPEN_FAILURES],
)
async def test_open_names_the_field(
    tmp_path: Path, damage: Callable[[Path], None], error: type[ImageError], message: str
) -> None:
    img = await _base(tmp_path / "c.qcow")
    damage(img)
    with pytest.raises(error, match=message) as info:
        await open_image(str(img), fmt="qcow")
    assert str(info.value).startswith(f"{img}: ")  # and the file
    # Read-only opens (tapnbd info, backing files) check the same things.
    with pytest.raises(error, match=message):
        await open_image(str(img), fmt="qcow", read_only=True)


async def test_qemu_made_qcow2_and_encrypted_images_are_refused(tmp_path: Path) -> None:
    need("qemu-img")
    q2 = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", q2, "1M")
    with pytest.raises(UnsupportedImageError, match=r"version 3: this is a qcow2 image"):
        await open_image(str(q2), fmt="qcow")  # probing picks qcow2 (test_qcow2_read.py)
    enc = tmp_path / "enc.qcow"
    qemu_img(
        "create",
        "--object",
        "secret,id=s0,data=swordfish",
        "-f",
        "qcow",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s0",
        enc,
        "1M",
    )
    with pytest.raises(UnsupportedImageError, match=r"crypt_method 1: the image is encrypted"):
        await open_image(str(enc))


# Corruption found only when a table is read: the request fails with EIO.

#: (id, damage, guest offsets whose requests must fail)
EIO_CASES: list[tuple[str, Callable[[Path], None], list[int]]] = [
    ("l2-entry-past-eof", lambda p: _set_l2(p, 0, 0, _eof(p) + 64 * CS), [A_OFF]),
    ("l2-entry-at-eof", lambda p: _set_l2(p, 0, 0, _eof(p)), [A_OFF]),
    ("l2-entry-into-header", lambda p: _set_l2(p, 0, 0, 0x200), [A_OFF]),
    ("l2-entry-into-l1", lambda p: _set_l2(p, 0, 0, 0x1000), [A_OFF]),
    ("l2-entry-into-l2-table", lambda p: _set_l2(p, 0, 0, _l1(p, 1)), [A_OFF]),
    ("l2-entry-unaligned", lambda p: _set_l2(p, 0, 0, _l2(p, 1, 256) + 100), [A_OFF]),
    # A compressed entry whose data runs past the end of the file.
    ("compressed-past-eof", lambda p: _set_l2(p, 0, 0, (1 << 63) | (100 << 51) | _eof(p)), [A_OFF]),
    # The last data cluster cut away; the L2 tables are intact.
    ("truncated-data", lambda p: os.truncate(p, _l1(p, 1) + CS), [B_OFF]),
]


@pytest.mark.parametrize(("damage", "bad"), [pytest.param(d, b, id=i) for i, d, b in EIO_CASES])
async def test_bad_l2_entries_fail_with_eio(
    tmp_path: Path, damage: Callable[[Path], None], bad: list[int]
) -> None:
    img = await _base(tmp_path / "c.qcow")
    damage(img)
    d = await open_qcow(img)
    try:
        for off in bad:
            for op in (
                d.pread(off, CS),
                d.pread(off + 100, 10),
                d.pwrite(off, b"x" * CS),  # never overwrites what the pointer hits
                d.extents(off, CS),
            ):
                with pytest.raises(OSError) as info:
                    await op
                assert info.value.errno == errno.EIO
        # The rest of the image is unharmed, and reads its own data.
        if A_OFF not in bad:
            assert bytes(await d.pread(A_OFF, CS)) == b"a" * CS
        if B_OFF not in bad:
            assert bytes(await d.pread(B_OFF, CS)) == b"b" * CS
        assert bytes(await d.pread(A_OFF + CS, CS)) == bytes(CS)
        assert bytes(await d.pread(6 * MiB, CS)) == bytes(CS)
        await d.pwrite(7 * MiB, b"c" * CS)
        assert bytes(await d.pread(7 * MiB, CS)) == b"c" * CS
    finally:
        await d.close()


async def test_pointer_past_the_end_stays_bad_after_the_file_grows(tmp_path: Path) -> None:
    """An L2 entry pointing past the end of the file, in a table first read only after
    other writes have grown the file over that offset: still EIO, never the new data
    written there for another cluster (and never overwriting it)."""
    img = await _base(tmp_path / "c.qcow")
    target = _eof(img) + 8 * CS
    _set_l2(img, 0, 0, target)
    d = await open_qcow(img)
    try:
        # Slot 1 only (its table was read at open for B): 16 new clusters at the end.
        for k in range(16):
            await d.pwrite(B_OFF + (k + 1) * CS, bytes([0x40 + k]) * CS)
        assert d._end > target  # the file now covers the bad pointer's offset
        for op in (d.pread(A_OFF, CS), d.pwrite(A_OFF, b"x" * CS), d.extents(A_OFF, CS)):
            with pytest.raises(OSError) as info:
                await op
            assert info.value.errno == errno.EIO
        for k in range(16):
            assert bytes(await d.pread(B_OFF + (k + 1) * CS, CS)) == bytes([0x40 + k]) * CS
        # After a flush the clean tables may be dropped and read again: still EIO.
        await d.flush()
        d._l2._max = 0
        d._l2.trim()
        assert not len(d._l2)
        with pytest.raises(OSError) as info:
            await d.pread(A_OFF, CS)
        assert info.value.errno == errno.EIO
        assert bytes(await d.pread(B_OFF + 9 * CS, CS)) == bytes([0x48]) * CS
    finally:
        await d.close()


async def test_optimised_image_truncated_falls_back_and_fails_requests(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An extent cut short: no fast path (it would read past the end), EIO at the end."""
    img = await _base(tmp_path / "o.qcow", optimise=True)
    os.truncate(img, _eof(img) - 2 * CS)
    d = await open_qcow(img)
    try:
        assert not d.fast_path and not d.splices  # splice writes go where the fast path says
        assert d.meta.cksum_ok  # the checksum is right; the layout is not
        assert "extents overlap or run past the end of the file; using the safe path" in caplog.text
        assert bytes(await d.pread(B_OFF, CS)) == b"b" * CS
        with pytest.raises(OSError) as info:
            await d.pread(4 * MiB - CS, CS)  # the last cluster of slot 1's extent
        assert info.value.errno == errno.EIO
    finally:
        await d.close()


async def test_forged_checksum_does_not_enable_a_bad_fast_path(tmp_path: Path) -> None:
    """L1 slot 1 pointed at slot 0's first data cluster, with a checksum to match: the
    extents overlap, so the fast path stays off, and neither slot serves the other's bytes:
    the cluster that is both data and table fails, the rest of slot 0 reads as before."""
    img = await _base(tmp_path / "o.qcow", optimise=True)
    _set_l1(img, 1, _l1(img, 0) + 4096, fix_cksum=True)
    d = await open_qcow(img)
    try:
        assert not d.fast_path and not d.splices
        # Slot 1's "L2 table" holds 'a' * 4096: no valid entry in it.
        for off in (A_OFF, 2 * MiB, B_OFF):
            with pytest.raises(OSError) as info:
                await d.pread(off, CS)
            assert info.value.errno == errno.EIO
        assert bytes(await d.pread(A_OFF + CS, CS)) == bytes(CS)
    finally:
        await d.close()


# Through the server, with a real client.

_CLIENT = r"""
import json, sys, nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except nbd.Error as e:
        out[name] = e.errno
attempt("read-bad", lambda: h.pread(4096, 0))
attempt("read-bad-part", lambda: h.pread(10, 100))
attempt("write-bad", lambda: h.pwrite(b"x" * 4096, 0))
attempt("status-bad", lambda: h.block_status(4096, 0, lambda *a: 0))
out["read-good"] = h.pread(4096, 3 << 20) == b"b" * 4096
h.pwrite(b"c" * 4096, 7 << 20)
h.flush()
out["read-written"] = h.pread(4096, 7 << 20) == b"c" * 4096
h.shutdown()
print(json.dumps(out))
"""


def test_eio_reaches_the_client_and_the_server_keeps_serving(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    need("nbdinfo")
    img = asyncio.run(_base(tmp_path / "c.qcow"))
    _set_l2(img, 0, 0, _eof(img) + 64 * CS)
    server = serve(str(img))
    got = nbdsh_script(_CLIENT, server.uri)
    eio = errno.errorcode[errno.EIO]  # libnbd names the errno
    assert got == {
        "read-bad": eio,
        "read-bad-part": eio,
        "write-bad": eio,
        "status-bad": eio,
        "read-good": True,
        "read-written": True,
    }
    # Still serving: a second connection (another real client) works.
    assert server.proc.poll() is None
    info = json.loads(
        subprocess.run(
            ["nbdinfo", "--json", server.uri], capture_output=True, text=True, check=True
        ).stdout
    )
    assert info["exports"][0]["export-size"] == SIZE
    assert "L2 table at" in server.stderr()  # the damage is logged


def test_serve_refuses_a_corrupt_image_naming_the_field(tmp_path: Path) -> None:
    img = asyncio.run(_base(tmp_path / "c.qcow"))
    _set_l1(img, 1, _eof(img) + CS)
    proc = subprocess.run(
        tapnbd_cmd("serve", str(img), "--port", "0"), capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1
    assert "L1 entry 1" in proc.stderr and "past the end of the file" in proc.stderr
    assert "Traceback" not in proc.stderr


# The header parser, property-tested.


def _parse(data: bytes) -> tuple[QcowHeader, Geometry, XenExtension | None]:
    """What an open checks of the first 64 bytes, before any table is read."""
    h = QcowHeader.parse(data)
    check_version_and_crypt(h)
    return h, Geometry.from_header(h), XenExtension.parse(data)


_FIELDS = ">IIQIIQBB2sIQ"
_NAMES = [
    "magic",
    "version",
    "backing_file_offset",
    "backing_file_size",
    "mtime",
    "size",
    "cluster_bits",
    "l2_bits",
    "pad",
    "crypt_method",
    "l1_table_offset",
]
_ANY = {
    "magic": st.integers(0, (1 << 32) - 1),
    "version": st.integers(0, (1 << 32) - 1),
    "backing_file_offset": st.integers(0, (1 << 64) - 1),
    "backing_file_size": st.integers(0, (1 << 32) - 1),
    "mtime": st.integers(0, (1 << 32) - 1),
    "size": st.integers(0, (1 << 64) - 1),
    "cluster_bits": st.integers(0, 255),
    "l2_bits": st.integers(0, 255),
    "pad": st.binary(min_size=2, max_size=2),
    "crypt_method": st.integers(0, (1 << 32) - 1),
    "l1_table_offset": st.integers(0, (1 << 64) - 1),
}


@st.composite
def _headers(draw: st.DrawFn) -> bytes:
    """64 bytes: a valid header and extension, then up to two fields set to anything."""
    fields: dict[str, object] = {
        "magic": QCOW_MAGIC,
        "version": 1,
        "backing_file_offset": 0,
        "backing_file_size": 0,
        "mtime": draw(_ANY["mtime"]),
        "size": draw(st.integers(2, 64 * MiB)),
        "cluster_bits": draw(st.integers(9, 16)),
        "l2_bits": draw(st.integers(6, 13)),
        "pad": b"\0\0",
        "crypt_method": 0,
        "l1_table_offset": draw(st.sampled_from([48, 64, 512, 4096])),
    }
    for name in draw(st.lists(st.sampled_from(_NAMES), max_size=2)):
        fields[name] = draw(_ANY[name])
    ext = (
        XEN_MAGIC.to_bytes(4, "big")
        if draw(st.booleans())
        else draw(st.binary(min_size=4, max_size=4))
    )
    return (
        struct.pack(_FIELDS, *(fields[n] for n in _NAMES))
        + ext
        + draw(st.binary(min_size=12, max_size=12))
    )


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=64), _headers()))
def test_header_parser_property(data: bytes) -> None:
    try:
        h, g, ext = _parse(data)
    except ImageError as e:
        assert str(e)  # a message, and nothing but the format's errors
        event(f"refused: {str(e).split()[0]}")
        return
    event("parsed")
    # Parsed: the fields are the bytes (padding aside), and the geometry is consistent.
    assert len(data) >= HEADER_SIZE
    assert h.build() == data[:34] + b"\0\0" + data[36:HEADER_SIZE]
    assert h.version == 1 and h.crypt_method == 0
    assert 9 <= g.cluster_bits <= 16 and 6 <= g.l2_bits <= 13
    assert g.cluster_size == 1 << h.cluster_bits and g.size == h.size >= 2
    assert 0 < g.l1_size <= MAX_L1_SIZE
    assert (g.l1_size - 1) << g.shift < h.size <= g.l1_size << g.shift
    if data[EXT_OFFSET : EXT_OFFSET + 4] == XEN_MAGIC.to_bytes(4, "big"):
        assert ext is not None and ext.build() == data[EXT_OFFSET : EXT_OFFSET + 16]
    else:
        assert ext is None


#: Table entries: mostly 0 or an offset inside a small file, sometimes anything.
_ENTRIES = st.one_of(
    st.just(0),
    st.integers(0, 64).map(lambda k: k * 512),
    st.integers(0, (1 << 64) - 1),
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    head=_headers(),
    entries=st.lists(_ENTRIES, max_size=64),
    tail=st.binary(max_size=8192),
)
def test_open_of_arbitrary_headers_fails_cleanly(
    head: bytes, entries: list[int], tail: bytes
) -> None:
    """Whole opens (L1 read, tables checked, a read and block status): ImageError at open,
    EIO at a request, or success; nothing else."""
    l1_off = int.from_bytes(head[40:48], "big")
    data = head + bytes(max(0, min(l1_off, 4096) - len(head)))
    data += struct.pack(f">{len(entries)}Q", *entries) + tail
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "h.qcow")
        with open(path, "wb") as f:
            f.write(data)
        asyncio.run(_open_and_use(path))


async def _open_and_use(path: str) -> None:
    try:
        d = await open_image(path, fmt="qcow", read_only=True)
    except ImageError as e:
        assert str(e).startswith(path)
        event("refused at open")
        return
    event("opened")
    try:
        n = min(d.size(), 1 << 20)
        for coro in (d.pread(0, min(n, 65536)), d.extents(0, n)):
            try:
                await coro
                event("request answered")
            except OSError as e:
                assert e.errno == errno.EIO, e
                event("request failed with EIO")
    finally:
        await d.close()
