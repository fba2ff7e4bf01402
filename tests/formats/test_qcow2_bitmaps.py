"""Persistent dirty bitmaps in qcow2: counted by ``check``, shown by ``info``, changed by
``tapnbd bitmap``, kept by ``snapshot``, with qemu as the referee.

A bitmap's contents are read by qemu: ``qemu-nbd -B NAME`` exports it as the
``qemu:dirty-bitmap:NAME`` context and libnbd's ``nbdinfo --map`` lists its extents.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import struct
from pathlib import Path

import pytest

from formats.qcow2 import bitmap_edit
from formats.qcow2.bitmap_edit import Op, merge_bits
from tests.formats.qcow_util import crash_states, need, patch, qemu_img
from tests.formats.qcow_util import tapnbd_out as tapnbd
from tests.helpers import nbdsh_script, qemu_io, run, start_server, tapnbd_cmd

MiB = 1 << 20
SIZE = 8 * MiB


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")


def make(path: Path, *opts: str) -> Path:
    """An image with data, a bitmap b0 that saw two writes and a disabled one, b1."""
    qemu_img("create", "-q", "-f", "qcow2", *opts, path, str(SIZE))
    qemu_io(path, "write -P 1 0 1M", fmt="qcow2")
    qemu_img("bitmap", "--add", path, "b0")
    qemu_img("bitmap", "--add", "-g", "4096", "--disable", path, "b1")
    qemu_io(path, "write -P 2 3M 200k", "write -P 3 7M 1k", fmt="qcow2")
    return path


def info(img: Path) -> dict[str, object]:
    out = json.loads(qemu_img("info", "--output=json", "-f", "qcow2", img))
    assert isinstance(out, dict)
    return out


def dirty(img: Path, name: str) -> list[tuple[int, int, str]]:
    """The extents of bitmap ``name`` as qemu exports them."""
    out = run(
        ["nbdinfo", f"--map=qemu:dirty-bitmap:{name}", "--", "[", "qemu-nbd", "-r", "-f", "qcow2",
         "-B", name, str(img), "]"],
    ).stdout  # fmt: skip
    return [(int(a), int(b), d) for a, b, _n, d in (line.split() for line in out.splitlines())]


def bitmaps(img: Path) -> dict[str, tuple[list[str], int, list[tuple[int, int, str]] | None]]:
    """Each bitmap's flags, granularity and (unless in use) contents, read by qemu."""
    data = info(img)["format-specific"]["data"]  # type: ignore[index]
    out = {}
    for b in data.get("bitmaps", []):
        usable = "in-use" not in b["flags"]
        out[b["name"]] = (b["flags"], b["granularity"], dirty(img, b["name"]) if usable else None)
    return out


