"""``tapnbd map``, ``compare``, ``measure``, ``info --backing-chain``/``--output`` and the
foreign-format refusals, each against qemu-img's own command on the same image.

The images are made by qemu-img and qemu-io (so the layouts are qemu's, not ours), and
both tools run in the images' directory with relative names, so even the file column
of the human map can be compared byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.formats.qcow2_util import set_reserved_bit
from tests.formats.qcow_util import need
from tests.helpers import Server, nbdsh_script, run, tapnbd_cmd

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("qemu-img", "qemu-io")


def sh(cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(list(cmd), check=check, cwd=cwd)


def tap(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(tapnbd_cmd(*args), check=check, cwd=cwd)


def tap_here(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The same command in this process (typer's runner): no start-up per call, for the
    tests that run dozens of them."""
    from typer.testing import CliRunner

    from tapnbd.cli import app, load_commands

    load_commands()
    with contextlib.chdir(cwd):
        res = CliRunner().invoke(app, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return subprocess.CompletedProcess(list(args), res.exit_code, res.stdout, res.stderr)


def qio(cwd: Path, fmt: str, image: str, *commands: str) -> None:
    args = ["qemu-io", "-f", fmt, "-t", "unsafe"]
    for c in commands:
        args += ["-c", c]
    sh(cwd, *args, image)


def random_writes(
    rng: random.Random, size: int, count: int, unit: int, avoid: tuple[int, int] = (0, 0)
) -> list[str]:
    """qemu-io writes of whole ``unit``s at seeded places, with seeded patterns, none
    touching [avoid)."""
    out: list[str] = []
    while len(out) < count:
        n = rng.randint(1, 3) * unit
        off = rng.randrange(0, size - n, unit)
        if off < avoid[1] and avoid[0] < off + n:
            continue
        out.append(f"write -P {rng.randint(1, 255)} {off} {n}")
    return out


def qcow2_chain(tmp_path: Path, rng: random.Random) -> None:
    """base.qcow2 (4 MiB) <- top.qcow2 (6 MiB: it runs past its backing file's end),
    with data, zero clusters (v3 and over a backing file), discards and a compressed
    cluster; and top.raw, the same disk as raw."""
    sh(tmp_path, "qemu-img", "create", "-f", "qcow2", "base.qcow2", "4M")
    qio(tmp_path, "qcow2", "base.qcow2", *random_writes(rng, 4 * MiB, 6, 64 << 10))
    qio(tmp_path, "qcow2", "base.qcow2", "write -z 128k 64k")
    sh(
        tmp_path,
        "qemu-img",
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "6M",
    )
    qio(
        tmp_path,
        "qcow2",
        "top.qcow2",
        # qemu writes a compressed cluster only where nothing is allocated yet.
        *random_writes(rng, 6 * MiB, 5, 64 << 10, avoid=(3 * MiB, 3 * MiB + (64 << 10))),
        "write -z 0 64k",
        "write -z 5M 128k",
        "discard 1M 64k",
    )
    qio(tmp_path, "qcow2", "top.qcow2", "write -c -P 7 3M 64k")
    sh(tmp_path, "qemu-img", "convert", "-O", "raw", "top.qcow2", "top.raw")


# map


def test_map_qcow2_chain_matches_qemu_img(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    qcow2_chain(tmp_path, rng)
    for image in ("top.qcow2", "base.qcow2"):
        want = sh(tmp_path, "qemu-img", "map", "--output=json", image).stdout
        got = tap(tmp_path, "map", "-f", "qcow2", "--output=json", image).stdout
        assert got == want, f"{image}:\n{got}\nqemu-img:\n{want}"
        # Equal as data too (the text check is the stricter; this names the entry).
        assert json.loads(got) == json.loads(want)
    # The human table; --json is the alias of --output=json.
    want = sh(tmp_path, "qemu-img", "map", "base.qcow2").stdout
    assert tap(tmp_path, "map", "-f", "qcow2", "base.qcow2").stdout == want
    alias = tap(tmp_path, "map", "-f", "qcow2", "--json", "base.qcow2").stdout
    assert json.loads(alias) == json.loads(
        sh(tmp_path, "qemu-img", "map", "--output=json", "base.qcow2").stdout
    )
    # A compressed cluster has no place in a file: both refuse the human table.
    q = sh(tmp_path, "qemu-img", "map", "top.qcow2", check=False)
    t = tap(tmp_path, "map", "-f", "qcow2", "top.qcow2", check=False)
    assert q.returncode == t.returncode == 1
    assert "compressed clusters" in q.stderr and "compressed clusters" in t.stderr
    # A window of the disk.
    want = sh(
        tmp_path, "qemu-img", "map", "--output=json", "--start-offset", "1M", "--max-length", "2M",
        "top.qcow2",
    ).stdout  # fmt: skip
    got = tap(
        tmp_path, "map", "-f", "qcow2", "--output=json", "--start-offset", "1M", "--max-length",
        "2M", "top.qcow2",
    ).stdout  # fmt: skip
    assert got == want


def test_map_preallocated_metadata_asks_the_file(tmp_path: Path) -> None:
    # Allocated clusters over a hole of the file are data that reads as zeros.
    sh(
        tmp_path,
        "qemu-img",
        "create",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        "p.qcow2",
        "1M",
    )
    qio(tmp_path, "qcow2", "p.qcow2", "write -P 1 64k 4k")
    want = sh(tmp_path, "qemu-img", "map", "--output=json", "p.qcow2").stdout
    assert tap(tmp_path, "map", "-f", "qcow2", "--output=json", "p.qcow2").stdout == want
    assert '"zero": true, "data": true' in want


@pytest.mark.parametrize("fmt", ["qcow2", "qcow"])
def test_map_does_not_ask_the_file_of_an_image_not_preallocated(tmp_path: Path, fmt: str) -> None:
    """qemu asks the file whether a data cluster reads as zeros only for a qcow2 image
    that looks metadata-preallocated (BDRV_BLOCK_RECURSE): a hole punched in the host
    range of an ordinary image's cluster is still data that is not zeros to it. (A
    small image always looks preallocated: its metadata clusters are mostly holes, and
    qemu's threshold is at least the file's real clusters + 2; 4 MiB of data is not.)"""
    sh(tmp_path, "qemu-img", "create", "-f", fmt, "p.img", "8M")
    qio(tmp_path, fmt, "p.img", "write -P 1 64k 4M")
    host = next(e["offset"] for e in json.loads(
        sh(tmp_path, "qemu-img", "map", "-f", fmt, "--output=json", "p.img").stdout
    ) if e["data"])  # fmt: skip
    sh(tmp_path, "fallocate", "-p", "-o", str(host + 8192), "-l", "8192", "p.img")
    want = sh(tmp_path, "qemu-img", "map", "-f", fmt, "--output=json", "p.img").stdout
    got = tap(tmp_path, "map", "-f", fmt, "--output=json", "p.img").stdout
    assert got == want, f"{got}\nqemu-img:\n{want}"
    assert '"zero": true, "data": true' not in want


@pytest.mark.parametrize("fmt", ["qcow2", "qcow"])
def test_map_over_a_raw_backing_file(tmp_path: Path, seed: int, fmt: str) -> None:
    """A raw layer allocates everything: its holes are present zeros, with offsets."""
    rng = random.Random(seed)
    sh(tmp_path, "qemu-img", "create", "-f", "raw", "b.raw", "4M")
    qio(tmp_path, "raw", "b.raw", *random_writes(rng, 4 * MiB, 3, 64 << 10))
    sh(tmp_path, "qemu-img", "create", "-f", fmt, "-b", "b.raw", "-F", "raw", "o.img", "6M")
    qio(tmp_path, fmt, "o.img", *random_writes(rng, 6 * MiB, 3, 64 << 10))
    for output in ("json", "human"):
        want = sh(tmp_path, "qemu-img", "map", "-f", fmt, f"--output={output}", "o.img").stdout
        got = tap(tmp_path, "map", "-f", fmt, "-F", "raw", f"--output={output}", "o.img").stdout
        assert got == want, f"{got}\nqemu-img:\n{want}"


@pytest.mark.parametrize(
    ("fmt", "ours", "unit"), [("raw", "raw", 4096), ("qcow", "qcow", 4096), ("vpc", "vhd", 512)]
)
def test_map_other_formats_match_qemu_img(
    tmp_path: Path, seed: int, fmt: str, ours: str, unit: int
) -> None:
    rng = random.Random(seed)
    image = f"d.{ours}"
    sh(tmp_path, "qemu-img", "create", "-f", fmt, image, "9M")
    qio(tmp_path, fmt, image, *random_writes(rng, 8 * MiB, 6, unit * 16))
    want = sh(tmp_path, "qemu-img", "map", "-f", fmt, "--output=json", image).stdout
    got = tap(tmp_path, "map", "-f", ours, "--output=json", image).stdout
    assert got == want, f"{got}\nqemu-img:\n{want}"
    want = sh(tmp_path, "qemu-img", "map", "-f", fmt, image).stdout
    assert tap(tmp_path, "map", "-f", ours, image).stdout == want


def test_map_of_an_nbd_export(tmp_path: Path, seed: int, serve: Callable[..., Server]) -> None:
    rng = random.Random(seed)
    sh(tmp_path, "qemu-img", "create", "-f", "raw", "d.raw", "8M")
    qio(tmp_path, "raw", "d.raw", *random_writes(rng, 8 * MiB, 5, 64 << 10))
    server: Server = serve(str(tmp_path / "d.raw"), "--read-only")
    uri = server.uri
    want = json.loads(sh(tmp_path, "qemu-img", "map", "--output=json", uri).stdout)
    got = json.loads(tap(tmp_path, "map", "--output=json", uri).stdout)
    assert got == want
    # The data runs of the table, and the export's name in the file column.
    rows = tap(tmp_path, "map", uri).stdout.splitlines()
    qrows = sh(tmp_path, "qemu-img", "map", uri).stdout.splitlines()
    assert [r.split()[:3] for r in rows] == [r.split()[:3] for r in qrows]
    assert all(r.split()[3].startswith("nbd://") for r in rows[1:])
    # measure reads the export's block status too.
    want_m = sh(tmp_path, "qemu-img", "measure", "--output=json", "-O", "qcow2", uri).stdout
    assert tap(tmp_path, "measure", "--output=json", "-O", "qcow2", uri).stdout == want_m


# compare


def compare_both(cwd: Path, *args: str) -> tuple[int, str]:
    q = sh(cwd, "qemu-img", "compare", *args, check=False)
    t = tap_here(cwd, "compare", *args)
    assert (t.returncode, t.stdout) == (q.returncode, q.stdout), (
        f"compare {' '.join(args)}: tapnbd {t.returncode} {t.stdout!r} {t.stderr!r}, "
        f"qemu-img {q.returncode} {q.stdout!r}"
    )
    return t.returncode, t.stdout


def test_compare_matches_qemu_img(tmp_path: Path, seed: int, serve: Callable[..., Server]) -> None:
    rng = random.Random(seed)
    qcow2_chain(tmp_path, rng)
    assert compare_both(tmp_path, "-f", "qcow2", "-F", "raw", "top.qcow2", "top.raw")[0] == 0
    assert compare_both(tmp_path, "-f", "qcow2", "-F", "qcow2", "base.qcow2", "top.qcow2")[0] == 1
    # One sector changed, at a seeded place.
    sh(tmp_path, "cp", "--sparse=always", "top.raw", "other.raw")
    sector = rng.randrange(6 * MiB // 512)
    qio(tmp_path, "raw", "other.raw", f"write -P 0xee {sector * 512} 512")
    code, out = compare_both(tmp_path, "-f", "raw", "-F", "raw", "top.raw", "other.raw")
    assert (code, out) == (1, f"Content mismatch at offset {sector * 512}!\n")
    compare_both(tmp_path, "-f", "qcow2", "-F", "raw", "top.qcow2", "other.raw")
    # Strict mode: allocation must match too.
    compare_both(tmp_path, "-s", "-f", "qcow2", "-F", "raw", "top.qcow2", "top.raw")
    # Sizes: a longer image whose tail reads as zeros is the same disk (with a warning).
    sh(tmp_path, "qemu-img", "create", "-f", "raw", "long.raw", "8M")
    sh(tmp_path, "qemu-img", "convert", "-n", "-O", "raw", "top.raw", "long.raw")
    code, out = compare_both(tmp_path, "top.raw", "long.raw")
    assert code == 0 and "Warning: Image size mismatch!" in out
    compare_both(tmp_path, "long.raw", "top.raw")
    compare_both(tmp_path, "-s", "top.raw", "long.raw")
    qio(tmp_path, "raw", "long.raw", "write -P 3 7M 4k")
    assert compare_both(tmp_path, "top.raw", "long.raw")[0] == 1
    # QCOW v1 and VHD as qemu makes them.
    for fmt, name in (("qcow", "d.qcow"), ("vpc", "d.vhd")):
        sh(tmp_path, "qemu-img", "convert", "-O", fmt, "top.raw", name)
        sh(tmp_path, "qemu-img", "convert", "-f", fmt, "-O", "raw", name, f"{name}.raw")
        compare_both(tmp_path, "-F", "raw", name, f"{name}.raw")
        compare_both(tmp_path, "-f", fmt, "-F", "raw", name, "other.raw")  # vpc: VHD's name
    # An NBD export against a file.
    server: Server = serve(str(tmp_path / "top.raw"), "--read-only")
    assert compare_both(tmp_path, "-F", "raw", server.uri, "top.raw")[0] == 0
    assert compare_both(tmp_path, "-F", "raw", server.uri, "other.raw")[0] == 1
    # An error is exit code 2.
    missing = tap(tmp_path, "compare", "top.raw", "nope.raw", check=False)
    assert missing.returncode == 2 and "nope.raw" in missing.stderr


# measure


def test_measure_matches_qemu_img(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    qcow2_chain(tmp_path, rng)
    cases = [
        ["-O", "qcow2", "--size", "1G"],
        ["-O", "qcow2", "--size", "100M", "-o", "cluster_size=4k,refcount_bits=64"],
        ["-O", "qcow2", "--size", "3T", "-o", "cluster_size=2M"],
        # Small clusters, wide refcounts: the refcount blocks need refcounts themselves.
        ["-O", "qcow2", "--size", "100M", "-o", "cluster_size=512,refcount_bits=64"],
        ["-O", "raw", "--size", "1000"],
        ["-O", "qcow2", "-f", "qcow2", "top.qcow2"],
        ["-O", "qcow2", "-o", "compat=0.10", "-f", "qcow2", "top.qcow2"],
        ["-O", "qcow2", "-o", "preallocation=full", "top.raw"],
        ["-O", "qcow2", "-o", "cluster_size=512", "top.raw"],
        ["-O", "raw", "-f", "qcow2", "top.qcow2"],
    ]
    for case in cases:
        for output in ("human", "json"):
            want = sh(tmp_path, "qemu-img", "measure", f"--output={output}", *case).stdout
            got = tap_here(tmp_path, "measure", f"--output={output}", *case).stdout
            assert got == want, f"measure {case} --output={output}:\n{got}\nqemu-img:\n{want}"
    both = tap(tmp_path, "measure", "-O", "qcow2", "--size", "1M", "top.raw", check=False)
    assert both.returncode == 1 and "not both" in both.stderr


def test_measure_of_a_snapshot_matches_qemu_img(tmp_path: Path) -> None:
    """-l measures what the internal snapshot holds, not the image as it is now."""
    img = "snap.qcow2"
    sh(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
    sh(tmp_path, "qemu-io", "-c", "write -P 1 0 8M", img)
    sh(tmp_path, "qemu-img", "snapshot", "-c", "s1", img)
    sh(tmp_path, "qemu-io", "-c", "write -P 2 16M 20M", img)
    for snap in ("s1", "snapshot.name=s1", "1"):
        case = ["-O", "qcow2", "-l", snap, img]
        want = sh(tmp_path, "qemu-img", "measure", "--output=json", *case).stdout
        got = tap_here(tmp_path, "measure", "--output=json", *case).stdout
        assert got == want, (snap, got, want)
    now = tap_here(tmp_path, "measure", "--output=json", "-O", "qcow2", img).stdout
    assert json.loads(now)["required"] > json.loads(got)["required"]
    missing = tap(tmp_path, "measure", "-O", "qcow2", "-l", "nope", img, check=False)
    assert missing.returncode != 0 and "nope" in missing.stderr


@pytest.mark.parametrize("fmt", ["qcow", "vhd"])
def test_measure_is_enough_for_qcow_and_vhd(tmp_path: Path, seed: int, fmt: str) -> None:
    """No qemu-img measure for these: fill images and check the files fit the figures."""
    rng = random.Random(seed)
    size = 9 * MiB
    sparse = tmp_path / "sparse.raw"
    with open(sparse, "wb") as f:
        f.truncate(size)
        for _ in range(5):
            off = rng.randrange(0, size - 200_000, 512)
            f.seek(off)
            f.write(rng.randbytes(rng.randint(1, 200_000)))
    full = tmp_path / "full.raw"
    full.write_bytes(rng.randbytes(size))
    empty = json.loads(tap(tmp_path, "measure", "--output=json", "-O", fmt, "--size", "9M").stdout)
    for src in (sparse, full):
        m = json.loads(tap(tmp_path, "measure", "--output=json", "-O", fmt, str(src)).stdout)
        assert m["fully-allocated"] == empty["fully-allocated"]
        dst = tmp_path / f"{src.stem}.{fmt}"
        tap(tmp_path, "convert", "-q", "-O", fmt, str(src), str(dst))
        used = os.stat(dst).st_size
        print(f"{fmt} from {src.name}: file {used}, required {m['required']}")
        assert used <= m["required"] <= m["fully-allocated"]
        # And the copy is the disk (qemu reads it back).
        qfmt = "vpc" if fmt == "vhd" else fmt
        sh(tmp_path, "qemu-img", "compare", "-f", qfmt, "-F", "raw", str(dst), str(src))
    # A fully written disk needs the fully allocated size: not much less either.
    full_used = os.stat(tmp_path / f"full.{fmt}").st_size
    assert full_used <= empty["fully-allocated"] < full_used + 2 * MiB
    assert empty["required"] < 64 << 10
    if fmt == "vhd":  # a fixed VHD is its disk and a footer, from the start
        fixed = json.loads(
            tap(tmp_path, "measure", "--output=json", "-O", "vpc", "-o", "subformat=fixed",
                "--size", "9M").stdout
        )  # fmt: skip
        tap(tmp_path, "create", "-f", "vhd", "--subformat", "fixed", "-s", "9M", "fixed.vhd")
        used = os.stat(tmp_path / "fixed.vhd").st_size
        assert used == fixed["required"] == fixed["fully-allocated"]


# info


def test_info_json_has_qemu_img_keys_and_chain(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    qcow2_chain(tmp_path, rng)
    # Mark the top image dirty (incompatible feature bit 0), as a crash with lazy
    # refcounts leaves it: dirty-flag must say so.
    with open(tmp_path / "top.qcow2", "r+b") as f:
        f.seek(72)
        f.write((1).to_bytes(8, "big"))
    want = json.loads(
        sh(tmp_path, "qemu-img", "info", "--output=json", "--backing-chain", "top.qcow2").stdout
    )
    text = tap(
        tmp_path, "info", "-f", "qcow2", "--output=json", "--backing-chain", "top.qcow2"
    ).stdout
    got = json.loads(text)
    assert isinstance(got, list) and len(got) == len(want) == 2
    for ours, theirs in zip(got, want, strict=True):
        assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
        assert set(ours["format-specific"]["data"]) == set(theirs["format-specific"]["data"])
        for key in set(theirs) - {"actual-size"}:
            assert ours[key] == theirs[key], key
    assert got[0]["dirty-flag"] is True
    assert "True" not in text and "False" not in text and "None" not in text
    # Without --backing-chain: one object, --json its alias; the human form says false.
    one = json.loads(tap(tmp_path, "info", "-f", "qcow2", "--json", "base.qcow2").stdout)
    assert one == got[1]
    human = tap(tmp_path, "info", "-f", "qcow2", "--backing-chain", "top.qcow2").stdout
    assert "lazy refcounts: false" in human and "image: base.qcow2" in human
    bad = tap(tmp_path, "info", "--output=xml", "base.qcow2", check=False)
    assert bad.returncode != 0 and "human or json" in bad.stderr
    # check speaks the same --output.
    checked = json.loads(tap(tmp_path, "check", "--output=json", "base.qcow2").stdout)
    qchecked = json.loads(sh(tmp_path, "qemu-img", "check", "--output=json", "base.qcow2").stdout)
    for key in ("image-end-offset", "check-errors", "allocated-clusters", "filename", "format"):
        assert checked[key] == qchecked[key], key


# foreign formats


FOREIGN = [
    ("vmdk", []),
    ("vmdk", ["-o", "subformat=monolithicFlat"]),  # the text descriptor
    ("vhdx", []),
    ("vdi", []),
    ("qed", []),
]


@pytest.mark.parametrize(("fmt", "opts"), FOREIGN, ids=["vmdk", "vmdk-flat", "vhdx", "vdi", "qed"])
def test_foreign_formats_are_refused_with_the_converter(
    tmp_path: Path, fmt: str, opts: list[str]
) -> None:
    sh(tmp_path, "qemu-img", "create", "-f", fmt, *opts, f"x.{fmt}", "64M")
    hint = f"qemu-img convert -f {fmt} -O qcow2"
    commands = [["info", f"x.{fmt}"], ["check", f"x.{fmt}"], ["serve", f"x.{fmt}", "--port", "0"]]
    if fmt == "vmdk" and not opts:  # the same refusal, through the other openers
        commands += [["convert", "-q", f"x.{fmt}", "out.qcow"], ["map", f"x.{fmt}"]]
    for args in commands:
        proc = tap(tmp_path, *args, check=False)
        assert proc.returncode != 0 and hint in proc.stderr, (args, proc.stderr)
        assert not proc.stdout.startswith("nbd://"), "served"
    assert not (tmp_path / "out.qcow").exists() or os.stat(tmp_path / "out.qcow").st_size == 0
    # The admin may still say raw: the file's bytes, as they are.
    raw = json.loads(tap(tmp_path, "info", "-f", "raw", "--output=json", f"x.{fmt}").stdout)
    assert raw["format"] == "raw" and raw["virtual-size"] == os.stat(tmp_path / f"x.{fmt}").st_size


GUARD_SCRIPT = r"""
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
heads = {
    "vmdk": b"KDMV",
    "vmdk-text": b"# Disk DescriptorFile\n",
    "vhdx": b"vhdxfile",
    "qed": b"QED\0",
    "vdi": b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(64, b"\0")
    + (0xBEDA107F).to_bytes(4, "little"),
    "harmless": b"just a disk",
}
out = {}
for name, head in heads.items():
    try:
        h.pwrite(head.ljust(512, b"\0"), 0)
        out[name] = "ok"
    except nbd.Error as e:
        out[name] = e.errno
h.shutdown()
print(json.dumps(out))
"""


def test_guard_refuses_foreign_magics_on_a_probed_raw_disk(
    tmp_path: Path, serve: Callable[..., Server]
) -> None:
    """A guest cannot turn its probed raw disk into a VMDK (or the others) for the next
    probe; with --format raw the admin knows, and the writes go through."""

    disk = tmp_path / "guest.img"
    with open(disk, "wb") as f:
        f.truncate(MiB)
    server: Server = serve(str(disk))
    res = nbdsh_script(GUARD_SCRIPT, server.uri)
    assert res == {
        "vmdk": "EPERM",
        "vmdk-text": "EPERM",
        "vhdx": "EPERM",
        "qed": "EPERM",
        "vdi": "EPERM",
        "harmless": "ok",
    }
    server.stop()
    trusted: Server = serve(str(disk), "--format", "raw")
    res = nbdsh_script(GUARD_SCRIPT, trusted.uri)
    assert isinstance(res, dict) and set(res.values()) == {"ok"}


def test_map_asks_a_raw_file_for_its_extents_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file with many extents is walked in one pass, not one pass per run."""
    import asyncio

    from formats import open_image
    from formats.imagemap import image_map
    from tapnbd.driver import Extent

    path = tmp_path / "many.raw"
    fd = os.open(path, os.O_CREAT | os.O_RDWR)
    try:
        os.ftruncate(fd, 500 * 8192)
        for i in range(500):
            os.pwrite(fd, b"x" * 4096, i * 8192)
    finally:
        os.close(fd)

    async def walk() -> tuple[int, int]:
        driver = await open_image(str(path), fmt="raw", read_only=True)
        calls = 0
        extents = driver.extents

        async def counted(offset: int, length: int) -> list[Extent]:
            nonlocal calls
            calls += 1
            return await extents(offset, length)

        monkeypatch.setattr(driver, "extents", counted)
        try:
            return len(await image_map(driver, str(path))), calls
        finally:
            await driver.close()

    entries, calls = asyncio.run(walk())
    assert entries == 1000 and calls == 1


def test_map_and_compare_of_a_corrupt_qcow2_fail_cleanly(tmp_path: Path) -> None:
    """A hostile L2 entry (reserved bits set) is a one-line error naming the table."""
    sh(tmp_path, "qemu-img", "create", "-f", "qcow2", "bad.qcow2", "1M")
    qio(tmp_path, "qcow2", "bad.qcow2", "write -P 1 0 64k")
    set_reserved_bit(tmp_path / "bad.qcow2")
    sh(tmp_path, "qemu-img", "create", "-f", "raw", "zero.raw", "1M")
    for args, code in (
        (["map", "-f", "qcow2", "bad.qcow2"], 1),
        (["compare", "-f", "qcow2", "bad.qcow2", "zero.raw"], 2),
    ):
        proc = tap(tmp_path, *args, check=False)
        assert proc.returncode == code, (args, proc.returncode, proc.stderr)
        assert "L2 table" in proc.stderr and "Traceback" not in proc.stderr


def test_check_counts_zero_clusters_that_keep_their_cluster(tmp_path: Path) -> None:
    """qemu-img check counts a zero cluster still holding its cluster as allocated."""
    sh(tmp_path, "qemu-img", "create", "-f", "qcow2", "z.qcow2", "1M")
    qio(tmp_path, "qcow2", "z.qcow2", "write -P 1 0 128k", "write -z 0 64k")
    want = json.loads(sh(tmp_path, "qemu-img", "check", "--output=json", "z.qcow2").stdout)
    got = json.loads(tap(tmp_path, "check", "--output=json", "z.qcow2").stdout)
    assert got["allocated-clusters"] == want["allocated-clusters"] == 2
