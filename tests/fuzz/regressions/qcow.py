"""Mutated qcow images that broke an invariant of tests.fuzz.qcow_mutate, with the fix.

Each is a base image (rebuilt the same way every time) plus byte patches, replayed by
tests/fuzz/test_qcow_mutate.py. Offsets are into the base file: the qemu base has its
L1 table at 48 and L2 tables at 0x1000 and 0x9000; the tapnbd bases have the L1 at 0x1000.
"""

from __future__ import annotations

from tests.fuzz.qcow_mutate import Case

CASES: dict[str, tuple[str, Case]] = {
    "compressed_bit_on_a_normal_entry": (
        "bit 63 set on the L2 entry of a normal cluster: reads failed with EIO (the bytes do "
        "not inflate) but check called the image clean; check now inflates compressed data",
        Case("qemu", [(40952, bytes.fromhex("ce"))]),
    ),
    "backing_name_of_nul_bytes": (
        "backing_file_offset/size pointing at zeros: open failed on the backing file, check "
        "called the image clean; check now reports a backing file that does not exist",
        Case(
            "tapnbd-optimised",
            [(12, bytes.fromhex("00000200")), (16, bytes.fromhex("00000200"))],
        ),
    ),
    # Not bugs in tapnbd: cases that showed the harness's own oracle too strict, kept so
    # the oracle stays right (reads of data inside the file that is not guest data).
    "entry_into_compressed_data": (
        "an unaligned L2 entry whose cluster runs into compressed data and past EOF",
        Case("qemu", [(40958, bytes.fromhex("e4"))]),
    ),
    "entry_at_compressed_cluster": (
        "an L2 entry pointing at the cluster that holds compressed data",
        Case("qemu", [(40768, bytes.fromhex("0000000000000200")), (40774, bytes.fromhex("f0"))]),
    ),
    "cluster_bits_plus_one_orphans_a_table": (
        "cluster_bits 12 -> 13 on an optimised image: one L1 entry, the other table orphaned",
        Case("tapnbd-optimised", [(32, bytes.fromhex("0d"))]),
    ),
    "cluster_bits_14": (
        "cluster_bits 12 -> 14 on a qemu image: data clusters overlap the old second table",
        Case("qemu", [(20, bytes.fromhex("00001000")), (32, bytes.fromhex("0e"))]),
    ),
}
