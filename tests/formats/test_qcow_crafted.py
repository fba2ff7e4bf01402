"""Crafted images are cheap to refuse or to open (issue 11).

Each hostile image (tests/formats/crafted.py) goes through the real CLI in a child
process: ``tapnbd info``, ``tapnbd check``, and ``tapnbd serve`` asked by nbdinfo. The
assertion is the child's peak RSS (its own getrusage, or VmHWM from /proc while the
server runs) and the message; time limits only guard against hangs. On the code before
this change these images took 0.4-4.1 GiB and 8-37 s each (12 GiB for a chain of
three), or ended in a MemoryError.

Then the L1 fields are fuzzed in-process with hypothesis: an open succeeds with a table
that matches a naive reading of the file and holds no more memory than the table's data
on disk, or it is refused with a message naming the field.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from formats import open_image
from formats.qcow.check import check_qcow
from formats.qcow.driver import QcowDriver
from formats.qcow.geometry import MAX_L1_SIZE, Geometry, l1_cksum
from formats.qcow.l1 import PIECE_BYTES, L1Table
from formats.qcow.layout import QcowHeader
from formats.qcow.meta import read_meta
from formats.raw import RawDriver
from tapnbd.errors import ImageError
from tests.formats import crafted
from tests.formats.qcow_util import MiB, make_qcow, need, open_qcow, random_writes
from tests.helpers import Server, run_in_session, tapnbd_cmd

#: The issue's goal for any image, whatever its header claims.
RSS_LIMIT_KIB = 256 << 10
#: Only against hangs (the measured times are a fraction of a second).
HANG_GUARD = 120

_MEASURED = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:])\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "sys.stderr.write(f'\\npeak-rss-kib {peak}\\n')\n"
    "sys.exit(r.returncode)\n"
)


def measured(*args: str) -> tuple[int, str, str, int]:
    """Run ``tapnbd ARGS`` under a fresh interpreter that reports its child's peak RSS:
    (exit code, stdout, stderr without the report, peak RSS in KiB)."""
    # (The wrapper and tapnbd under it are killed together past HANG_GUARD.)
    proc = run_in_session([sys.executable, "-c", _MEASURED, *tapnbd_cmd(*args)], HANG_GUARD)
    out, err = proc.stdout, proc.stderr
    err, _, peak = err.rstrip().rpartition("\npeak-rss-kib ")
    return proc.returncode, out, err, int(peak)


def vm_hwm_kib(pid: int) -> int:
    """A live process's peak RSS (VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    assert m, status
    return int(m.group(1))


