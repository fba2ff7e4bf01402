"""Fuzzing the qcow parser and driver with mutated real images.

Base images are made by the real tools: ``qemu-img create -f qcow`` then ``qemu-io``
writes (some of them compressed), and ``tapnbd create`` with and without
``--optimise`` then writes through tapnbd's own driver. Every written guest cluster holds
one byte value repeated (its *tag*); each image has its own range of tags, so data
can be traced to the image and cluster it came from.

A mutation flips bits or plants interesting values in the header (bytes 0-47), the Xen
extension (48-63), the L1 table or an L2 table. Then, for the mutated file:

- opening it read-only either fails with ImageError whose message names the field at
  fault, or succeeds;
- every read returns the length asked for or fails with EIO, and each 512-byte sector
  it returns is zeros or a tag of this image: data from inside the file, never from
  its metadata, from outside it, or from another image;
- if the open failed, a read failed, or a read returned other data than the unmutated
  image (not zeros: a zeroed entry is a discard, which leaves a valid image),
  ``check_qcow`` (``tapnbd check``) reports a problem (exit code other than 0);
- nothing hangs (every step runs under a timeout) and no other exception escapes.

A failing case is a base name plus its patches, so it is kept as a few lines of
Python under tests/fuzz/regressions/qcow.py and replayed by pytest.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from formats.qcow import open_qcow
from formats.qcow.check import check_qcow
from tapnbd.errors import ImageError

SIZE = 4 << 20
CLUSTER = 4096
SECTOR = 512
#: Reads are made in pieces of this size, as a client would.
READ_PIECE = 64 * 1024
#: Any single step taking longer than this counts as a hang.
STEP_TIMEOUT = 20.0
#: Words an open refusal must contain at least one of: the field at fault.
FIELDS = (
    "magic",
    "version",
    "size",
    "cluster_bits",
    "l2_bits",
    "crypt_method",
    "l1_table_offset",
    "L1",
    "L2",
    "backing",
    "header",
)


@dataclass
class Base:
    """An unmutated image and what its guest clusters hold (0: reads as zeros)."""

    name: str
    path: Path
    data: bytes
    content: dict[int, int]  # guest cluster index -> tag byte
    tags: frozenset[int]
    l1_offset: int
    l1: list[int]  # L1 entries (L2 table offsets, 0 for none)

    @property
    def l2_tables(self) -> list[int]:
        return [e for e in self.l1 if e]


@dataclass
class Case:
    """A mutation: the base's name and (offset, bytes) patches."""

    base: str
    patches: list[tuple[int, bytes]]

    def describe(self) -> str:
        return f"Case({self.base!r}, {[(o, b.hex()) for o, b in self.patches]!r})"


@dataclass
class Stats:
    mutations: int = 0
    refused: int = 0
    opened: int = 0
    reads: int = 0
    eio_reads: int = 0
    damaged: int = 0  # opened, but reads show damage (EIO, shared or non-guest data)
    changed: int = 0  # clusters that read other guest data than before (swaps)
    check_flagged: int = 0
    messages: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{self.mutations} mutations: {self.refused} refused at open, {self.opened} opened "
            f"({self.damaged} damaged, {self.changed} clusters changed, "
            f"{self.eio_reads} reads failed with EIO, "
            f"{self.reads} reads); check flagged {self.check_flagged}; no invariant broken"
        )


class Broken(AssertionError):
    """An invariant failed for a case."""


# Base images.

# Guest clusters written in each base: both L1 slots, runs and singles, holes between.
WRITTEN = [0, 1, 2, 7, 100, 101, 511, 512, 513, 700, 1000, 1023]
COMPRESSED = [3, 600]  # qemu base only


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def _parse_layout(data: bytes) -> tuple[int, list[int]]:
    """(L1 offset, L1 entries), read with struct only."""
    size, cluster_bits, l2_bits = struct.unpack_from(">QBB", data, 24)
    (l1_off,) = struct.unpack_from(">Q", data, 40)
    shift = cluster_bits + l2_bits
    l1_size = (size + (1 << shift) - 1) >> shift
    entries = struct.unpack_from(f">{l1_size}Q", data, l1_off)
    if not any(e and e + 8 * (1 << l2_bits) <= len(data) for e in entries):
        entries = struct.unpack_from(f"<{l1_size}Q", data, l1_off)  # old tapdisk order
    return l1_off, list(entries)


