"""``tapnbd snapshot -l|-c|-d|-a``: internal qcow2 snapshots taken, deleted and applied,
with ``qemu-img snapshot`` as the referee.

Each change is made on one copy by tapnbd and on another by qemu-img; then qemu-img
compares the active images and every snapshot's contents (``convert -l``), and ``check``
must be clean. A seeded run mixes both tools on one image against a model, and the
power-loss model cuts each change at every point it may be cut.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path

import pytest

from formats.qcow2 import snapshot_edit
from tests.formats.qcow_util import crash_states, need, patch, qemu_img
from tests.formats.qcow_util import tapnbd_out as tapnbd
from tests.formats.test_qcow_crafted import RSS_LIMIT_KIB, measured
from tests.helpers import qemu_io, run, start_server, tapnbd_cmd

MiB = 1 << 20
SIZE = 8 * MiB


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("qemu-img", "qemu-io")


def make(path: Path, *opts: str) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", *opts, path, str(SIZE))
    qemu_io(path, "write -P 1 0 1M", "write -P 2 3M 200k", "write -c -P 3 6M 64k", fmt="qcow2")
    return path


def names(img: Path) -> list[tuple[str, str]]:
    info = json.loads(qemu_img("info", "--output=json", "-f", "qcow2", img))
    return [(s["id"], s["name"]) for s in info.get("snapshots", [])]


def contents(img: Path, out: Path) -> dict[str, bytes]:
    """The active image's bytes and each snapshot's, read by qemu."""
    qemu_img("convert", "-f", "qcow2", "-O", "raw", img, out)
    got = {"": out.read_bytes()}
    for ident, _name in names(img):
        qemu_img("convert", "-f", "qcow2", "-l", f"snapshot.id={ident}", "-O", "raw", img, out)
        got[ident] = out.read_bytes()
    return got


def clean(img: Path) -> None:
    r = run(["qemu-img", "check", "-f", "qcow2", str(img)], check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    "opts", [(), ("-o", "compat=0.10"), ("-o", "cluster_size=4k,refcount_bits=8")]
)
def test_each_change_matches_qemu_img(tmp_path: Path, opts: tuple[str, ...]) -> None:
    ours, ref = make(tmp_path / "ours.qcow2", *opts), tmp_path / "ref.qcow2"
    shutil.copy(ours, ref)
    steps = [
        ("-c", "s1"),
        ("write", "write -P 4 512k 1M"),
        ("-c", "s2"),
        ("write", "write -z 0 64k"),
        ("-a", "s1"),
        ("write", "write -P 5 7M 64k"),
        ("-d", "s1"),
        ("-a", "2"),
        ("-d", "s2"),
    ]
    for what, arg in steps:
        if what == "write":
            for img in (ours, ref):
                qemu_io(img, arg, fmt="qcow2")
            continue
        tapnbd("snapshot", "-q", what, arg, ours)
        qemu_img("snapshot", what, arg, ref)
        assert names(ours) == names(ref), (what, arg)
        assert contents(ours, tmp_path / "a.raw") == contents(ref, tmp_path / "b.raw"), (what, arg)
        clean(ours)


def test_a_table_qemu_wrote_last_in_the_file_is_copied_whole(tmp_path: Path) -> None:
    """qemu-img snapshot -c writes its table at the end of the file without the last
    entry's padding (the file ends mid-cluster). Copied short, the entry shifted ours
    by its missing bytes: a seeded run (seed 810715744) found it."""
    img = make(tmp_path / "t.qcow2")
    qemu_img("snapshot", "-c", "s0", img)
    assert img.stat().st_size % 512, "the table no longer ends the file"
    # tapnbd check counted the padding too: "lies past the end of the file".
    assert run(tapnbd_cmd("check", str(img)), check=False).returncode == 0
    tapnbd("snapshot", "-c", "s1", img)
    clean(img)
    assert names(img) == [("1", "s0"), ("2", "s1")]


def test_list_prints_what_qemu_img_prints(tmp_path: Path) -> None:
    img = make(tmp_path / "l.qcow2")
    tapnbd("snapshot", "-c", "ours", img)
    qemu_img("snapshot", "-c", "theirs", img)
    assert tapnbd("snapshot", "-l", img) == qemu_img("snapshot", "-l", img)


def test_list_shows_ids_and_names(tmp_path: Path) -> None:
    img = make(tmp_path / "i.qcow2")
    tapnbd("snapshot", "-c", "first", img)
    tapnbd("snapshot", "-c", "second\x1b[31m", img)  # a hostile name is shown escaped
    out = tapnbd("snapshot", "-l", img)
    assert "first" in out and "\x1b" not in out and "\\x1b" in out, out
    assert [i for i, _ in names(img)] == ["1", "2"]


def test_a_seeded_mix_of_both_tools_follows_the_model(tmp_path: Path, seed: int) -> None:
    """Random writes, takes, deletes and applies, each done by tapnbd or by qemu-img at
    random on one image: what every snapshot and the active image read matches a model
    of bytes, and check stays clean."""
    rng = random.Random(seed)
    print(f"seed {seed}")
    img = make(tmp_path / "m.qcow2")
    raw = tmp_path / "r.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", img, raw)
    model: dict[str, bytes] = {"": raw.read_bytes()}  # name -> bytes ("" is active)
    made = 0
    for step in range(14):
        op = rng.choice(["write", "write", "create", "create", "delete", "apply"])
        tool = rng.choice(["tapnbd", "qemu"])
        snaps = [n for n in model if n]
        if op == "write":
            off, n, p = (
                rng.randrange(0, SIZE - 256 * 1024, 512),
                rng.choice([512, 4096, 65536, 200_000]),
                rng.randrange(1, 250),
            )
            qemu_io(img, f"write -P {p} {off} {n}", fmt="qcow2")
            b = bytearray(model[""])
            b[off : off + n] = bytes([p]) * n
            model[""] = bytes(b)
            continue
        if op != "create" and not snaps:
            continue
        name = f"s{made}" if op == "create" else rng.choice(snaps)
        made += op == "create"
        flag = {"create": "-c", "delete": "-d", "apply": "-a"}[op]
        print(f"step {step}: {tool} snapshot {flag} {name}")
        if tool == "tapnbd":
            tapnbd("snapshot", "-q", flag, name, img)
        else:
            qemu_img("snapshot", flag, name, img)
        if op == "create":
            model[name] = model[""]
        elif op == "delete":
            del model[name]
        else:
            model[""] = model[name]
        clean(img)
    by_name = {name: ident for ident, name in names(img)}
    assert sorted(by_name) == sorted(n for n in model if n)
    qemu_img("convert", "-f", "qcow2", "-O", "raw", img, raw)
    assert raw.read_bytes() == model[""]
    for name, ident in by_name.items():
        qemu_img("convert", "-f", "qcow2", "-l", f"snapshot.id={ident}", "-O", "raw", img, raw)
        assert raw.read_bytes() == model[name], name


def test_a_server_writes_after_our_snapshot_and_the_snapshot_stays(tmp_path: Path) -> None:
    """The active tables are fresh copies whose shared clusters lack COPIED: tapnbd's
    own writes through NBD copy them, and the snapshot reads as it was."""
    img = make(tmp_path / "w.qcow2")
    before = contents(img, tmp_path / "x.raw")[""]
    tapnbd("snapshot", "-c", "keep", img)
    server = start_server([str(img), "--format", "qcow2"], tmp_path / "serve.log")
    try:
        qemu_io(server.uris[0], "write -P 9 0 4M", "write -z 3M 64k", fmt="raw")
    finally:
        server.stop()
    clean(img)
    got = contents(img, tmp_path / "y.raw")
    assert got["1"] == before
    assert got[""][:4096] == b"\x09" * 4096


@pytest.mark.parametrize(
    ("prep", "args", "says"),
    [
        ("", ("-c", "s1"), "already exists"),
        ("", ("-d", "nope"), "no snapshot with id or name 'nope'"),
        ("", ("-a", "nope"), "no snapshot with id or name 'nope'"),
        ("", ("-l", "-c", "x"), "exactly one of"),
        ("", (), "exactly one of"),
        ("refcount", ("-c", "s2"), "cannot count"),
        ("dirty", ("-c", "s2"), "check --repair"),
    ],
)
def test_refused_by_name_and_left_as_it_was(
    tmp_path: Path, prep: str, args: tuple[str, ...], says: str
) -> None:
    opts = ("-o", "refcount_bits=1") if prep == "refcount" else ()
    img = make(tmp_path / "r.qcow2", *opts)
    if prep != "refcount":
        qemu_img("snapshot", "-c", "s1", img)
    if prep == "dirty":
        patch(img, 72, (1).to_bytes(8, "big"))
    before = img.read_bytes()
    out = tapnbd("snapshot", *args, img, check=False)
    assert says in out, out
    assert img.read_bytes() == before


def test_an_image_in_use_or_of_another_format_is_refused(tmp_path: Path) -> None:
    img = make(tmp_path / "u.qcow2")
    before = img.read_bytes()
    server = start_server([str(img), "--format", "qcow2"], tmp_path / "serve.log")
    try:
        out = tapnbd("snapshot", "-c", "s1", img, check=False)
    finally:
        server.stop()
    assert "in use" in out, out
    assert img.read_bytes() == before
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(MiB))
    assert "only qcow2 images have internal snapshots" in tapnbd("snapshot", "-l", raw, check=False)


def test_a_hostile_snapshot_table_is_refused_by_name(tmp_path: Path) -> None:
    img = make(tmp_path / "h.qcow2")
    qemu_img("snapshot", "-c", "s1", img)
    snapshots_offset = int.from_bytes(img.read_bytes()[64:72], "big")
    patch(img, snapshots_offset + 8, (0xFFFFFFF0).to_bytes(4, "big"))  # l1_size
    before = img.read_bytes()
    out = tapnbd("snapshot", "-c", "s2", img, check=False)
    assert "l1_size" in out and "s1" in out, out
    assert img.read_bytes() == before


def _many_snapshots_of_one_l1(img: Path, n: int) -> Path:
    """The attacker's image: ``n`` snapshot entries that all name one 32 MiB L1 table (the
    per-table limit), sparse, so the file is a few hundred KiB on disk."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"])
    cs, entries = 65536, (32 << 20) // 8
    with open(img, "r+b") as f:
        table = -(-os.fstat(f.fileno()).st_size // cs) * cs
        l1 = table + 64 * cs
        out = b""
        for i in range(n):
            ident, name = str(i + 1).encode(), f"s{i}".encode()
            extra = struct.pack(">QQ", 0, 64 << 20)  # vm_state_size_large, disk_size
            e = struct.pack(">QIHHIIQII", l1, entries, len(ident), len(name), 0, 0, 0, 0, 16)
            e += extra + ident + name
            out += e + bytes(-len(e) % 8)
        f.seek(table)
        f.write(out)
        f.truncate(l1 + entries * 8)
        f.seek(60)
        f.write(struct.pack(">IQ", n, table))  # nb_snapshots, snapshots_offset
    return img


def test_many_snapshots_of_one_huge_l1_stay_in_bounded_memory(tmp_path: Path) -> None:
    """check reads one snapshot's L1 table at a time (it held all of them: 32 MiB
    each), and a rewrite, which holds the kept ones, refuses more than its limit by
    name, before it reads any."""
    img = _many_snapshots_of_one_l1(tmp_path / "h.qcow2", 10)
    code, out, err, peak = measured("check", "--output=json", str(img))
    assert code in (0, 2, 3), err
    assert json.loads(out)["corruptions"] > 0, out  # the shared table: overlaps
    assert peak < RSS_LIMIT_KIB, f"check peaked at {peak} KiB"
    before = img.read_bytes()
    code, out, err, peak = measured("snapshot", "-c", "new", str(img))
    assert code == 1 and "nb_snapshots" in err and "l1_size" in err, err
    assert peak < RSS_LIMIT_KIB, f"snapshot -c peaked at {peak} KiB"
    assert img.read_bytes() == before


def test_compressed_data_said_to_lie_in_the_header_is_refused(tmp_path: Path) -> None:
    """A compressed L2 entry pointing into the header cluster would have the new
    refcounts count the header twice: refused by name, untouched."""
    img = make(tmp_path / "c.qcow2")  # a compressed cluster at 6M, in the first L2 table
    data = img.read_bytes()
    l1_offset = int.from_bytes(data[40:48], "big")
    l2 = int.from_bytes(data[l1_offset : l1_offset + 8], "big") & ((1 << 56) - 512)
    at = l2 + 8 * (6 * MiB // 65536)
    entry = int.from_bytes(data[at : at + 8], "big")
    assert entry >> 62 & 1, hex(entry)  # compressed
    c_off_mask = (1 << (62 - 8)) - 1
    patch(img, at, ((entry & ~c_off_mask) | 0x100).to_bytes(8, "big"))
    before = img.read_bytes()
    out = tapnbd("snapshot", "-c", "s", img, check=False)
    assert "compressed data in the header cluster" in out, out
    assert img.read_bytes() == before


@pytest.mark.parametrize("op", ["create", "delete", "apply"])
def test_a_power_cut_leaves_the_old_state_or_the_new(tmp_path: Path, seed: int, op: str) -> None:
    """Every crash state the power-loss model allows (durable writes, any subset of the
    rest, torn at sectors) checks clean and reads as the state before the change or the
    one after it, snapshots and active image alike."""
    print(f"seed {seed}")
    img = make(tmp_path / "p.qcow2")
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 7 0 2M", fmt="qcow2")
    old = contents(img, tmp_path / "o.raw")
    start = img.read_bytes()
    after = tmp_path / "after.qcow2"
    shutil.copy(img, after)
    qemu_img(
        "snapshot",
        {"create": "-c", "delete": "-d", "apply": "-a"}[op],
        "s1" if op != "create" else "s2",
        after,
    )
    new = contents(after, tmp_path / "n.raw")

    async def change() -> str:
        if op == "create":
            return await snapshot_edit.create_snapshot(str(img), "s2")
        if op == "delete":
            return await snapshot_edit.delete_snapshot(str(img), "s1")
        return await snapshot_edit.apply_snapshot(str(img), "s1")

    state = tmp_path / "state.qcow2"
    seen: set[str] = set()
    for where in crash_states(start, change, state, seed, 24):
        r = run(["qemu-img", "check", "-f", "qcow2", str(state)], check=False)
        assert r.returncode == 0, f"{where}: {r.stdout}{r.stderr}"
        got = contents(state, tmp_path / "s.raw")
        assert got in (old, new), where
        seen.add("old" if got == old else "new")
    assert seen, "no crash state was tried"
