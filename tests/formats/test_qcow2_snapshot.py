"""``tapnbd serve --snapshot``: an internal qcow2 snapshot served read-only.

The snapshots are made by ``qemu-img snapshot -c`` and the image changed after them by
qemu-io; qemu is the referee: nbdcopy's copy through tapnbd must equal ``qemu-img convert
-l SNAPSHOT -O raw`` byte for byte, and block status must match qemu-nbd ``-l``'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from formats.qcow2 import open_qcow2_snapshot
from formats.qcow2.layout import Snapshot
from formats.qcow2.snapshot import SnapshotNotFoundError, find_snapshot
from tapnbd.errors import ImageError
from tests.control.tap import Tapnbd
from tests.formats.qcow2_util import SIZE, nbd_map, write_patterns
from tests.formats.qcow_util import need, qemu_img, run
from tests.helpers import Server, nbdsh_script, qemu_io, tapnbd_cmd

MiB = 1 << 20


def snapshot_image(tmp: Path, name: str = "snap.qcow2", *create: str) -> Path:
    """s1 over the patterns; then changes; s2; then more changes, a zero and a discard.

    The second snapshot is named "1", so the id "1" and the name "1" are different
    snapshots (ids are looked up first, as qemu does).
    """
    need("qemu-img", "qemu-io")
    img = tmp / name
    qemu_img("create", "-f", "qcow2", *create, img, str(SIZE))
    write_patterns(img)
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 0xf0 0 8k", "write -P 0xf1 10M 64k", "write -z 5M 64k", fmt="qcow2")
    qemu_img("snapshot", "-c", "1", img)
    qemu_io(img, "write -P 0xf2 1M 3M", "discard 9M 1M", "write -z 10M 32k", fmt="qcow2")
    return img


def qemu_snapshot_raw(img: Path, snapshot: str, out: Path) -> bytes:
    """What qemu reads at the snapshot (``-l`` takes an id or a name, id first)."""
    qemu_img("convert", "-l", snapshot, "-O", "raw", img, out)
    return out.read_bytes()


def copy_out(uri: str, out: Path) -> bytes:
    need("nbdcopy")
    run("nbdcopy", uri, out)
    return out.read_bytes()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def serve_fails(*args: str) -> str:
    """``tapnbd serve ARGS`` must exit 1 without serving; its error message.

    A URI line on stdout means it served: that fails at once, without waiting."""
    with subprocess.Popen(
        tapnbd_cmd("serve", *args, "--port", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        uri = proc.stdout.readline()  # a URI, or "" when it exits
        if uri:
            proc.kill()
        err = proc.stderr.read()
        code = proc.wait(60)
    assert not uri, f"served {uri.strip()}: {err}"
    assert code == 1, (code, err)
    return err


@contextmanager
def qemu_nbd(img: Path, snapshot: str, sock: Path) -> Iterator[str]:
    """qemu-nbd -l serving the snapshot; --fork returns once the socket listens."""
    need("qemu-nbd")
    pidfile = sock.with_suffix(".pid")
    run(
        "qemu-nbd", "--fork", "--persistent", "--read-only", "-f", "qcow2", "-l", snapshot,
        "--pid-file", pidfile, "-k", sock, img,
    )  # fmt: skip
    pid = int(pidfile.read_text())
    try:
        yield f"nbd+unix:///?socket={sock}"
    finally:
        os.kill(pid, signal.SIGTERM)


@pytest.mark.parametrize(
    ("key", "qemu_key"),
    [
        ("s1", "snapshot.name=s1"),
        ("1", "1"),
        ("2", "snapshot.id=2"),
        ("s1", "snapshot.id=1"),
        ("snapshot.name=1", "snapshot.name=1"),
        ("snapshot.id=1", "snapshot.id=1"),
        ("snapshot.id=2,snapshot.name=1", "snapshot.id=2,snapshot.name=1"),
    ],
    ids=["name", "id-before-name", "id", "name-is-id-1", "opt-name", "opt-id", "opt-both"],
)
def test_snapshot_reads_as_qemu_does(
    tmp_path: Path, serve: Callable[..., Server], key: str, qemu_key: str
) -> None:
    img = snapshot_image(tmp_path)
    expected = qemu_snapshot_raw(img, qemu_key, tmp_path / "qemu.raw")
    qemu_img("convert", "-O", "raw", img, tmp_path / "now.raw")
    assert expected != (tmp_path / "now.raw").read_bytes()  # the snapshot is not the image
    server = serve(str(img), "--snapshot", key, "--format", "qcow2")
    assert copy_out(server.uri, tmp_path / "nbd.raw") == expected


def test_block_status_matches_qemu_nbd(tmp_path: Path, serve: Callable[..., Server]) -> None:
    """The snapshot's tables, not the active ones, answer BLOCK_STATUS (zero clusters,
    unallocated ranges, data), as qemu-nbd -l answers it."""
    need("nbdinfo")
    img = snapshot_image(tmp_path)
    server = serve(str(img), "--snapshot", "s1")
    with qemu_nbd(img, "snapshot.name=s1", tmp_path / "q.sock") as theirs:
        assert copy_out(theirs, tmp_path / "q.raw") == copy_out(server.uri, tmp_path / "t.raw")
        assert nbd_map(server.uri) == nbd_map(theirs)
    # And they differ from the active image's map, so the test can tell the two apart.
    active = serve(str(img), "--read-only", "--name", "now")
    assert nbd_map(active.uri) != nbd_map(server.uri)


def test_read_only_export_refuses_writes_with_eperm(
    tmp_path: Path, serve: Callable[..., Server]
) -> None:
    """NBD_FLAG_READ_ONLY is set; writes, zeroes and trims sent anyway (libnbd's strict
    mode off) get EPERM from the server; the image file is left as it was."""
    img = snapshot_image(tmp_path)
    before = sha(img)
    server = serve(str(img), "--snapshot", "s1")
    got = nbdsh_script(
        """