def _make_qemu(path: Path, first_tag: int) -> dict[int, int]:
    _run(["qemu-img", "create", "-q", "-f", "qcow", str(path), str(SIZE)])
    content: dict[int, int] = {}
    cmds = []
    for i, c in enumerate(WRITTEN + COMPRESSED):
        tag = first_tag + i
        content[c] = tag
        flag = "-c " if c in COMPRESSED else ""
        cmds += ["-c", f"write {flag}-P {tag} {c * CLUSTER} {CLUSTER}"]
    _run(["qemu-io", "-f", "qcow", *cmds, str(path)])
    return content


def _make_tapnbd(path: Path, first_tag: int, optimise: bool) -> dict[int, int]:
    flag = "--optimise" if optimise else "--no-optimise"
    _run([sys.executable, "-m", "tapnbd", "create", str(path), "--size", str(SIZE), flag])
    content = {c: first_tag + i for i, c in enumerate(WRITTEN)}

    async def write() -> None:
        d = await open_qcow(str(path), False)
        try:
            for c, tag in content.items():
                await d.pwrite(c * CLUSTER, bytes([tag]) * CLUSTER)
            await d.flush()
        finally:
            await d.close()

    asyncio.run(write())
    return content


def make_bases(workdir: Path) -> dict[str, Base]:
    bases: dict[str, Base] = {}
    makers: tuple[tuple[str, Callable[[Path], dict[int, int]]], ...] = (
        ("qemu", lambda p: _make_qemu(p, 0x10)),
        ("tapnbd-optimised", lambda p: _make_tapnbd(p, 0x40, True)),
        ("tapnbd-normal", lambda p: _make_tapnbd(p, 0x80, False)),
    )
    for name, make in makers:
        path = workdir / f"{name}.qcow"
        content = make(path)
        data = path.read_bytes()
        l1_off, l1 = _parse_layout(data)
        bases[name] = Base(name, path, data, content, frozenset(content.values()), l1_off, l1)
    return bases


# Mutations.


def _interesting(base: Base, rng: random.Random) -> int:
    n = len(base.data)
    return rng.choice(
        (
            0,
            1,
            512,
            CLUSTER,
            n,
            n - SECTOR,
            n + CLUSTER,
            base.l1_offset,
            *base.l2_tables,
            rng.choice(base.l2_tables) + 8 * rng.randrange(512) if base.l2_tables else 0,
            1 << 63,
            (1 << 63) | (100 << 52) | n - 100,
            (1 << 64) - 1,
            rng.getrandbits(64),
        )
    )


