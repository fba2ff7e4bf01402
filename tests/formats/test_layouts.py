"""The QCOW and qcow2 ``struct`` layouts against construct declarations of the same specs.

The drivers declare their on-disk records as ``struct`` formats (construct's import cost
the CLI its start-up goal, issue 15). Here construct declares them a second time, field
by field from the specs (../shared/spec/blktap.md §1.1 and §2.1; QEMU
docs/interop/qcow2.txt), as an oracle: a wrong format character, a field out of order or
a lost padding byte in a layout makes random records (seeded, the seed printed) parse
or build differently.
"""

from __future__ import annotations

import random

import pytest
from construct import (
    Bytes,
    Const,
    Container,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Padding,
    Struct,
)

from formats.qcow import layout as v1
from formats.qcow2 import layout as v2
from tapnbd.errors import InvalidImageError

SEED = random.randrange(1 << 32)
ROUNDS = 200

QCOW_HEADER = Struct(
    "magic" / Const(v1.QCOW_MAGIC, Int32ub),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "mtime" / Int32ub,
    "size" / Int64ub,
    "cluster_bits" / Int8ub,
    "l2_bits" / Int8ub,
    Padding(2),
    "crypt_method" / Int32ub,
    "l1_table_offset" / Int64ub,
)
XEN_EXT = Struct(
    "xmagic" / Const(v1.XEN_MAGIC, Int32ub),
    "cksum" / Int32ub,
    "min_cluster_alloc" / Int32ub,
    "flags" / Int32ub,
)
QCOW2_HEADER = Struct(
    "magic" / Const(v2.QCOW2_MAGIC, Int32ub),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
)
FEATURE_NAME = Struct("type" / Int8ub, "bit" / Int8ub, "name" / Bytes(46))
SNAPSHOT = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
)


@pytest.fixture(scope="module")
def rng() -> random.Random:
    print(f"seed {SEED}")
    return random.Random(SEED)


def fields(c: Container) -> dict[str, object]:
    return {k: v for k, v in c.items() if not k.startswith("_") and k not in ("magic", "xmagic")}


def test_qcow_header_and_extension(rng: random.Random) -> None:
    for _ in range(ROUNDS):
        data = bytearray(rng.randbytes(64))
        data[0:4] = v1.QCOW_MAGIC.to_bytes(4, "big")
        data[48:52] = v1.XEN_MAGIC.to_bytes(4, "big")
        h = v1.QcowHeader.parse(bytes(data))
        want = fields(QCOW_HEADER.parse(bytes(data)))
        assert {k: getattr(h, k) for k in want} == want
        # The padding is written as zero, as qemu's and blktap's compilers leave it.
        assert h.build() == QCOW_HEADER.build(want) == bytes(data[:34]) + b"\0\0" + data[36:48]
        ext = v1.XenExtension.parse(bytes(data))
        assert ext is not None
        want = fields(XEN_EXT.parse(bytes(data[48:])))
        assert (ext.cksum, ext.min_cluster_alloc, int(ext.flags)) == (
            want["cksum"],
            want["min_cluster_alloc"],
            want["flags"],
        )
        assert ext.build() == XEN_EXT.build(want) == bytes(data[48:64])


def test_qcow2_header(rng: random.Random) -> None:
    for _ in range(ROUNDS):
        data = bytearray(rng.randbytes(v2.V3_HEADER_SIZE))
        data[0:4] = v2.QCOW2_MAGIC.to_bytes(4, "big")
        data[4:8] = rng.choice((2, 3)).to_bytes(4, "big")
        data[100:104] = v2.V3_HEADER_SIZE.to_bytes(4, "big")
        h = v2.Qcow2Header.parse(bytes(data))
        want = fields(QCOW2_HEADER.parse(bytes(data)))
        if h.version == 2:
            # Version 2 has no bytes 72-103; Qcow2Header gives their implied values.
            del want["incompatible_features"], want["compatible_features"]
            del want["autoclear_features"], want["refcount_order"], want["header_length"]
            assert h.build() == bytes(data[: v2.V2_HEADER_SIZE])
        else:
            assert h.build() == QCOW2_HEADER.build(fields(QCOW2_HEADER.parse(bytes(data))))
        assert {k: getattr(h, k) for k in want} == want


def test_qcow2_records(rng: random.Random) -> None:
    for _ in range(ROUNDS):
        ext_type, length = rng.getrandbits(32), rng.randrange(64)
        payload = rng.randbytes(length)
        framed = v2.build_extension(ext_type, payload)
        assert v2.parse_ext_header(framed) == (ext_type, length)
        assert framed[:8] == ext_type.to_bytes(4, "big") + length.to_bytes(4, "big")
        assert len(framed) % 8 == 0 and framed[8 : 8 + length] == payload

        entry = rng.randbytes(48)
        want = FEATURE_NAME.parse(entry)
        name = want.name.rstrip(b"\0").decode("utf-8", "replace")
        assert v2.parse_feature_names(entry) == {(want.type, want.bit): name}

        fixed = bytearray(rng.randbytes(v2.SNAPSHOT_FIXED))
        fixed[12:16] = bytes(4)  # id_str_size, name_size
        fixed[36:40] = (16).to_bytes(4, "big")  # extra_data_size
        extra = rng.randbytes(16)
        snap, end = v2.parse_snapshot(bytes(fixed) + extra, 0)
        want = SNAPSHOT.parse(bytes(fixed))
        got = {k: getattr(snap, k) for k in fields(want) if hasattr(snap, k)}
        assert got == {k: v for k, v in fields(want).items() if k in got}
        assert snap.extra == extra and snap.disk_size == int.from_bytes(extra[8:], "big")
        assert end == v2.SNAPSHOT_FIXED + 16

    table = v2.build_feature_names()
    names = v2.parse_feature_names(table)
    assert names[(1, 0)] == "lazy refcounts" and names[(0, 0)] == "dirty bit"
    assert [FEATURE_NAME.parse(table[i : i + 48]).name.rstrip(b"\0") for i in (0, 48)] == [
        b"dirty bit",
        b"corrupt bit",
    ]


def test_bad_magic_and_short_records_name_the_problem() -> None:
    with pytest.raises(InvalidImageError, match="magic 0x514649fc is not QCOW's"):
        v1.QcowHeader.parse(b"QFI\xfc" + bytes(60))
    with pytest.raises(InvalidImageError, match="not a qcow2 image"):
        v2.Qcow2Header.parse(b"QFI\xfa" + bytes(100))
    with pytest.raises(InvalidImageError, match="shorter than the 104-byte"):
        v2.Qcow2Header.parse(b"QFI\xfb" + (3).to_bytes(4, "big") + bytes(80))
    with pytest.raises(InvalidImageError, match="header extension runs past"):
        v2.parse_ext_header(bytes(7))
    assert v1.XenExtension.parse(bytes(63)) is None


@pytest.mark.parametrize(
    ("offset", "extra_sectors", "nbytes"),
    [(0x10200, 0, 512), (0x10250, 0, 432), (0x10250, 1, 944), (0x10000, 127, 65536)],
)
def test_compressed_span_as_qcow2_txt_defines_it(
    offset: int, extra_sectors: int, nbytes: int
) -> None:
    """ "Number of additional 512-byte sectors used for the compressed data, beyond the
    sector containing the offset": the data runs from the offset to the end of its
    last sector (64 KiB clusters: the sector count sits above bit 54)."""
    entry = v2.OFLAG_COMPRESSED | (extra_sectors << (62 - 8)) | offset
    assert v2.compressed_span(entry, 16) == (offset, nbytes)
