"""Hole detection in structured reads: a read that is all zeros may go out as a HOLE
chunk, and anything else is data, down to a single non-zero byte at any position
(issue 18: a mutation that treated such a block as zeros passed every other test)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tapnbd.buffers import all_zero as _all_zero
from tapnbd.server.replies import SPLIT_READ
from tests.helpers import Server, nbdsh_script


def oracle(data: bytes) -> bool:
    return len(data) > 0 and data.count(0) == len(data)


@given(st.binary(max_size=300))
def test_all_zero_matches_count(data: bytes) -> None:
    for form in (data, bytearray(data), memoryview(data)):
        assert _all_zero(form) == oracle(data)


@given(st.integers(1, 3 * 64 + 1), st.data())
def test_one_nonzero_byte_anywhere_is_data(n: int, draw: st.DataObject) -> None:
    pos = draw.draw(st.integers(0, n - 1), label="pos")
    byte = draw.draw(st.integers(1, 255), label="byte")
    buf = bytearray(n)
    buf[pos] = byte
    assert not _all_zero(bytes(buf)) and not _all_zero(memoryview(buf))
    assert _all_zero(bytes(n))


READ = r"""
import json, sys, nbd
uri, spots = sys.argv[1], json.loads(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
assert h.get_structured_replies_negotiated()
out = []
for offset, length, pos, byte in spots:
    block = bytearray(length)
    block[pos] = byte
    h.pwrite(bytes(block), offset)
    chunks = []
    def chunk(sub, off, status, err):
        sub = bytes(sub)
        chunks.append([off, len(sub), status == nbd.READ_DATA, sub.count(0) != len(sub)])
        return 0
    buf = h.pread_structured(length, offset, chunk)
    out.append({"byte": buf[pos], "zeros": buf.count(0), "chunks": chunks})
h.shutdown()
print(json.dumps(out))
"""


def test_structured_read_keeps_a_lone_byte(
    serve: Callable[..., Server], raw_image: Path, seed: int
) -> None:
    """nbdsh (libnbd, structured replies): a block holding one non-zero byte at a
    seeded position reads back as a DATA chunk holding that byte, both for a read sent
    as one chunk and for one split into DATA and HOLE chunks."""
    rng = random.Random(seed)
    spots = []
    for i, length in enumerate((4096, 64, SPLIT_READ, 3 * SPLIT_READ)):
        pos = rng.choice((0, length - 1, rng.randrange(length)))
        spots.append((i << 20, length, pos, rng.randrange(1, 256)))
    server = serve(str(raw_image))
    got = nbdsh_script(READ, server.uri, json.dumps(spots))
    assert isinstance(got, list)
    for (offset, length, pos, byte), res in zip(spots, got, strict=True):
        assert res["byte"] == byte and res["zeros"] == length - 1, (pos, res)
        holding = [c for c in res["chunks"] if c[0] <= offset + pos < c[0] + c[1]]
        assert len(holding) == 1 and holding[0][2] and holding[0][3], (pos, res["chunks"])