import json, sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
out = {"ro": h.is_read_only()}
for op, call in (
    ("write", lambda: h.pwrite(b"x" * 4096, 0)),
    ("zero", lambda: h.zero(4096, 0)),
    ("trim", lambda: h.trim(4096, 0)),
):
    try:
        call()
        out[op] = "ok"
    except nbd.Error as e:
        # "command failed" is the server's reply; libnbd's own refusals say otherwise.
        out[op] = [e.errno, "command failed" in e.string]
out["read"] = h.pread(4, 0).hex()
print(json.dumps(out))
""",
        server.uri,
    )
    eperm = ["EPERM", True]
    assert got == {"ro": True, "write": eperm, "zero": eperm, "trim": eperm, "read": "abababab"}
    server.stop()
    assert sha(img) == before
    # Nothing was locked or dirtied: qemu opens the image for writing and finds it clean.
    qemu_img("check", img)


def test_snapshot_of_an_image_grown_after_it(tmp_path: Path, serve: Callable[..., Server]) -> None:
    """The image's size is served, as qemu does: the snapshot's shorter L1 table maps
    nothing past its end, which reads as zeros."""
    img = snapshot_image(tmp_path, "grow.qcow2", "-o", "cluster_size=4096")
    qemu_img("resize", img, str(SIZE + 64 * MiB))
    qemu_io(img, "write -P 0x5c 70M 1M", fmt="qcow2")
    expected = qemu_snapshot_raw(img, "s1", tmp_path / "qemu.raw")
    assert len(expected) == SIZE + 64 * MiB
    server = serve(str(img), "--snapshot", "s1")
    assert copy_out(server.uri, tmp_path / "nbd.raw") == expected


def test_snapshot_of_an_overlay_reads_through_its_backing_file(
    tmp_path: Path, serve: Callable[..., Server]
) -> None:
    need("qemu-img", "qemu-io")
    base = tmp_path / "base.raw"
    run("truncate", "-s", str(SIZE), base)
    qemu_io(base, "write -P 0x33 0 16M", fmt="raw")
    img = tmp_path / "over.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "raw", img)
    qemu_io(img, "write -P 0x44 1M 1M", fmt="qcow2")
    qemu_img("snapshot", "-c", "before", img)
    qemu_io(img, "write -P 0x55 0 4M", "write -z 8M 1M", fmt="qcow2")
    expected = qemu_snapshot_raw(img, "before", tmp_path / "qemu.raw")
    server = serve(str(img), "--snapshot", "before", "--format", "qcow2")
    assert copy_out(server.uri, tmp_path / "nbd.raw") == expected


def test_unknown_snapshot_names_it_and_lists_the_others(tmp_path: Path) -> None:
    img = snapshot_image(tmp_path)
    err = serve_fails(str(img), "--snapshot", "nope")
    assert "no snapshot with id or name 'nope'" in err, err
    assert "'s1' (id 1)" in err and "'1' (id 2)" in err, err
    plain = tmp_path / "plain.qcow2"
    qemu_img("create", "-f", "qcow2", plain, "1M")
    err = serve_fails(str(plain), "--snapshot", "s1")
    assert "no snapshot 's1': the image has no snapshots" in err, err


def _snap(id_str: str, name: str) -> Snapshot:
    return Snapshot(0x10000, 1, id_str, name, 0, 0, 0, 0)


def test_find_snapshot_spellings() -> None:
    """qemu-nbd's -l spellings: ID_OR_NAME (id first), snapshot.id=, snapshot.name=,
    both (both must match); anything else is refused."""
    a, b = _snap("1", "s1"), _snap("2", "1")
    snaps = [a, b]
    assert find_snapshot(snaps, "1", "img") is a
    assert find_snapshot(snaps, "s1", "img") is a
    assert find_snapshot(snaps, "snapshot.name=1", "img") is b
    assert find_snapshot(snaps, "snapshot.id=2,snapshot.name=1", "img") is b
    with pytest.raises(SnapshotNotFoundError, match="no snapshot with id or name"):
        find_snapshot(snaps, "snapshot.id=1,snapshot.name=1", "img")
    for bad in ("snapshot.id", "snapshot.size=1", "snapshot.id=1,snapshot.id=2"):
        with pytest.raises(ImageError, match=f"snapshot '{bad}': expected an id or a name"):
            find_snapshot(snaps, bad, "img")
    # Names and ids come from the image: escapes are quoted, long ones cut.
    hostile = [_snap("\x1b[2J", "\x1b]0;owned\x07" + "x" * 70000)]
    with pytest.raises(SnapshotNotFoundError) as err:
        find_snapshot(hostile, "x", "img")
    assert "\x1b" not in str(err.value) and len(str(err.value)) < 300, str(err.value)
    many = [_snap(str(i), f"n{i}") for i in range(1, 31)]
    with pytest.raises(SnapshotNotFoundError, match=r"'n20' \(id 20\) and 10 more$"):
        find_snapshot(many, "x", "img")


@pytest.mark.parametrize("fmt", ["raw", "qcow", "vpc", "ram"])
def test_snapshot_refused_on_other_formats(tmp_path: Path, fmt: str) -> None:
    need("qemu-img")
    if fmt == "ram":
        image, name = "ram:1M", "ram"
    else:
        path = tmp_path / f"disk.{fmt}"
        qemu_img("create", "-f", fmt, path, "1M")
        image, name = str(path), {"vpc": "vhd"}.get(fmt, fmt)
    err = serve_fails(image, "--snapshot", "s1")
    assert "--snapshot 's1'" in err and "only qcow2 images have" in err, err
    if fmt != "ram":
        assert f"a {name} image has no internal snapshots" in err, err


def test_snapshot_takes_one_image(tmp_path: Path) -> None:
    img = snapshot_image(tmp_path)
    err = serve_fails(str(img), "ram:1M", "--snapshot", "s1")
    assert "give exactly one image" in err, err


def _first_snapshot_entry(img: Path) -> int:
    """File offset of the first snapshot table entry."""
    with open(img, "rb") as f:
        f.seek(64)
        return int(struct.unpack(">Q", f.read(8))[0])


def _patch(img: Path, offset: int, fmt: str, value: int) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


@pytest.mark.parametrize(
    ("field_at", "fmt", "value", "message"),
    [
        (
            0,
            ">Q",
            1 << 40,
            r"snapshot 's1' \(id 1\): l1_table_offset 0x10000000000 .* past the end",
        ),
        (0, ">Q", 0x10200, r"snapshot 's1' \(id 1\): l1_table_offset 0x10200 is not aligned"),
        (0, ">Q", 0, r"snapshot 's1' \(id 1\): l1_table_offset 0x0 overlaps the header"),
        (8, ">I", 1 << 24, r"snapshot 's1' \(id 1\): l1_size 16777216 is too large"),
    ],
    ids=["l1-past-eof", "l1-unaligned", "l1-in-header", "l1-size-huge"],
)
def test_corrupt_snapshot_entry_is_refused_naming_the_field(
    tmp_path: Path, field_at: int, fmt: str, value: int, message: str
) -> None:
    import re

    img = snapshot_image(tmp_path)
    _patch(img, _first_snapshot_entry(img) + field_at, fmt, value)
    err = serve_fails(str(img), "--snapshot", "s1")
    assert re.search(message, err), err


def test_corrupt_snapshot_l1_entry_is_refused(tmp_path: Path) -> None:
    img = snapshot_image(tmp_path)
    entry = _first_snapshot_entry(img)
    with open(img, "rb") as f:
        f.seek(entry)
        l1_off = struct.unpack(">Q", f.read(8))[0]
    _patch(img, l1_off, ">Q", (1 << 63) | (1 << 44))  # an L2 table far past the end
    err = serve_fails(str(img), "--snapshot", "s1")
    assert "snapshot 's1' (id 1): L1 entry 0" in err and "past the end of the file" in err, err
    # The other snapshot and the active image still open.
    assert json.loads(run("qemu-img", "info", "--output=json", img))["format"] == "qcow2"


@pytest.fixture
def tap() -> Iterator[Tapnbd]:
    """A private daemon state directory (tests/control/tap.py), cleaned up after."""
    t = Tapnbd(Path(tempfile.mkdtemp(prefix="tnbd-", dir="/tmp")))
    try:
        yield t
    finally:
        t.cleanup()


def test_daemon_export_add_snapshot_survives_a_restart(tmp_path: Path, tap: Tapnbd) -> None:
    """``export add --snapshot``: read-only, listed with its snapshot, and restored with
    it after the daemon stops and comes back."""
    img = snapshot_image(tmp_path)
    expected = qemu_snapshot_raw(img, "s1", tmp_path / "qemu.raw")
    uris = tap.ok("export", "add", str(img), "--snapshot", "s1", "--format", "qcow2")
    uri = next(u for u in uris.split() if u.startswith("nbd+unix://"))
    assert copy_out(uri, tmp_path / "a.raw") == expected
    (listed,) = tap.list()["exports"]
    assert listed["snapshot"] == "s1" and listed["read_only"] and listed["format"] == "qcow2"
    other = tmp_path / "other.qcow2"  # one export per image: a copy
    shutil.copyfile(img, other)
    err = tap.fails("export", "add", str(other), "--snapshot", "x")
    assert "no snapshot with id or name 'x'" in err and "'s1' (id 1)" in err, err
    assert tap.run("daemon", "stop").returncode == 0
    again = tap.run("list", "--json")
    assert "restored export 'snap.qcow2'" in again.stderr, again.stderr
    (listed,) = json.loads(again.stdout)["exports"]
    assert listed["snapshot"] == "s1" and listed["read_only"]
    assert copy_out(uri, tmp_path / "b.raw") == expected


@pytest.mark.parametrize(
    "create",
    [("-o", "compat=0.10"), ("-o", "cluster_size=512"), ("-o", "refcount_bits=64")],
    ids=["v2", "cluster-512", "refcount-64"],
)
def test_snapshot_of_other_image_kinds(
    tmp_path: Path, serve: Callable[..., Server], create: tuple[str, ...]
) -> None:
    img = snapshot_image(tmp_path, "kind.qcow2", *create)
    for key in ("s1", "1"):
        server = serve(str(img), "--snapshot", key, "--name", key)
        expected = qemu_snapshot_raw(img, key, tmp_path / f"qemu-{key}.raw")
        assert copy_out(server.uri, tmp_path / f"nbd-{key}.raw") == expected


def test_snapshot_sharing_compressed_clusters(tmp_path: Path, serve: Callable[..., Server]) -> None:
    """A compressed image's snapshot, its clusters since rewritten in the active image."""
    src = snapshot_image(tmp_path, "src.qcow2")
    img = tmp_path / "z.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", src, img)  # the active image, compressed
    qemu_img("snapshot", "-c", "packed", img)
    qemu_io(img, "write -P 0x3c 0 2M", "write -z 9M 2M", fmt="qcow2")
    expected = qemu_snapshot_raw(img, "packed", tmp_path / "qemu.raw")
    server = serve(str(img), "--snapshot", "packed")
    assert copy_out(server.uri, tmp_path / "nbd.raw") == expected


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small image with one snapshot, 4 KiB clusters: its snapshot table and the
    snapshot's L1 and L2 tables lie within the first few dozen clusters."""
    need("qemu-img", "qemu-io")
    img = tmp_path_factory.mktemp("snapfuzz") / "pristine.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", img, "4M")
    qemu_io(img, "write -P 0x61 0 20k", "write -z 1M 8k", fmt="qcow2")
    qemu_img("snapshot", "-c", "s", img)
    qemu_io(img, "write -P 0x62 0 8k", "write -P 0x63 3M 4k", fmt="qcow2")
    return img


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(
    patches=st.lists(
        st.tuples(st.integers(0, 63), st.binary(min_size=1, max_size=8)), min_size=1, max_size=3
    ),
    l1_patch=st.none() | st.tuples(st.integers(0, 7), st.binary(min_size=1, max_size=8)),
)
async def test_fuzzed_snapshot_entries_fail_cleanly(
    pristine: Path,
    tmp_path: Path,
    patches: list[tuple[int, bytes]],
    l1_patch: tuple[int, bytes] | None,
) -> None:
    """Hostile bytes in the snapshot table entry (its fixed part, id and name) and in
    the snapshot's L1 table: opening at the snapshot fails with an ImageError, quickly,
    or works; reads and block status then succeed or fail with EIO."""
    img = tmp_path / "fuzz.qcow2"
    shutil.copy(pristine, img)
    entry = _first_snapshot_entry(img)
    with open(img, "rb") as f:
        f.seek(entry)
        l1_off = struct.unpack(">Q", f.read(8))[0]
    with open(img, "r+b") as f:
        for off, data in patches:
            f.seek(entry + off)
            f.write(data)
        if l1_patch is not None:
            f.seek(l1_off + l1_patch[0])
            f.write(l1_patch[1])
    t0 = time.monotonic()
    try:
        d = await open_qcow2_snapshot(str(img), "s")
    except ImageError as e:
        assert time.monotonic() - t0 < 5
        event(f"refused: {str(e).split(': ', 2)[-1][:20]}")
        return
    assert time.monotonic() - t0 < 5
    event("opened")
    try:
        assert not d.can_write()
        for off in range(0, d.size(), 1 << 20):
            with contextlib.suppress(OSError):
                await d.pread(off, 1 << 20)
        with contextlib.suppress(OSError):
            await d.extents(0, d.size())
    finally:
        await d.close()