def mutate(base: Base, rng: random.Random) -> Case:
    """1-3 patches in one region of the image's metadata."""
    region = rng.choice(("header", "extension", "l1", "l2", "l2"))
    if region == "header":
        lo, hi = 0, 48
    elif region == "extension":
        lo, hi = 48, 64
    elif region == "l1" or not base.l2_tables:
        lo, hi = base.l1_offset, base.l1_offset + 8 * len(base.l1)
    else:
        slot = rng.choice([i for i, e in enumerate(base.l1) if e])
        t = base.l1[slot]
        # Mostly the used entries: a mutated zero entry is one kind of damage only.
        used = [t + 8 * (c % 512) for c in base.content if c // 512 == slot]
        lo = rng.choice(used) if used and rng.random() < 0.7 else t + 8 * rng.randrange(512)
        hi = lo + 8
    patches: list[tuple[int, bytes]] = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(4)
        if kind == 0:  # flip one bit
            at = rng.randrange(lo, hi)
            byte = base.data[at] ^ (1 << rng.randrange(8))
            patches.append((at, bytes([byte])))
        elif kind == 1:  # a random byte
            patches.append((rng.randrange(lo, hi), bytes([rng.randrange(256)])))
        else:  # an interesting value in an aligned 4- or 8-byte field
            width = 8 if kind == 2 else 4
            at = lo + rng.randrange(max(1, (hi - lo) // width)) * width
            value = _interesting(base, rng) & ((1 << (8 * width)) - 1)
            patches.append((at, value.to_bytes(width, "big")))
    return Case(base.name, patches)


# Running a case.


def apply(base: Base, case: Case, path: Path) -> None:
    buf = bytearray(base.data)
    for off, raw in case.patches:
        buf[off : off + len(raw)] = raw
    path.write_bytes(buf)


def live_metadata(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges the mutated image's own header declares as metadata (struct only).

    The header and extension, the L1 table, and every L2 table an L1 entry names, read
    big-endian and little-endian (an old tapdisk image), as far as they fit the file.
    Bytes elsewhere are data, or at worst an orphaned table: inside the file either way.
    """
    out = [(0, 64)]
    size, cluster_bits, l2_bits = struct.unpack_from(">QBB", data, 24)
    (l1_off,) = struct.unpack_from(">Q", data, 40)
    shift = cluster_bits + l2_bits
    if not (9 <= cluster_bits <= 16 and 6 <= l2_bits <= 13):
        return out
    l1_len = 8 * ((size + (1 << shift) - 1) >> shift)
    if l1_off + l1_len > len(data):
        return out
    out.append((l1_off, l1_off + l1_len))
    raw = data[l1_off : l1_off + l1_len]
    for order in (">", "<"):
        for e in struct.unpack(f"{order}{l1_len // 8}Q", raw):
            if e and e + (8 << l2_bits) <= len(data):
                out.append((e, e + (8 << l2_bits)))
    return out


class Reader:
    """Reads a mutated image and classifies every sector it returns."""

    def __init__(self, base: Base, data: bytes, stats: Stats) -> None:
        self.base, self.data, self.stats = base, data, stats
        self.tags = base.tags | {0}
        self.seen: dict[int, int] = {}  # tag -> guest cluster it was read at
        self._outside: set[bytes] | None = None
        self.damage: list[str] = []

    def outside_metadata(self) -> set[bytes]:
        """Every 512-aligned sector of the file that is not live metadata."""
        if self._outside is None:
            meta = live_metadata(self.data)
            # The last cluster may end past EOF (qemu leaves compressed data unaligned);
            # what lies beyond the end reads as zeros.
            data = self.data + bytes(-len(self.data) % CLUSTER)
            self._outside = {
                data[o : o + SECTOR]
                for o in range(0, len(data), SECTOR)
                if not any(a < o + SECTOR and o < b for a, b in meta)
            }
        return self._outside

    def sector(self, guest: int, s: bytes) -> None:
        if s.count(s[0]) == len(s) and s[0] in self.tags:
            if s[0]:
                c = guest // CLUSTER
                first = self.seen.setdefault(s[0], c)
                if first != c:
                    self.damage.append(f"tag {s[0]:#x} read at guest clusters {first} and {c}")
            return
        # Not data this image wrote: it must at least be bytes of the file that no live
        # structure claims (a mutated pointer into compressed data, an orphaned table).
        outside = self.outside_metadata()
        ok = s in outside if len(s) == SECTOR else any(x.startswith(s) for x in outside)
        if not ok:
            raise Broken(
                f"sector at guest offset {guest} is neither zeros, a tag, nor data of the "
                f"file outside its metadata (first bytes {s[:16].hex()})"
            )
        self.damage.append(f"guest offset {guest} reads bytes that are not guest data")

    def cluster(self, guest: int, piece: bytes) -> None:
        want = self.base.content.get(guest // CLUSTER, 0) if guest < SIZE else 0
        # Zeros where data was are no sign of damage: a zeroed L2 entry is what a discard
        # leaves, a valid image. Another cluster's tag is a swap, valid too, unless the
        # tag shows up twice (sector() notes that).
        if piece != bytes([want]) * len(piece) and piece.count(0) != len(piece):
            self.stats.changed += 1


async def _read_all(path: Path, base: Base, stats: Stats) -> tuple[list[str], str]:
    """Open and read the mutated image; (damage seen, refusal message or "")."""
    try:
        d = await asyncio.wait_for(open_qcow(str(path), True), STEP_TIMEOUT)
    except ImageError as e:
        msg = str(e)
        if not any(f in msg for f in FIELDS):
            raise Broken(f"open refused without naming a field: {msg!r}") from None
        stats.refused += 1
        return [msg], msg
    stats.opened += 1
    reader = Reader(base, path.read_bytes(), stats)
    try:
        size = d.size()
        for start, length in _ranges(size):
            stats.reads += 1
            try:
                got = bytes(await asyncio.wait_for(d.pread(start, length), STEP_TIMEOUT))
            except OSError as e:
                if e.errno != 5:
                    raise Broken(f"read {start}+{length} failed with {e!r}, not EIO") from e
                stats.eio_reads += 1
                reader.damage.append(f"read {start}+{length}: EIO")
                continue
            if len(got) != length:
                raise Broken(f"read {start}+{length} returned {len(got)} bytes")
            for i in range(0, length, SECTOR):
                reader.sector(start + i, got[i : i + SECTOR])
            for i in range(0, length, CLUSTER):
                reader.cluster(start + i, got[i : i + CLUSTER])
    finally:
        await asyncio.wait_for(d.close(), STEP_TIMEOUT)
    return reader.damage, ""


def _ranges(size: int) -> Iterator[tuple[int, int]]:
    """Everything up to the base's size, then samples of anything past it."""
    end = min(size, SIZE)
    for pos in range(0, end, READ_PIECE):
        yield pos, min(READ_PIECE, end - pos)
    if size > SIZE:
        for pos in sorted({SIZE, size // 2 // CLUSTER * CLUSTER, (size - 1) // CLUSTER * CLUSTER}):
            if pos >= SIZE:
                yield pos, min(CLUSTER, size - pos)


async def _check(path: Path, base: Base, case: Case, stats: Stats) -> None:
    damage, refusal = await _read_all(path, base, stats)
    res = await asyncio.wait_for(check_qcow(str(path)), STEP_TIMEOUT)
    if damage:
        stats.damaged += not refusal
        if res.exit_code == 0:
            raise Broken(f"{damage[0]}, yet check reports a clean image")
    if res.exit_code:
        stats.check_flagged += 1


def run_case(case: Case, bases: dict[str, Base], workdir: Path, stats: Stats) -> None:
    base = bases[case.base]
    path = workdir / "mutant.qcow"
    apply(base, case, path)
    stats.mutations += 1
    try:
        asyncio.run(_check(path, base, case, stats))
    except Broken as e:
        raise Broken(f"{case.describe()}: {e}") from e
    except TimeoutError as e:
        raise Broken(f"{case.describe()}: a step took over {STEP_TIMEOUT} s") from e
    except Exception as e:
        raise Broken(f"{case.describe()}: {type(e).__name__}: {e}") from e


def campaign(
    runs: int, seed: int = 0, workdir: Path | None = None, bases: dict[str, Base] | None = None
) -> Stats:
    """``runs`` mutations spread over the bases; raises Broken on the first failure."""
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="tapnbd-qcow-fuzz-")) if workdir is None else workdir
    try:
        if bases is None:
            bases = make_bases(wd)
        rng = random.Random(seed)
        stats = Stats()
        names = sorted(bases)
        for i in range(runs):
            case = mutate(bases[names[i % len(names)]], rng)
            run_case(case, bases, wd, stats)
        return stats
    finally:
        if own:
            shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    print(campaign(int(os.environ.get("QCOW_FUZZ_RUNS", "300"))).summary())