def clean(img: Path) -> None:
    r = run(["qemu-img", "check", "-f", "qcow2", str(img)], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors" in tapnbd("check", img)


def test_check_counts_the_bitmaps_and_repair_leaves_them(tmp_path: Path) -> None:
    """Their directory, tables and clusters of bits are references: a check that missed
    them would call them leaks, and a repair would free clusters qemu still uses."""
    img = make(tmp_path / "c.qcow2")
    ours = json.loads(tapnbd("check", "--output=json", img))
    theirs = json.loads(qemu_img("check", "--output=json", img))
    assert ours["leaks"] == theirs.get("leaks", 0) == 0
    assert ours["image-end-offset"] == theirs["image-end-offset"]
    before = img.read_bytes()
    tapnbd("check", "-r", "all", img)
    assert img.read_bytes() == before
    # With the autoclear bit clear the extension is stale, and its clusters leak.
    patch(img, 88, bytes(8))
    r = run(tapnbd_cmd("check", "--output=json", str(img)), check=False)
    q = run(["qemu-img", "check", "--output=json", str(img)], check=False)
    assert r.returncode == q.returncode == 3
    leaks = json.loads(r.stdout)["leaks"]
    assert leaks == json.loads(q.stdout)["leaks"] >= 3  # directory, two tables, ...


def test_info_shows_the_bitmaps_as_qemu_img_does(tmp_path: Path) -> None:
    img = make(tmp_path / "i.qcow2")
    _set_flags(img, 0, 3)  # in use and auto: a writer crashed
    for fmt in ("human", "json"):
        ours = tapnbd("info", f"--output={fmt}", img)
        theirs = qemu_img("info", f"--output={fmt}", img)
        if fmt == "json":
            ours, theirs = (json.loads(t)["format-specific"] for t in (ours, theirs))
            assert ours == theirs
        else:
            tail = theirs[theirs.index("Format specific") :]
            assert tail in ours, ours
    assert "in-use" in tapnbd("info", img)


# Each case: the operations, as qemu-img bitmap's arguments after the image and name.
CASES = {
    "add": ("bn", ["--add"]),
    "add-granular-disabled": ("bn", ["--add", "-g", "512", "--disable"]),
    "add-then-merge": ("bn", ["--add", "-g", "1M", "--merge", "b0"]),
    "clear": ("b0", ["--clear"]),
    "disable": ("b0", ["--disable"]),
    "enable": ("b1", ["--enable"]),
    "merge-coarser-into-finer": ("b1", ["--merge", "b0"]),
    "remove": ("b0", ["--remove"]),
    "remove-then-add": ("b1", ["--remove", "--add", "-g", "64k"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_operation_matches_qemu_img(tmp_path: Path, case: str) -> None:
    name, args = CASES[case]
    ours = make(tmp_path / "ours.qcow2")
    ref = tmp_path / "ref.qcow2"
    shutil.copy(ours, ref)
    data = ours.read_bytes()
    qemu_img("bitmap", *args, ref, name)
    tapnbd("bitmap", *args, ours, name)
    assert bitmaps(ours) == bitmaps(ref)
    clean(ours)
    got = tmp_path / "got.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", ours, got)
    assert got.read_bytes()[:MiB] == b"\1" * MiB  # the guest's data are untouched
    assert ours.read_bytes() != data
    # qemu goes on writing to it, and the enabled bitmaps record that.
    qemu_io(ours, "write -P 9 5M 4k", fmt="qcow2")
    qemu_io(ref, "write -P 9 5M 4k", fmt="qcow2")
    assert bitmaps(ours) == bitmaps(ref)
    clean(ours)


def test_removing_the_last_bitmap_removes_the_extension(tmp_path: Path) -> None:
    img = make(tmp_path / "r.qcow2")
    tapnbd("bitmap", "--remove", img, "b0")
    tapnbd("bitmap", "--remove", img, "b1")
    assert "bitmaps" not in info(img)["format-specific"]["data"]  # type: ignore[index]
    assert int.from_bytes(img.read_bytes()[88:96], "big") == 0  # autoclear: no bitmaps
    clean(img)


def test_merge_from_another_image(tmp_path: Path) -> None:
    ours, other = make(tmp_path / "ours.qcow2"), tmp_path / "other.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", other, str(SIZE))
    qemu_img("bitmap", "--add", "-g", "512", other, "x")
    qemu_io(other, "write 6M 512", "write 511 2", fmt="qcow2")
    ref = tmp_path / "ref.qcow2"
    shutil.copy(ours, ref)
    qemu_img("bitmap", "--merge", "x", "-b", other, "-F", "qcow2", ref, "b0")
    tapnbd("bitmap", "--merge", "x", "-b", other, "-F", "qcow2", ours, "b0")
    assert bitmaps(ours) == bitmaps(ref)
    clean(ours)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--add", "b0"], "already exists"),
        (["--remove", "nope"], "no bitmap named 'nope'"),
        (["--add", "-g", "1000", "bn"], "power of two"),
        (["--add", "-g", "256", "bn"], "power of two"),
        (["--merge", "nope", "b0"], "no bitmap named 'nope'"),
        (["-g", "4096", "--clear", "b0"], "only for --add"),
        (["b0"], "at least one of"),
    ],
)
def test_refused_by_name_and_left_as_it_was(tmp_path: Path, args: list[str], says: str) -> None:
    img = make(tmp_path / "f.qcow2")
    before = img.read_bytes()
    out = tapnbd("bitmap", *args[:-1], img, args[-1], check=False)
    assert says in out, out
    assert img.read_bytes() == before


def test_a_bitmap_left_in_use_may_only_be_removed(tmp_path: Path) -> None:
    img = make(tmp_path / "u.qcow2")
    _set_flags(img, 0, 3)
    before = img.read_bytes()
    for op in ("--clear", "--enable", "--disable"):
        assert "inconsistent" in tapnbd("bitmap", op, img, "b0", check=False)
        assert img.read_bytes() == before
    tapnbd("bitmap", "--remove", img, "b0")
    assert list(bitmaps(img)) == ["b1"]
    clean(img)