def test_snapshot_of_a_dirty_image(tmp_path: Path, serve: Callable[..., Server]) -> None:
    """A VM died with lazy refcounts on (the dirty bit set, refcounts stale): its
    snapshots can still be served, read-only, without repairing the image."""
    img = snapshot_image(tmp_path, "dirty.qcow2", "-o", "lazy_refcounts=on")
    need("qemu-io")
    # qemu-io's abort leaves the image as a crash would: dirty.
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x9d 0 2M", "-c", "abort", str(img)],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode != 0
    info = json.loads(qemu_img("info", "--output=json", img))
    assert info["dirty-flag"] is True
    before = sha(img)
    expected = qemu_snapshot_raw(img, "s1", tmp_path / "qemu.raw")
    server = serve(str(img), "--snapshot", "s1")
    assert copy_out(server.uri, tmp_path / "nbd.raw") == expected
    server.stop()
    assert sha(img) == before  # not repaired, not cleaned: untouched


@pytest.mark.parametrize("key", ["s1", "1", "snapshot.id=1", "snapshot.name=1"])
def test_convert_copies_a_snapshot_as_qemu_img_convert_l(tmp_path: Path, key: str) -> None:
    """convert -l: the snapshot's contents, as qemu-img convert -l copies them (the id
    "1" and the name "1" are different snapshots here, ids first)."""
    img = snapshot_image(tmp_path)
    ours = tmp_path / "ours.raw"
    run(*tapnbd_cmd("convert", "-q", "-O", "raw", "-l", key, str(img), str(ours)))
    assert ours.read_bytes() == qemu_snapshot_raw(img, key, tmp_path / "ref.raw")


def test_convert_of_an_unknown_snapshot_names_the_ones_there_are(tmp_path: Path) -> None:
    img = snapshot_image(tmp_path)
    out = tmp_path / "o.raw"
    cmd = tapnbd_cmd("convert", "-q", "-O", "raw", "-l", "nope", str(img), str(out))
    said = run(*cmd, check=False)
    assert "no snapshot with id or name 'nope'" in said and "'s1' (id 1)" in said, said
    assert not out.exists()