def nbdinfo_size(uri: str) -> int:
    out = subprocess.run(
        ["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=HANG_GUARD, check=True
    ).stdout
    return int(out)


def _huge(tmp_path: Path, case: str) -> Path:
    if case == "huge-l1":
        return crafted.huge_l1(tmp_path / "h.qcow")
    if case == "huge-l1-checksummed":
        return crafted.huge_l1(tmp_path / "h.qcow", ext=True)
    return crafted.huge_chain(tmp_path / "h.qcow", 3)


@pytest.mark.parametrize("case", ["huge-l1", "huge-l1-checksummed", "huge-l1-chain-of-3"])
def test_huge_sparse_l1_opens_cheaply(
    tmp_path: Path, serve: Callable[..., Server], case: str
) -> None:
    """A 2 GiB L1 claimed in a file using 4 KiB (today: 4.2 GiB and 14-37 s, per image
    in a chain)."""
    need("nbdinfo")
    img = _huge(tmp_path, case)
    assert os.stat(img).st_blocks * 512 <= 16384  # the image really is tiny on disk
    claimed = crafted.HUGE_L1 << 15

    rc, out, err, peak = measured("info", "--allow-probed-backing-chain", str(img))
    assert rc == 0, err
    assert f"virtual size: 8 TiB ({claimed} bytes)" in out
    assert out.count("l1 size: 268435455") == (3 if "chain" in case else 1)
    assert peak < RSS_LIMIT_KIB, f"info peaked at {peak} KiB"

    rc, out, err, peak = measured("check", str(img))
    assert rc == 0, out + err
    assert "No errors were found" in out
    if case == "huge-l1-checksummed":
        assert "cksum: unchecked" in out and "its checksum is not checked" in out
    assert peak < RSS_LIMIT_KIB, f"check peaked at {peak} KiB"

    server = serve(str(img), "--read-only", "--allow-probed-backing-chain")
    assert nbdinfo_size(server.uri) == claimed
    peak = vm_hwm_kib(server.proc.pid)
    assert peak < RSS_LIMIT_KIB, f"serve peaked at {peak} KiB"


def test_l1_full_of_bad_entries(tmp_path: Path) -> None:
    """4 Mi entries pointing past the end (today: one message each, about 700 MiB)."""
    entries = 4 << 20
    img = crafted.bad_entries(tmp_path / "b.qcow", entries)
    first = rf"L1 entry 0 \(0x[0-9a-f]+\) points past the end of the file \({img.stat().st_size}"

    # info shows the header with one warning line and exits 0, as qemu-img info does.
    rc, out, err, peak = measured("info", str(img))
    assert rc == 0 and re.search(first, err) and "file format: qcow" in out, out + err
    assert len(err.strip().splitlines()) == 1 and err.startswith("warning:")
    assert f"(and {entries - 1} more)" in err and "Traceback" not in err
    assert peak < RSS_LIMIT_KIB, f"info peaked at {peak} KiB"

    rc, out, err, peak = measured("check", str(img))
    assert rc == 2, out + err
    listed = [line for line in out.splitlines() if line.startswith("ERROR: L1 entry")]
    assert len(listed) == 20 and re.search(first, listed[0])
    assert f"... and {entries - 20} more errors" in out
    assert peak < RSS_LIMIT_KIB, f"check peaked at {peak} KiB"

    rc, out, err, peak = measured("serve", str(img), "--port", "0")
    assert rc == 1 and re.search(first, err) and "Traceback" not in err
    assert peak < RSS_LIMIT_KIB, f"serve peaked at {peak} KiB"


def test_l1_of_entries_sharing_one_table(tmp_path: Path) -> None:
    """4 Mi entries, each inside the file, all naming one L2 table: refused once more
    are in use than the file has room for, before 4 Mi of them are held and sorted."""
    img = crafted.overlapping(tmp_path / "o.qcow", 4 << 20)
    rc, out, err, peak = measured("info", str(img))
    assert rc == 0 and "Traceback" not in err and "file format: qcow" in out, out + err
    assert re.search(r"L1 table \(l1_size 4194304\): more than 1 entries are in use", err)
    assert peak < RSS_LIMIT_KIB, f"info peaked at {peak} KiB"
    rc, out, err, peak = measured("check", str(img))
    assert rc == 2 and "more than 1 entries are in use" in out, out + err
    assert peak < RSS_LIMIT_KIB, f"check peaked at {peak} KiB"


def test_l1_naming_millions_of_tables_in_a_hole(
    tmp_path: Path, serve: Callable[..., Server]
) -> None:
    """2 Mi valid entries (16 MiB of L1 on disk), each naming its own table in a 1 GiB
    hole (today: about 300 MiB, and info reads every table: 25 s)."""
    need("nbdinfo")
    entries = 2 << 20
    img = crafted.many_tables(tmp_path / "m.qcow", entries)
    rc, out, err, peak = measured("info", str(img))
    assert rc == 0 and "allocated: 0 B" in out, out + err
    assert peak < RSS_LIMIT_KIB, f"info peaked at {peak} KiB"
    rc, out, err, peak = measured("check", str(img))
    assert rc == 0 and "No errors were found" in out, out + err
    assert peak < RSS_LIMIT_KIB, f"check peaked at {peak} KiB"
    server = serve(str(img), "--read-only")
    assert nbdinfo_size(server.uri) == entries << 15
    peak = vm_hwm_kib(server.proc.pid)
    assert peak < RSS_LIMIT_KIB, f"serve peaked at {peak} KiB"


def test_check_of_a_16_tib_sparse_file(tmp_path: Path) -> None:
    """2**35 clusters of 512 bytes in the file (today: a MemoryError traceback)."""
    img = crafted.sparse_16t(tmp_path / "s.qcow")
    rc, out, err, peak = measured("check", str(img))
    assert rc == 0, out + err
    assert "No errors were found" in out and ", 0 leaked" in out
    assert "Traceback" not in err and "MemoryError" not in err
    assert peak < RSS_LIMIT_KIB, f"check peaked at {peak} KiB"
    rc, out, err, peak = measured("info", str(img))
    assert rc == 0 and "virtual size: 16 TiB" in out, err
    assert peak < RSS_LIMIT_KIB, f"info peaked at {peak} KiB"


async def test_check_counts_only_leaks_that_hold_data(tmp_path: Path) -> None:
    """A hole past the last cluster is no leak (it takes no space); written bytes are."""
    img = await make_qcow(tmp_path / "l.qcow", 64 * MiB, optimise=False)
    d = await open_qcow(img)
    await d.pwrite(0, b"a" * 4096)
    await d.close()
    end = img.stat().st_size
    os.truncate(img, end + 64 * MiB)
    res = await check_qcow(str(img))
    assert (res.exit_code, res.leaked_clusters) == (0, 0), res.to_json()
    with open(img, "r+b") as f:  # two clusters' worth of stray data in the hole
        f.seek(end + 8 * MiB)
        f.write(b"x" * 8192)
    res = await check_qcow(str(img))
    assert (res.exit_code, res.leaked_clusters) == (3, 2), res.to_json()


# The L1 fields, fuzzed.

#: What a refusal of a crafted L1 may name.
_FIELDS = re.compile(
    r"l1_table_offset|l1_size|L1 entr(y|ies) \d+|size \d+|cluster_bits|l2_bits|"
    r"backing_file|file is \d+ bytes|magic|version|crypt_method"
)


def _write(path: Path, head: bytes, l1_off: int, entries: dict[int, int], file_len: int) -> None:
    with open(path, "wb") as f:
        f.write(head)
        for i, v in entries.items():
            f.seek(l1_off + 8 * i)
            f.write(v.to_bytes(8, "big"))
        f.truncate(max(file_len, f.tell()))


def _naive_l1(path: Path) -> list[int]:
    """The oracle: the whole table read at once, as the driver did before (small only)."""
    with open(path, "rb") as f:
        h = QcowHeader.parse(f.read(48))
        n = Geometry.from_header(h).l1_size
        f.seek(h.l1_table_offset)
        return list(struct.unpack(f">{n}Q", f.read(8 * n)))


async def _open_crafted(path: Path, naive_ok: bool) -> None:
    try:
        d = await open_image(str(path), fmt="qcow", read_only=True)
    except ImageError as e:
        msg = str(e)
        assert msg.startswith(str(path)) and "\n" not in msg
        named = _FIELDS.search(msg)
        assert named, msg
        event(f"refused: {named.group(0).split()[0]}")
        return
    event("opened")
    try:
        assert isinstance(d, QcowDriver)
        # Memory held for the table is at most the table's data on disk.
        held = sum(len(p) * 8 for p in d.l1.pieces.values())
        on_disk = os.stat(path).st_blocks * 512
        assert held <= max(on_disk, PIECE_BYTES), (held, on_disk)
        if naive_ok:
            naive = _naive_l1(path)
            assert [d.l1[i] for i in range(len(naive))] == naive
            assert dict(d.l1.items()) == {i: e for i, e in enumerate(naive) if e}
        await d.extents(0, min(d.size(), 1 << 20))
    finally:
        await d.close()


_Crafted = tuple[int, int, int, int, dict[int, int], int, bool]


@st.composite
def _l1_images(draw: st.DrawFn) -> _Crafted:
    """(cluster_bits, l2_bits, l1_size, l1_table_offset, entries, file length, small)."""
    cluster_bits = draw(st.integers(9, 16))
    l2_bits = draw(st.integers(6, 13))
    small = draw(st.booleans())
    l1_size = draw(st.integers(1, 4096) if small else st.integers(1, MAX_L1_SIZE + 2))
    l1_off = draw(
        st.one_of(
            st.sampled_from([0, 16, 48, 64, 512, 4096, 4096 * 3 + 8]),
            st.integers(0, 1 << 40),
            st.integers(0, (1 << 64) - 1),
        )
    )
    l2_bytes = 8 << l2_bits
    table_end = l1_off + 8 * l1_size
    slack = draw(st.sampled_from([0, l2_bytes - 1, l2_bytes, 4 * l2_bytes + 4096, 1 << 30]))
    file_len = min(table_end + slack, (1 << 43)) if table_end < (1 << 43) else 4096
    n = min(l1_size, 4096)
    values = st.one_of(
        st.just(0),
        st.integers(table_end, table_end + 8 * l2_bytes).map(lambda v: v & ~511),
        st.integers(0, (1 << 64) - 1),
    )
    entries = draw(st.dictionaries(st.integers(0, n - 1), values, max_size=8))
    return cluster_bits, l2_bits, l1_size, l1_off, entries, file_len, small


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(_l1_images())
def test_l1_fields_fuzzed(tmp_path: Path, image: _Crafted) -> None:
    cluster_bits, l2_bits, l1_size, l1_off, entries, file_len, small = image
    path = tmp_path / "f.qcow"
    head = crafted.header(
        l1_size << (cluster_bits + l2_bits),
        cluster_bits=cluster_bits,
        l2_bits=l2_bits,
        l1_off=l1_off,
    )
    if l1_off + 8 * max(entries, default=0) > 1 << 43:
        entries = {}  # cannot write there; the header alone still claims it
    _write(path, head, l1_off, entries, file_len)
    asyncio.run(_open_crafted(path, naive_ok=small and l1_off + 8 * l1_size <= file_len))


class _Counting(RawDriver):
    """A read-only file child that counts the bytes read through it."""

    def __init__(self, path: str) -> None:
        super().__init__(path, read_only=True)
        self.bytes_read = 0

    async def pread(self, offset: int, length: int) -> bytearray:
        self.bytes_read += length
        return await super().pread(offset, length)


@pytest.mark.parametrize("ext", [False, True])
async def test_open_reads_the_table_data_only(tmp_path: Path, ext: bool) -> None:
    """A 64 MiB table in a hole (with the Xen checksum: hashed, not read) costs a read of
    the header and nothing more; a 2 GiB one is no different."""
    for entries in (8 << 20, crafted.HUGE_L1):
        img = crafted.huge_l1(tmp_path / f"{entries}.qcow", entries, ext=ext)
        child = _Counting(str(img))
        try:
            meta = await read_meta(child)
        finally:
            await child.close()
        assert child.bytes_read <= 4096, (entries, child.bytes_read)
        assert not meta.l1.pieces and meta.l1.count() == 0
        assert meta.cksum_ok is (True if ext and entries == 8 << 20 else None)


@settings(max_examples=100, deadline=None)
@given(
    size=st.integers(1, 5 * 512 + 7),
    writes=st.lists(st.tuples(st.integers(0, 5 * 512 + 6), st.integers(0, (1 << 64) - 1))),
)
def test_l1_table_in_pieces_is_the_whole_table(size: int, writes: list[tuple[int, int]]) -> None:
    """Entries set in any order (0 included) read back as a plain list does, and the
    checksum over stored pieces and zero gaps is the MD5 of the whole table (§2.3)."""
    table, plain = L1Table(size), [0] * size
    for i, v in writes:
        if i < size:
            table[i] = plain[i] = v
    assert [table[i] for i in range(size)] == plain
    assert list(table.items()) == [(i, e) for i, e in enumerate(plain) if e]
    assert table.count() == sum(1 for e in plain if e)
    assert table.cksum() == l1_cksum(struct.pack(f">{size}Q", *plain))


async def test_allocation_counts_tables_in_memory_and_on_disk(tmp_path: Path) -> None:
    """info's count skips tables in holes, so it must still see tables not yet flushed
    (they lie past the file's data) and agree with check's walk after a reopen."""
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    img = await make_qcow(tmp_path / "a.qcow", 64 * MiB, optimise=False)
    d = await open_qcow(img)
    clusters: set[int] = set()
    for off, data in random_writes(rng, 64 * MiB, 30):
        await d.pwrite(off, data)
        clusters.update(range(off >> 12, ((off + len(data) - 1) >> 12) + 1))
    assert await d.allocation() == (len(clusters), 0)  # nothing flushed yet
    await d.close()
    d = await open_qcow(img, read_only=True)
    try:
        assert await d.allocation() == (len(clusters), 0)
    finally:
        await d.close()
    assert (await check_qcow(str(img))).allocated_clusters == len(clusters)