def test_a_version_2_image_has_no_bitmaps(tmp_path: Path) -> None:
    img = tmp_path / "v2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", img, "1M")
    before = img.read_bytes()
    assert "version 3" in tapnbd("bitmap", "--add", img, "b0", check=False)
    assert img.read_bytes() == before


def _directory(img: Path) -> tuple[int, int]:
    """(offset, size) of the bitmap directory, from the extension qemu wrote."""
    data = img.read_bytes()[:65536]
    pos = struct.unpack(">I", data[100:104])[0]
    while True:
        t, n = struct.unpack(">II", data[pos : pos + 8])
        assert t, "no bitmaps extension"
        if t == 0x23852875:
            _nb, _r, size, off = struct.unpack(">IIQQ", data[pos + 8 : pos + 32])
            return off, size
        pos += 8 + n + (-n % 8)


def _set_flags(img: Path, index: int, flags: int) -> None:
    off, _size = _directory(img)
    data = img.read_bytes()
    pos = off
    for _ in range(index):
        nsize, extra = struct.unpack(">HI", data[pos + 18 : pos + 24])
        pos += -(-(24 + nsize + extra) // 8) * 8
    patch(img, pos + 12, flags.to_bytes(4, "big"))


@pytest.mark.parametrize(
    ("where", "value", "says"),
    [
        ("ext+0", (0).to_bytes(4, "big"), "nb_bitmaps 0"),
        ("ext+4", (1).to_bytes(4, "big"), "reserved field"),
        ("ext+8", (1 << 40).to_bytes(8, "big"), "bitmap_directory_size"),
        ("ext+16", (12345).to_bytes(8, "big"), "bitmap_directory_offset"),
        ("dir+0", (4096 + 8).to_bytes(8, "big"), "bitmap_table_offset"),
        ("dir+8", (7).to_bytes(4, "big"), "bitmap_table_size 7"),
        ("dir+12", (0x10).to_bytes(4, "big"), "reserved bits"),
        ("dir+16", b"\2", "type 2"),
        ("dir+17", b"\x08", "granularity_bits 8"),
        ("dir+18", (0).to_bytes(2, "big"), "name_size 0"),
        ("dir+20", (8).to_bytes(4, "big"), "extra_data_size 8"),
        ("table", (1 << 60).to_bytes(8, "big"), "table entry 0"),
    ],
)
def test_a_hostile_bitmap_header_is_refused_by_name(
    tmp_path: Path, where: str, value: bytes, says: str
) -> None:
    img = make(tmp_path / "h.qcow2")
    off, _size = _directory(img)
    data = img.read_bytes()
    if where.startswith("ext"):
        pos = data.index(struct.pack(">II", 0x23852875, 24)) + 8 + int(where[4:])
    elif where.startswith("dir"):
        pos = off + int(where[4:])
    else:
        pos = struct.unpack(">Q", data[off : off + 8])[0]
    patch(img, pos, value)
    out = tapnbd("info", img, check=False) + tapnbd("check", img, check=False)
    assert says in out, out


@pytest.mark.parametrize("op", ["create", "delete"])
def test_snapshots_keep_the_bitmaps(tmp_path: Path, op: str) -> None:
    ours = make(tmp_path / "ours.qcow2")
    qemu_img("snapshot", "-c", "s1", ours)
    ref = tmp_path / "ref.qcow2"
    shutil.copy(ours, ref)
    flag, key = ("-c", "s2") if op == "create" else ("-d", "s1")
    qemu_img("snapshot", flag, key, ref)
    tapnbd("snapshot", flag, key, ours)
    assert bitmaps(ours) == bitmaps(ref)
    clean(ours)


def test_applying_a_snapshot_needs_every_bitmap_disabled(tmp_path: Path) -> None:
    """As qemu-img: an enabled bitmap would not see the image change under it."""
    img = make(tmp_path / "a.qcow2")
    qemu_img("snapshot", "-c", "s1", img)
    before = img.read_bytes()
    assert "enabled dirty bitmaps" in tapnbd("snapshot", "-a", "s1", img, check=False)
    assert img.read_bytes() == before
    tapnbd("bitmap", "--disable", img, "b0")
    kept = bitmaps(img)
    tapnbd("snapshot", "-a", "s1", img)
    assert bitmaps(img) == kept
    clean(img)


@pytest.mark.parametrize("case", ["add-then-merge", "remove", "clear"])
def test_a_power_cut_leaves_the_old_bitmaps_or_the_new(
    tmp_path: Path, seed: int, case: str
) -> None:
    """Every crash state the power-loss model allows checks clean and has the bitmaps
    before the change or after it, contents and all."""
    print(f"seed {seed}")
    name, args = CASES[case]
    img = make(tmp_path / "p.qcow2")
    start = img.read_bytes()
    old = bitmaps(img)
    after = tmp_path / "after.qcow2"
    shutil.copy(img, after)
    qemu_img("bitmap", *args, after, name)
    new = bitmaps(after)
    ops = {
        "add-then-merge": [Op("add"), Op("merge", "b0")],
        "remove": [Op("remove")],
        "clear": [Op("clear")],
    }[case]
    granularity = MiB if case == "add-then-merge" else None

    async def change() -> None:
        await bitmap_edit.edit_bitmap(str(img), name, ops, granularity=granularity)

    state = tmp_path / "state.qcow2"
    seen: set[str] = set()
    for where in crash_states(start, change, state, seed, 16):
        if not seen:
            assert bitmaps(img) == new  # the change itself, done
        r = run(["qemu-img", "check", "-f", "qcow2", str(state)], check=False)
        assert r.returncode == 0, f"{where}: {r.stdout}{r.stderr}"
        got = bitmaps(state)
        assert got in (old, new), where
        seen.add("old" if got == old else "new")
    assert seen == {"old", "new"}, seen


def test_merge_bits_against_a_model(seed: int) -> None:
    """Every granule of the target that a set source bit's bytes touch is set, and no
    other, for granularities finer, equal and coarser."""
    print(f"seed {seed}")
    rng = random.Random(seed)
    for _ in range(60):
        size = rng.randrange(1, 1 << 16)
        tb, sb = rng.randrange(9, 14), rng.randrange(9, 14)
        tn, sn = -(-size >> tb), -(-size >> sb)
        target = bytearray(rng.randbytes(-(-tn // 8)))
        source = bytearray(rng.randbytes(-(-sn // 8)))
        for a in (target, source):  # bits past the disk are unused: keep them clear
            n = tn if a is target else sn
            for g in range(n, len(a) * 8):
                a[g >> 3] &= ~(1 << (g & 7))
        want = bytearray(target)
        for g in range(sn):
            if source[g >> 3] >> (g & 7) & 1:
                lo, hi = g << sb, min((g + 1) << sb, size)
                for t in range(lo >> tb, ((hi - 1) >> tb) + 1):
                    want[t >> 3] |= 1 << (t & 7)
        merge_bits(target, tb, bytes(source), sb, size)
        assert target == want, (size, tb, sb)


# A writer keeps them up to date: tapnbd serve, written to through qemu-io over NBD,
# against qemu-io writing to a copy of the image directly.
GUEST_OPS = ("write -P 5 6M 4k", "write -z 1M 64k", "discard 128k 64k", "write 8388096 512")


def test_a_server_keeps_the_enabled_bitmaps_up_to_date(tmp_path: Path) -> None:
    ours = make(tmp_path / "ours.qcow2")
    ref = tmp_path / "ref.qcow2"
    shutil.copy(ours, ref)
    qemu_io(ref, *GUEST_OPS, fmt="qcow2")
    server = start_server([str(ours), "--format", "qcow2", "-B", "b0"], tmp_path / "s.log")
    try:
        # In use while the server has it: after a crash its bits mean nothing.
        shown = qemu_img("info", "-U", "--output=json", ours)
        assert '"in-use"' in shown, shown
        qemu_io(server.uri, *GUEST_OPS)
        live = _map(server.uri, "b0")
    finally:
        assert server.stop() == 0, server.stderr()
    assert bitmaps(ours) == bitmaps(ref)
    assert live == dirty(ref, "b0")  # what the server said while it ran
    clean(ours)


def test_a_crash_leaves_the_bitmap_in_use_and_the_image_clean(tmp_path: Path) -> None:
    img = make(tmp_path / "k.qcow2")
    server = start_server([str(img), "--format", "qcow2"], tmp_path / "s.log")
    try:
        qemu_io(server.uri, *GUEST_OPS)
    finally:
        server.stop(signal.SIGKILL)
    got = bitmaps(img)
    assert got["b0"][0] == ["in-use", "auto"] and got["b0"][2] is None
    assert got["b1"][0] == []  # disabled: not written, still valid
    r = run(["qemu-img", "check", "-f", "qcow2", str(img)], check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def _map(uri: str, name: str) -> list[tuple[int, int, str]]:
    out = run(["nbdinfo", f"--map=qemu:dirty-bitmap:{name}", uri]).stdout
    return [(int(a), int(b), d) for a, b, _n, d in (line.split() for line in out.splitlines())]


def test_block_status_answers_every_selected_context(tmp_path: Path) -> None:
    """base:allocation and two bitmaps in one BLOCK_STATUS: one chunk each, as libnbd
    sees them, with REQ_ONE too."""
    img = make(tmp_path / "m.qcow2")
    want0, want1 = dirty(img, "b0"), dirty(img, "b1")
    server = start_server(
        [str(img), "--format", "qcow2", "-r", "-B", "b0", "-B", "b1"], tmp_path / "s.log"
    )
    try:
        script = f"""
import json
import nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:b0")
h.add_meta_context("qemu:dirty-bitmap:b1")
h.connect_uri({server.uri!r})
got = {{}}
def cb(ctx, off, entries, err):
    got.setdefault(ctx, []).append(list(entries))
    return 0
h.block_status({SIZE}, 0, cb)
h.block_status({SIZE}, 0, cb, nbd.CMD_FLAG_REQ_ONE)
print(json.dumps(got))
h.shutdown()
"""
        got = nbdsh_script(script)
    finally:
        server.stop()
    assert isinstance(got, dict) and sorted(got) == [
        "base:allocation",
        "qemu:dirty-bitmap:b0",
        "qemu:dirty-bitmap:b1",
    ]
    for ctx, want in (("qemu:dirty-bitmap:b0", want0), ("qemu:dirty-bitmap:b1", want1)):
        full, one = got[ctx]
        pairs = [(full[i], full[i + 1]) for i in range(0, len(full), 2)]
        assert pairs == [(n, 1 if d == "dirty" else 0) for _a, n, d in want]
        assert one == [want[0][1], 1 if want[0][2] == "dirty" else 0]


def test_list_meta_context_lists_the_bitmaps_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    img = make(tmp_path / "l.qcow2")
    server = start_server([str(img), "--format", "qcow2", "-r", "-B", "b1"], tmp_path / "s.log")
    try:
        listed = run(["nbdinfo", "--list", "--json", server.uri]).stdout
        contexts = json.loads(listed)["exports"][0]["contexts"]
        assert contexts == ["base:allocation", "qemu:dirty-bitmap:b1"]
    finally:
        server.stop()
    for args, says in (
        (["-B", "nope"], "no usable persistent bitmap named 'nope'"),
        (["-B", "b0", "--format", "raw"], "no usable persistent bitmap named 'b0'"),
    ):
        r = run(tapnbd_cmd("serve", str(img), "--port", "0", *args), check=False)
        assert r.returncode != 0 and says in r.stderr, r.stderr


def test_too_many_bits_to_keep_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile image could list many big enabled bitmaps: memory is bounded."""
    from formats.qcow2 import live_bitmaps, open_qcow2

    img = make(tmp_path / "big.qcow2")
    qemu_img("bitmap", "--add", "-g", "512", img, "fine")  # 2 KiB of bits for 8 MiB
    monkeypatch.setattr(live_bitmaps, "MAX_LIVE_BYTES", 2048)
    before = img.read_bytes()
    with pytest.raises(Exception, match="need more than 2048 bytes"):
        asyncio.run(open_qcow2(str(img), False))
    assert img.read_bytes() == before
    monkeypatch.setattr(live_bitmaps, "MAX_LIVE_BYTES", 4096)

    async def opened() -> None:
        d = await open_qcow2(str(img), False)
        await d.close()

    asyncio.run(opened())


def test_a_power_cut_while_a_writer_stores_its_bitmaps(tmp_path: Path, seed: int) -> None:
    """Every crash state of a session (open, writes, close) checks clean or with leaks
    only, and its enabled bitmap is still in use (meaningless), or holds exactly the
    bits the session left, or was cut before it was marked and before any guest write:
    never stale bits marked valid."""
    from formats.qcow2 import open_qcow2

    print(f"seed {seed}")
    img = make(tmp_path / "p.qcow2")
    qemu_img("bitmap", "--clear", img, "b0")  # no cluster of bits: storing allocates one
    start = img.read_bytes()
    ref = tmp_path / "ref.qcow2"
    shutil.copy(img, ref)
    qemu_io(ref, *GUEST_OPS, fmt="qcow2")
    final = bitmaps(ref)
    initial = bitmaps(img)
    guest0 = _guest(img, tmp_path / "g0.raw")

    async def session() -> None:
        d = await open_qcow2(str(img), False)
        await d.pwrite(6 * MiB, b"\5" * 4096)
        await d.zero(MiB, 64 << 10, may_trim=False, fua=False, fast=False)
        await d.trim(128 << 10, 64 << 10)
        await d.pwrite(8388096, bytes(512))
        await d.close()

    state = tmp_path / "state.qcow2"
    seen: set[str] = set()
    for where in crash_states(start, session, state, seed, 16):
        if not seen:
            assert bitmaps(img) == final
        r = run(["qemu-img", "check", "-f", "qcow2", str(state)], check=False)
        assert r.returncode in (0, 3), f"{where}: {r.stdout}{r.stderr}"
        got = bitmaps(state)
        flags, _gran, bits = got["b0"]
        if "in-use" in flags:
            seen.add("in use")
        elif bits == initial["b0"][2]:  # cut before it was marked: nothing written yet
            assert _guest(state, tmp_path / "g.raw") == guest0, where
            seen.add("before")
        else:
            assert bits == final["b0"][2], where
            seen.add("stored")
        assert got["b1"] == final["b1"], where
    assert {"in use", "stored"} <= seen, seen


def _guest(img: Path, out: Path) -> bytes:
    qemu_img("convert", "-f", "qcow2", "-O", "raw", img, out)
    return out.read_bytes()


@pytest.mark.parametrize("size", ["3G", "64M", "4M", "8392704"])
def test_resize_resizes_the_bitmaps_as_qemu_img_does(tmp_path: Path, size: str) -> None:
    """A bitmap whose table no longer covered the disk made the image one qemu would
    not open; now the bits past an old end start clean and past a new end go."""
    ours = make(tmp_path / "ours.qcow2")
    ref = tmp_path / "ref.qcow2"
    shutil.copy(ours, ref)
    qemu_img("resize", "--shrink", "-f", "qcow2", ref, size)
    tapnbd("resize", "--shrink", ours, size)
    assert bitmaps(ours) == bitmaps(ref)
    assert info(ours)["virtual-size"] == info(ref)["virtual-size"]
    clean(ours)


@pytest.mark.parametrize("opts", [(), ("-o", "cluster_size=4k"), ("-o", "compat=0.10")])
def test_measure_counts_the_bitmaps_as_qemu_img_does(tmp_path: Path, opts: tuple[str, ...]) -> None:
    """qemu-img measure's "bitmaps size": room to copy them, each counted whole."""
    img = make(tmp_path / "m.qcow2")
    qemu_img("bitmap", "--add", img, "a-longer-name-for-its-entry")
    for out in ("human", "json"):
        ours = tapnbd("measure", "-O", "qcow2", *opts, f"--output={out}", img)
        theirs = qemu_img("measure", "-O", "qcow2", *opts, f"--output={out}", img)
        assert (json.loads(ours) if out == "json" else ours) == (
            json.loads(theirs) if out == "json" else theirs
        )


def test_convert_bitmaps_copies_them_as_qemu_img_does(tmp_path: Path) -> None:
    src = make(tmp_path / "src.qcow2")
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    qemu_img("convert", "-O", "qcow2", "--bitmaps", src, ref)
    tapnbd("convert", "-q", "-O", "qcow2", "--bitmaps", src, ours)
    assert bitmaps(ours) == bitmaps(ref) == bitmaps(src)
    clean(ours)
    # A bitmap left in use is refused, or left out with --skip-broken-bitmaps.
    _set_flags(src, 0, 3)
    out = tapnbd(
        "convert", "-q", "-O", "qcow2", "--bitmaps", src, tmp_path / "x.qcow2", check=False
    )
    assert "--skip-broken-bitmaps" in out, out
    skipped = tmp_path / "s.qcow2"
    tapnbd("convert", "-q", "-O", "qcow2", "--bitmaps", "--skip-broken-bitmaps", src, skipped)
    assert list(bitmaps(skipped)) == ["b1"]
    clean(skipped)
    out = tapnbd("convert", "-q", "-O", "raw", "--bitmaps", src, tmp_path / "r.raw", check=False)
    assert "-O qcow2" in out, out
